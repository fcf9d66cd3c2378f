"""Benchmark: the guarded loss vs the seed's losses; batched metrics vs a scikit-image loop.

    python benchmarks/loss_metrics.py [--device cpu|cuda] [--out PATH] [--threads N] [--quick]

1. Loss forward+backward on the same (8, 3, 256, 256) model-space batch, in one run:
   ``CombinedLoss`` (ours), ``SeedCombinedLoss`` (stock pytorch_msssim + Charbonnier, no guard)
   and ``SeedGuardedLoss`` (the seed's fix 1: Python NaN checks, try/except). Interleaved (one
   sample of each per round, order rotated every round) so that load changes hit all alike;
   a sample is ``--block`` back-to-back calls synced only at its ends (10 on CUDA), so a host
   sync inside a loss costs what it costs in training; medians over ``--iters`` (>= 50) rounds
   after warm-up. Target: ours <= 1.05x stock on CPU.
2. Metrics on a (32, 3, 256, 256) metric-space batch: ``psnr`` + ``ssim`` vs a per-image loop of
   ``peak_signal_noise_ratio`` + ``structural_similarity`` (the parity settings), the loop
   including the tensor -> HWC numpy conversion. Target: >= 2x on 2 CPU cores (>= 100x on a
   GPU). On CPU also measured with 1 torch thread (scikit-image uses one core either way).

Writes JSON (default benchmarks/results/loss_metrics[.cuda].json) and prints it. Figures from a
machine whose load average exceeds its core count are flagged ``machine.noisy``: rerun them.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import _common  # first: puts the repo on sys.path when run from a bare checkout
import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from deblur_lib.losses import CombinedLoss
from deblur_lib.metrics import psnr, ssim
from deblur_lib.train.legacy import SeedCombinedLoss, SeedGuardedLoss

LOSS_SHAPE = (8, 3, 256, 256)  # a training batch of 256 px crops (MS-SSIM at full 5 scales)
METRIC_SHAPE = (32, 3, 256, 256)  # a validation batch
QUICK_LOSS_SHAPE, QUICK_METRIC_SHAPE = (2, 3, 176, 176), (4, 3, 64, 64)
WARMUP = 3  # untimed rounds


def _images(shape: Sequence[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth textured 'sharp' images in [0, 1] and a blurred, noisy 'restoration' of them."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    coarse = torch.rand((n, c, h // 8, w // 8), generator=g)
    sharp = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    sharp = (sharp + 0.05 * torch.rand(tuple(shape), generator=g)).clamp(0, 1)
    restored = F.avg_pool2d(sharp, 3, 1, 1, count_include_pad=False)
    restored = (restored + 0.02 * torch.randn(tuple(shape), generator=g)).clamp(0, 1)
    return restored, sharp


def bench_loss(
    device: torch.device, shape: Sequence[int], iters: int, block: int
) -> dict[str, Any]:
    pred01, target01 = _images(shape, seed=0)
    pred0, target = (pred01 * 2 - 1).to(device), (target01 * 2 - 1).to(device)
    losses = {
        "guarded_combined": CombinedLoss(),
        "stock_seed_combined": SeedCombinedLoss(),
        "seed_guarded": SeedGuardedLoss(),
    }
    names = list(losses)
    times: dict[str, list[float]] = {k: [] for k in names}
    values: dict[str, float] = {}

    def step(name: str) -> None:
        pred = pred0.clone().requires_grad_(True)
        loss = losses[name](pred, target)
        loss.backward()
        values[name] = loss.detach()

    for it in range(WARMUP + iters):
        for name in names[it % 3 :] + names[: it % 3]:  # rotate the order every round
            t = _common.timed_block(lambda name=name: step(name), device, block)
            if it >= WARMUP:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "shape": list(shape),
        "iterations": iters,
        "calls_per_sample": block,
        "loss_values": {k: float(v) for k, v in values.items()},
        "time": {k: _common.summary(v) for k, v in times.items()},
        "ratio_guarded_vs_stock": med["guarded_combined"] / med["stock_seed_combined"],
        "ratio_seed_guarded_vs_stock": med["seed_guarded"] / med["stock_seed_combined"],
    }


def _skimage_loop(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    p = pred.detach().cpu().permute(0, 2, 3, 1).numpy()
    t = target.detach().cpu().permute(0, 2, 3, 1).numpy()
    ps, ss = [], []
    for a, b in zip(p, t, strict=True):
        ps.append(peak_signal_noise_ratio(b, a, data_range=1.0))
        ss.append(
            structural_similarity(
                b, a, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                data_range=1.0, channel_axis=-1,
            )
        )  # fmt: skip
    return float(np.mean(ps)), float(np.mean(ss))


def bench_metrics(
    device: torch.device, shape: Sequence[int], iters: int, threads: int
) -> dict[str, Any]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    pred, target = _images(shape, seed=1)
    pred_d, target_d = pred.to(device), target.to(device)
    times: dict[str, list[float]] = {"batched": [], "skimage_loop": []}
    out: dict[str, Any] = {}

    def batched() -> None:
        out["ours"] = (psnr(pred_d, target_d), ssim(pred_d, target_d))

    def loop() -> None:
        out["skimage"] = _skimage_loop(pred, target)

    for it in range(WARMUP + iters):
        t_ours = _common.timed(batched, device)
        t_sk = _common.timed(loop, device)
        if it >= WARMUP:
            times["batched"].append(t_ours)
            times["skimage_loop"].append(t_sk)
    torch.set_num_threads(previous)
    med = {k: statistics.median(v) for k, v in times.items()}
    p, s = out["ours"]
    return {
        "shape": list(shape),
        "torch_threads": threads,
        "iterations": iters,
        "time": {k: _common.summary(v) for k, v in times.items()},
        "speedup_vs_skimage": med["skimage_loop"] / med["batched"],
        "abs_diff_vs_skimage": {
            "psnr_db": abs(float(p.mean()) - out["skimage"][0]),
            "ssim": abs(float(s.mean()) - out["skimage"][1]),
        },
    }


def run(args: Any) -> dict[str, Any]:
    device = torch.device(args.device)
    loss_shape = QUICK_LOSS_SHAPE if args.quick else LOSS_SHAPE
    metric_shape = QUICK_METRIC_SHAPE if args.quick else METRIC_SHAPE
    iters, metric_iters = (3, 2) if args.quick else (args.iters, args.metric_iters)
    threads = torch.get_num_threads()
    loss = bench_loss(device, loss_shape, iters, args.block)
    metrics = bench_metrics(device, metric_shape, metric_iters, threads)
    on_gpu = device.type == "cuda"
    metrics_1 = (
        None if on_gpu or threads == 1 else bench_metrics(device, metric_shape, metric_iters, 1)
    )
    speedup_min = 100.0 if on_gpu else 2.0
    return {
        "loss_forward_backward": loss,
        "metrics_psnr_ssim": metrics,
        "metrics_psnr_ssim_1_thread": metrics_1,
        "target": {
            "guarded_loss_ratio_max": None if on_gpu else 1.05,
            "guarded_loss_ratio_met": None if on_gpu else loss["ratio_guarded_vs_stock"] <= 1.05,
            "metrics_speedup_min": speedup_min,
            "metrics_speedup_met": metrics["speedup_vs_skimage"] >= speedup_min,
            "metrics_speedup_1_thread_met": None
            if metrics_1 is None
            else metrics_1["speedup_vs_skimage"] >= speedup_min,
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = _common.parser(__doc__.splitlines()[0], "loss_metrics")
    ap.add_argument("--iters", type=int, default=50, help="timed loss rounds (>= 50 for figures)")
    ap.add_argument("--metric_iters", type=int, default=15, help="timed metric rounds")
    return _common.run_script(ap, argv, run)


if __name__ == "__main__":
    raise SystemExit(main())
