"""Benchmark: inference seconds per image and peak memory, whole images vs tiles (issue 13).

    python benchmarks/predict.py                  # CPU: small preset, 1280x720, whole vs --tile 256
    python benchmarks/predict.py --device cuda    # the same on the GPU (bf16 + channels_last)
    python benchmarks/predict.py --quick          # smoke test (tiny preset, small images)

Each variant calls ``deblur_lib.predict.deblur`` on uint8 (H, W, 3) NumPy images (so the
figures include the conversions the CLI makes, not file decoding): ``whole`` (no tiling, no
memory budget) and ``tile_<SIZE>`` (``--tile``, ``--tile_overlap``). The model is the preset
with random weights (the speed and memory of a trained one are the same). Images are timed
one at a time, the variants interleaved and rotated, after one warm-up image each;
s/image is the median.

Peak memory per variant, measured after the timing (one image each): on CUDA
``torch.cuda.max_memory_allocated`` (tensors); on the CPU the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs) with glibc told to return large blocks to the
OS, so each variant starts from a clean heap. ``peak_delta_mib`` is the rise over what was
in use at the reset; ``estimate_mib`` is ``predict.estimate_memory_mb`` for one forward (the
whole image or one tile), to check the estimate the automatic tiling relies on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import statistics
from collections.abc import Sequence

import _common  # first: puts the repo on sys.path when run as a script
import numpy as np
import torch

from deblur_lib.models import build_model
from deblur_lib.predict import deblur, plan_tiling
from deblur_lib.train.build import configure_backends


def _glibc_return_large_blocks() -> bool:
    """Make glibc hand freed blocks >= 128 KiB back to the OS and trim the heap now (as
    benchmarks/throughput.py), so a VmHWM reset starts from what is in use. False off glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(-3, 128 * 1024) == 1  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


def _images(n: int, h: int, w: int) -> list[np.ndarray]:
    """Smooth random uint8 photos (bicubic-upsampled noise), seeded."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand((n, 3, max(h // 16, 2), max(w // 16, 2)), generator=g)
    up = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic").clamp(0, 1)
    return [(im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for im in up]


def run(args) -> dict:
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.preset).to(dev).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    w, h = args.size
    images = _images(args.images, h, w)
    variants = {
        "whole": {"tile": None, "max_memory_mb": math.inf},
        f"tile_{args.tile}": {"tile": args.tile, "tile_overlap": args.tile_overlap},
    }
    for kw in variants.values():
        deblur(model, images[0], device=dev, **kw)  # warm-up
    times: dict[str, list[float]] = {n: [] for n in variants}
    names = list(variants)
    for i, img in enumerate(images):
        for n in names[i % 2 :] + names[: i % 2]:
            t = _common.timed(
                lambda n=n, img=img: deblur(model, img, device=dev, **variants[n]), dev
            )
            times[n].append(t)
    clean_heap = dev.type == "cpu" and _glibc_return_large_blocks()
    results = {}
    for n, kw in variants.items():
        plan = plan_tiling(model, h, w, tile=kw["tile"], tile_overlap=kw.get("tile_overlap", 32),
                           max_memory_mb=kw.get("max_memory_mb", math.inf))  # fmt: skip
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(dev) / 2**20
        else:
            if clean_heap:
                _glibc_return_large_blocks()
            base = _common.rss_mib()
        _common.reset_peak_memory(dev)
        deblur(model, images[0], device=dev, **kw)
        _common.sync(dev)
        peak = _common.peak_memory_mib(dev)
        results[n] = {
            "s_per_image": statistics.median(times[n]),
            "images_per_s": 1 / statistics.median(times[n]),
            **_common.summary(times[n]),
            "tile": list(plan.tile) if plan.tile else None,
            "tiles_per_batch": plan.batch,
            "estimate_mib": plan.estimate_mb,
            "peak_mib": peak,
            "peak_delta_mib": None if base is None or peak is None else peak - base,
        }
    whole, tiled = (results[n]["s_per_image"] for n in names)
    return {
        "config": {
            "preset": args.preset,
            "width": model.width,
            "size_wh": [w, h],
            "images": args.images,
            "tile": args.tile,
            "tile_overlap": args.tile_overlap,
            "amp_bf16": dev.type == "cuda",
            "channels_last": dev.type == "cuda",
            "input": "uint8 (H, W, 3) NumPy through deblur_lib.predict.deblur",
            "memory": (
                "torch.cuda.max_memory_allocated; delta over memory_allocated at the reset"
                if dev.type == "cuda"
                else "VmHWM after clear_refs reset"
                + (", glibc mmap threshold 128 KiB + malloc_trim" if clean_heap else "")
            ),
        },
        "variants": results,
        "tiled_vs_whole_time": tiled / whole,
    }


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def main(argv: Sequence[str] | None = None) -> int:
    ap = _common.parser(__doc__.splitlines()[0], "predict")
    ap.add_argument("--preset", default=None, help="model preset (default: small)")
    ap.add_argument("--size", type=_size, default=None, help="WxH px (default 1280x720)")
    ap.add_argument("--images", type=int, default=None, help="timed images (default 6)")
    ap.add_argument("--tile", type=int, default=None, help="tile px (default 256)")
    ap.add_argument("--tile_overlap", type=int, default=None, help="px (default 32)")
    args = _common.setup(ap, argv)
    if args.quick:
        defaults = {"preset": "tiny", "size": (96, 64), "images": 2, "tile": 48, "tile_overlap": 8}
    else:
        defaults = {"preset": "small", "size": (1280, 720), "images": 6, "tile": 256}
        defaults["tile_overlap"] = 32
    _common.fill_defaults(args, defaults)
    configure_backends(torch.device(args.device))
    _common.write(args, run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
