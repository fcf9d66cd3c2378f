"""Benchmark: what the self-ensemble buys and costs on a trained model (issue 13, item 6).

    python benchmarks/ensemble.py                  # the shipped weights, data/pretrain/test
    python benchmarks/ensemble.py --model runs/pretrain/best.pt

``predict.deblur(model, x, ensemble=K)`` averages the outputs for K flips / 90-degree
rotations of the input. For K in ``--ensembles`` every test image is restored whole, one at a
time; reported per K: the mean PSNR / SSIM against the sharp image (``deblur_lib.metrics``),
the gain over K = 1, and the median seconds per image (after one warm-up image).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence

import _common  # first: puts the repo on sys.path when run as a script

from deblur_lib.data import PairedImageFolder
from deblur_lib.evaluate import image_metrics
from deblur_lib.metrics import denormalize
from deblur_lib.models import DEFAULT_MODEL, build_model
from deblur_lib.predict import deblur
from deblur_lib.synth import synthesize
from deblur_lib.weights import load_model


def run(args) -> dict:
    if args.quick:  # smoke sizes: a random tiny model on a split of its own
        tmp = tempfile.mkdtemp(prefix="bench_ensemble_")
        synthesize(tmp, n_train=1, n_test=2, size=48, seed=0, progress=False)
        args.test_data, args.ensembles = f"{tmp}/test", [1, 8]
        model, source = build_model("tiny"), "random tiny"
    else:
        model, info = load_model(args.model, map_location=args.device)
        source = info.source
    pairs = PairedImageFolder(args.test_data)
    if len(pairs) == 0:
        raise SystemExit(f"{args.test_data}: no test pairs")
    results: dict[str, dict] = {}
    for k in args.ensembles:
        scores, times = [], []
        deblur(model, pairs[0][0], ensemble=k, device=args.device)  # warm-up
        for i in range(len(pairs)):
            blur, sharp = pairs[i]  # (3, H, W) model space
            t0 = time.perf_counter()
            out = deblur(model, blur, ensemble=k, device=args.device)
            times.append(time.perf_counter() - t0)
            pred, target = denormalize(out[None].float()), denormalize(sharp[None])
            p, s = image_metrics(pred, target)  # what validation averages
            scores.append((float(p[0]), float(s[0])))
        results[str(k)] = {
            "psnr_db": statistics.fmean(s[0] for s in scores),
            "ssim": statistics.fmean(s[1] for s in scores),
            "s_per_image": statistics.median(times),
        }
    base = results[str(args.ensembles[0])]
    for r in results.values():
        r["gain_db"] = r["psnr_db"] - base["psnr_db"]
        r["time_ratio"] = r["s_per_image"] / base["s_per_image"]
    return {
        "config": {
            "model": args.model,
            "source": source,
            "test_data": str(args.test_data),
            "n_images": len(pairs),
            "ensembles": args.ensembles,
        },
        "ensembles": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = _common.parser(__doc__.splitlines()[0], "ensemble")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="anything predict --model takes")
    ap.add_argument("--test_data", default="data/pretrain/test")
    ap.add_argument("--ensembles", type=int, nargs="+", default=[1, 2, 4, 8])
    return _common.run_script(ap, argv, run)


if __name__ == "__main__":
    raise SystemExit(main())
