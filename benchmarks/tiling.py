"""Benchmark: how much tiling changes a trained model's output, with and without TLC (issue 13).

    python benchmarks/tiling.py                          # the shipped weights, data/pretrain/test
    python benchmarks/tiling.py --model runs/pretrain/best.pt --tile 96

DeblurNet's channel attention averages each feature map over the whole input, so a tile's
output depends on the tile: tiled and whole outputs differ. ``predict.tiling_gap`` restores
every test image whole and in ``--tile`` px tiles (``--tile_overlap``, raised-cosine blending),
and reports per image the PSNR of the tiled output against the whole one (higher = closer)
and each one's PSNR against the sharp image; then again with TLC (``--tlc`` px: NAFNet's
test-time local converter, local instead of global averages; default 1.5x the training crop,
as NAFNet). The test split's images are 256 px, so ``--tile 128`` makes 3 x 3 tiles.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Sequence

import _common  # first: puts the repo on sys.path when run as a script

from deblur_lib.data import PairedImageFolder
from deblur_lib.models import DEFAULT_MODEL, ModelInfo, build_model
from deblur_lib.predict import tiling_gap
from deblur_lib.synth import synthesize
from deblur_lib.weights import load_model


def _means(gap: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.fmean(v) for k, v in gap.items()}


def run(args) -> dict:
    if args.quick:  # smoke sizes: a random tiny model on a split of its own
        tmp = tempfile.mkdtemp(prefix="bench_tiling_")
        synthesize(tmp, n_train=1, n_test=2, size=64, seed=0, progress=False)
        args.test_data, args.tile, args.tile_overlap = f"{tmp}/test", 32, 8
        model, info = build_model("tiny"), ModelInfo("random tiny", "random", {}, None, 32)
    else:
        model, info = load_model(args.model, map_location=args.device)
    pairs = PairedImageFolder(args.test_data)
    n = len(pairs)
    blurred, sharp = zip(*(pairs[i] for i in range(n)), strict=True)
    tlc = args.tlc or int(1.5 * (info.train_crop_size or 128))
    kw = {"tile": args.tile, "tile_overlap": args.tile_overlap, "device": args.device}
    plain = tiling_gap(model, blurred, sharp, **kw)
    local = tiling_gap(model, blurred, sharp, tlc=tlc, **kw)
    return {
        "config": {
            "model": args.model,
            "source": info.source,
            "test_data": str(args.test_data),
            "n_images": n,
            "tile": args.tile,
            "tile_overlap": args.tile_overlap,
            "tlc": tlc,
            "train_crop_size": info.train_crop_size,
        },  # fmt: skip
        "global_pooling": _means(plain),
        "tlc": _means(local),
        "per_image": {"global_pooling": plain, "tlc": local},
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = _common.parser(__doc__.splitlines()[0], "tiling")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="anything predict --model takes")
    ap.add_argument("--test_data", default="data/pretrain/test")
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--tile_overlap", type=int, default=32)
    ap.add_argument("--tlc", type=int, default=None, help="px (default 1.5x the training crop)")
    return _common.run_script(ap, argv, run)


if __name__ == "__main__":
    raise SystemExit(main())
