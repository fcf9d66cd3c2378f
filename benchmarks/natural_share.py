"""Benchmark: how much of the generated training data should be photo crops (issue 12, item 3).

    python benchmarks/natural_share.py --start runs/pretrain/last.pt   # stage 1 of make pretrain
    python benchmarks/natural_share.py --shares 0.3 0.8 --steps 300   # from the shipped weights

A probe, cheaper than a run from scratch per share: for each ``--shares`` value S the
``--start`` weights (anything ``predict --model`` takes) are fine-tuned for ``--steps`` steps
of the training loop's own step
(``Trainer._train_step``: guards on, fused AdamW at a constant ``--lr``, channels_last, fp32;
the loss is ``TrainConfig``'s default 0.84 (1 - MS-SSIM) + 0.16 Charbonnier, not the
recipe's 0.16 + 0.84) on
``SyntheticPairs(128 px, natural_share=S)`` from a seed that neither ``make pretrain`` (1, 2) nor
the test split (0) uses, batch 8, one DataLoader worker; then every image of the test split is
restored whole. Reported per share: mean PSNR / SSIM, the mean gain over the blurred input, the
images the model makes worse and the three worst (``train.export.test_scores``: what the
model card reports), and the model's PSNR on the sharp images themselves (``sharp_in``).
All shares start from the same weights and see the same scenes where their draws agree.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence

import _common  # first: puts the repo on sys.path when run as a script
import torch
from torch.utils.data import DataLoader

from deblur_lib.data import PairedImageFolder
from deblur_lib.models import (
    DEFAULT_MODEL,
    MODEL_PRESETS,
    architecture,
    network_of,
    preset_architecture,
)
from deblur_lib.synth import SyntheticPairs, synthesize
from deblur_lib.train.export import test_scores
from deblur_lib.weights import load_model

PROBE_SEED = 77  # a generator stream no training run or test split of this repo uses


def run(args) -> dict:
    dev = torch.device(args.device)
    preset, start = None, args.start
    if args.quick:  # smoke sizes: a random tiny model on a split of its own
        tmp = tempfile.mkdtemp(prefix="bench_natural_share_")
        synthesize(tmp, n_train=1, n_test=2, size=48, seed=0, progress=False)
        args.test_data, args.steps, args.crop, args.shares = f"{tmp}/test", 2, 32, [0.0, 1.0]
        preset, start = "tiny", None
    initial = load_model(start, map_location=dev)[0] if start is not None else None
    if initial is not None:  # the harness builds a preset: find the one that fits
        arch = network_of(architecture(initial))
        fits = [p for p in MODEL_PRESETS if network_of(preset_architecture(p)) == arch]
        if not fits:
            raise SystemExit(f"--start {start}: architecture {arch} is no preset's")
        preset = fits[0]
    n_images = len(PairedImageFolder(args.test_data))
    if n_images == 0:
        raise SystemExit(f"{args.test_data}: no test pairs")
    blurred_psnr = None  # the same for every share: the blurred input against the sharp one
    step, origin = _common.train_py_step()
    results: dict[str, dict] = {}
    for share in args.shares:
        h = _common.step_harness(preset, dev, guarded=True, channels_last=True)
        if initial is not None:
            h.model.load_state_dict(initial.state_dict())
        for group in h.optimizer.param_groups:
            group["lr"] = args.lr
        data = SyntheticPairs(
            args.crop, args.steps * args.batch, PROBE_SEED, natural_share=share
        )  # fmt: skip
        loader = DataLoader(data, batch_size=args.batch, num_workers=0 if args.quick else 1)
        h.model.train()
        t0 = time.perf_counter()
        for blur, sharp in loader:
            step(h, blur, sharp, h.acc)
        train_s = time.perf_counter() - t0
        skipped = int(h.guard.read()["skipped_total"])
        scores = test_scores(h.model, args.test_data)  # what the model card reports
        blurred_psnr = scores["blurred_psnr"]
        gains = {r["name"]: r["psnr"] - r["blurred_psnr"] for r in scores["per_image"]}
        results[str(share)] = {
            "psnr_db": scores["psnr"],
            "ssim": scores["ssim"],
            "gain_db": scores["gain_db"],
            "sharp_in_psnr_db": scores["sharp_in_psnr"],
            "images_worse": sum(g < 0 for g in gains.values()),
            "worst": dict(sorted(gains.items(), key=lambda kv: kv[1])[:3]),
            "skipped_steps": skipped,
            "train_s": train_s,
        }
    # the starting weights themselves, for reference
    before = test_scores(initial, args.test_data) if initial is not None else None
    return {
        "config": {
            "start": start or "random tiny",
            "steps": args.steps,
            "batch": args.batch,
            "crop": args.crop,
            "lr": args.lr,
            "probe_seed": PROBE_SEED,
            "step_code": origin + " (guards on)",
            "test_data": str(args.test_data),
            "n_images": n_images,
        },
        "blurred_psnr_db": blurred_psnr,
        "start_gain_db": before["gain_db"] if before else None,
        "shares": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = _common.parser(__doc__.splitlines()[0], "natural_share")
    ap.add_argument("--start", default=DEFAULT_MODEL, help="weights to fine-tune (predict --model)")
    ap.add_argument("--shares", type=float, nargs="+", default=[0.3, 0.7, 1.0])
    ap.add_argument("--steps", type=int, default=600, help="fine-tuning steps per share")
    ap.add_argument("--lr", type=float, default=2e-4, help="constant AdamW learning rate")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128, help="px")
    ap.add_argument("--test_data", default="data/pretrain/test")
    return _common.run_script(ap, argv, run)


if __name__ == "__main__":
    raise SystemExit(main())
