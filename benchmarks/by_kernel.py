"""Benchmark: where a model gains and where it harms, by blur size and on sharp input (issue 12).

    python benchmarks/by_kernel.py                                  # the shipped weights
    python benchmarks/by_kernel.py --models deblur-guard-small runs/finetune/last.pt

For each of ``--models`` (anything ``predict --model`` takes) every pair of the test split is
restored whole (``train.export.test_scores``: what the model card reports). Reported per model:
mean PSNR / SSIM, the gain over the blurred input overall and per band of PSF sides (the
split's ``kernels/NNNN.npy``: 7-11, 13-19, 21-25, 27-31 px), the images made worse, and
``sharp_in``: the model given the *sharp* images, PSNR against them (mean and lowest; an
identity would score the 100 dB cap). A blind deblurrer should leave a sharp photo nearly
unchanged: real shake is often mild, and spatially varying blur leaves parts of a photo sharp.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

import _common  # first: puts the repo on sys.path when run as a script
import numpy as np

from deblur_lib.models import DEFAULT_MODEL, build_model
from deblur_lib.synth import synthesize
from deblur_lib.train.export import test_scores
from deblur_lib.weights import load_model

BANDS = ((3, 5), (7, 11), (13, 19), (21, 25), (27, 31))  # px, odd PSF sides


def run(args) -> dict:
    if args.quick:  # smoke sizes: a random tiny model on a split of its own
        tmp = tempfile.mkdtemp(prefix="bench_by_kernel_")
        synthesize(tmp, n_train=1, n_test=3, size=48, seed=0, progress=False)
        args.test_data = f"{tmp}/test"
        models = {"random tiny": build_model("tiny")}
    else:
        models = {spec: load_model(spec, map_location="cpu")[0] for spec in args.models}
    kernels_dir = Path(args.test_data) / "kernels"
    if not kernels_dir.is_dir():
        raise SystemExit(f"{args.test_data}: no kernels/ folder (a synthesize() test split has)")
    results: dict[str, dict] = {}
    blurred_psnr, n_images = None, 0  # the same for every model: the split's
    for spec, model in models.items():
        scores = test_scores(model.eval(), args.test_data)
        rows = scores["per_image"]
        blurred_psnr, n_images = scores["blurred_psnr"], len(rows)
        sides = [np.load(kernels_dir / f"{Path(r['name']).stem}.npy").shape[0] for r in rows]
        gains = [r["psnr"] - r["blurred_psnr"] for r in rows]
        bands = {}
        for lo, hi in BANDS:
            band = [g for g, k in zip(gains, sides, strict=True) if lo <= k <= hi]
            if band:
                bands[f"{lo}-{hi}"] = {"n": len(band), "gain_db": statistics.fmean(band)}
        results[spec] = {
            "psnr_db": scores["psnr"],
            "ssim": scores["ssim"],
            "gain_db": scores["gain_db"],
            "median_gain_db": statistics.median(gains),
            "images_worse": sum(g < 0 for g in gains),
            "gain_by_psf_side": bands,
            "sharp_in_psnr_db": scores["sharp_in_psnr"],
            "sharp_in_min_psnr_db": min(r["sharp_in_psnr"] for r in rows),
        }
    return {
        "config": {"test_data": str(args.test_data), "n_images": n_images, "bands": BANDS},
        "blurred_psnr_db": blurred_psnr,
        "models": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = _common.parser(__doc__.splitlines()[0], "by_kernel")
    ap.add_argument("--models", nargs="+", default=[DEFAULT_MODEL],
                    help="anything predict --model takes")  # fmt: skip
    ap.add_argument("--test_data", default="data/pretrain/test")
    return _common.run_script(ap, argv, run)


if __name__ == "__main__":
    raise SystemExit(main())
