"""The two PNGs a finished run logs to MLflow: training curves and blur/restored/sharp triplets.

Drawn by ``deblur_lib.plots`` (the notebooks' figures: pyplot-free ``Figure`` objects, so they
work headless and under torchrun, where rank 0 alone calls these).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

CURVE_KEYS = ("train_loss", "val_loss", "val_psnr", "val_ssim", "lr")


def history_arrays(history: Sequence[Mapping[str, float]], keys=CURVE_KEYS) -> dict:
    """``fit``'s per-epoch records -> ``runs.History`` (key -> (epochs, values)); an epoch
    whose record lacks a key (an invalid validation, not logged) is left out of that key."""
    out = {}
    for key in keys:
        points = [(int(rec["epoch"]), float(rec[key])) for rec in history if key in rec]
        steps, values = zip(*points, strict=True) if points else ((), ())
        out[key] = (np.array(steps, dtype=np.int64), np.array(values, dtype=np.float64))
    return out


def curves_png(history: Sequence[Mapping[str, float]], path: str | Path, label="run") -> Path:
    """One panel per key of ``CURVE_KEYS`` over the epochs of ``history`` (gaps where an epoch
    was not logged, red crosses where a logged value was not finite: guards off)."""
    from deblur_lib.plots import plot_curves

    return _write(plot_curves({label: history_arrays(history)}, keys=CURVE_KEYS), path)


@torch.inference_mode()
def triplets_png(
    model: nn.Module,
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    path: str | Path,
    device: torch.device | str = "cpu",
) -> Path:
    """One row per (blur, sharp) pair of model-space (3, H, W) tensors: blurred input, the
    model's restoration, sharp target, at full size."""
    from deblur_lib.plots import image_grid

    if not pairs:
        raise ValueError("triplets_png needs at least one (blur, sharp) pair")
    was_training = model.training
    model.eval()
    try:
        restored = [model(b[None].to(device))[0].float().cpu() for b, _ in pairs]
    finally:
        model.train(was_training)
    columns = {
        "blurred": [b for b, _ in pairs],
        "restored": restored,
        "sharp": [s for _, s in pairs],
    }
    return _write(image_grid(columns), path)


def _write(fig, path: str | Path) -> Path:
    from deblur_lib.plots import figure_png

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(figure_png(fig, dpi=80))
    return path
