"""Figures of a training run: curves and blurred/restored/sharp grids, as PNG or ``Figure``.

``fit`` logs two PNGs to MLflow when a run ends (``curves_png``, ``triplets_png``); the
notebooks draw the same figures inline (``deblur_lib.notebook.plots`` re-exports them). Every
function builds a ``matplotlib.figure.Figure`` without pyplot (no global figure registry,
nothing to close; works headless and under torchrun, where rank 0 alone draws).

Images are accepted either as model-space torch tensors (3, H, W) in [-1, 1] or as
metric-space numpy arrays (H, W, 3) in [0, 1]; see :func:`to_display`. Curves take a
``History`` (metric key -> (steps, values) arrays): a NaN that was logged is drawn as a red
cross on the panel's lower edge (matplotlib would silently leave a gap), a value never logged
is a gap.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure, SubFigure
from matplotlib.ticker import MaxNLocator
from torch import nn

History = dict[str, tuple[np.ndarray, np.ndarray]]  # metric key -> (steps, values)
CURVE_KEYS = ("train_loss", "val_loss", "val_psnr", "val_ssim", "lr")  # a run's curves.png
SEED_GRAPHS = ("lr", "val_psnr", "val_ssim", "val_loss")  # the four graphs of the failed run
CURVE_TITLES = {
    "lr": "learning rate",
    "val_psnr": "val PSNR (dB)",
    "val_ssim": "val SSIM",
    "val_loss": "val loss",
    "train_loss": "train loss",
}


def to_display(image: object) -> np.ndarray:
    """Return a float (H, W, 3) array in [0, 1] for ``imshow``.

    A torch tensor (3, H, W) or (1, 3, H, W) is taken as model space [-1, 1] and
    denormalized; a numpy array (H, W, 3) is taken as metric space [0, 1]. Values are
    clipped; NaN pixels are shown black.
    """
    if hasattr(image, "detach"):
        t = image.detach().float().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"tensor image must be (3, H, W) model space, got {tuple(t.shape)}")
        arr = (t.numpy().transpose(1, 2, 0) + 1.0) / 2.0
    else:
        arr = np.asarray(image, dtype=np.float64)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"array image must be (H, W, 3) metric space, got {arr.shape}")
    return np.clip(np.nan_to_num(arr, nan=0.0), 0.0, 1.0)


def image_grid(
    columns: Mapping[str, Sequence[object]],
    row_labels: Sequence[str] | None = None,
    captions: Mapping[str, Sequence[str]] | None = None,
    size: float = 2.6,
) -> Figure:
    """A grid with one column per entry of ``columns`` (title -> images, one per row).

    ``captions[title][row]`` is printed under that image (e.g. its PSNR). All columns must
    have the same number of images.
    """
    lengths = {k: len(v) for k, v in columns.items()}
    if not columns or len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise ValueError(f"columns must be non-empty and of equal length, got {lengths}")
    n_rows, n_cols = next(iter(lengths.values())), len(columns)
    fig = Figure(figsize=(size * n_cols, size * n_rows), layout="constrained")
    axes = np.atleast_2d(fig.subplots(n_rows, n_cols, squeeze=False))
    for c, (title, images) in enumerate(columns.items()):
        for r, image in enumerate(images):
            ax = axes[r, c]
            ax.imshow(to_display(image), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=10)
            if captions and title in captions:
                ax.set_xlabel(captions[title][r], fontsize=9)
            if c == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[r], fontsize=9)
    return fig


def _with_gaps(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Insert a NaN after each jump in ``steps`` (an epoch never logged), so the line breaks
    there instead of joining across the missing epoch."""
    gaps = np.flatnonzero(np.diff(steps) > 1)
    filled = np.insert(values.astype(float), gaps + 1, np.nan)
    return np.insert(steps.astype(float), gaps + 1, steps[gaps] + 1.0), filled


def plot_curves(
    runs: Mapping[str, History],
    keys: Sequence[str] = SEED_GRAPHS,
    xlabel: str = "epoch",
    into: Figure | SubFigure | None = None,
) -> Figure | SubFigure:
    """One panel per metric key, one line per run (label -> ``History``: ``history_arrays``
    of a run, or ``notebook.runs.run_history`` of an MLflow run); drawn into ``into`` (a row
    of a larger figure) when given, else into a new figure.

    Non-finite (or |x| >= 1e300, MLflow's clamped inf) values are drawn as red crosses on
    the panel's lower edge and counted in the legend; a PSNR/SSIM of exactly 0.0 gets a hollow
    square (the value the seed's broad ``except`` logged).
    """
    fig = into if into is not None else Figure(figsize=(3.6 * len(keys), 3.0), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys, strict=True):
        for i, (label, history) in enumerate(runs.items()):
            steps, values = history.get(key, (np.array([]), np.array([])))
            bad = ~np.isfinite(values) | (np.abs(values) >= 1e300)
            good = np.where(bad, np.nan, values)
            style = ("-", "--", ":", "-.")[i % 4]
            (line,) = ax.plot(*_with_gaps(steps, good), style, marker="o", ms=3, label=label)
            zeros = values == 0.0
            if zeros.any() and ("psnr" in key or "ssim" in key):  # 0.0: the seed's failure value
                ax.plot(steps[zeros], values[zeros], "s", color=line.get_color(), mfc="none")
            if bad.any():
                ax.plot(
                    steps[bad],
                    np.zeros(int(bad.sum())),
                    "x",
                    color="red",
                    ms=8,
                    mew=2,
                    transform=ax.get_xaxis_transform(),
                    clip_on=False,
                    label=f"{label}: {int(bad.sum())} non-finite",
                )
            if not steps.size:
                line.set_label(f"{label}: never logged")
        if key == "lr":
            ax.set_yscale("log")
        ax.set_title(CURVE_TITLES.get(key, key), fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=7)
    return fig


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """PNG bytes of ``fig`` (what Jupyter shows)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(figure_png(fig, dpi=80))
    return path
