"""Figures for the notebooks: image grids, kernels, histograms and curves read from MLflow.

Every function returns a ``matplotlib.figure.Figure`` built without pyplot (no global figure
registry, nothing to close) and never calls ``plt.show()``; importing this module inside
IPython/Jupyter registers a PNG formatter so a returned figure is shown inline.

Images are accepted either as model-space torch tensors (3, H, W) in [-1, 1] or as
metric-space numpy arrays (H, W, 3) in [0, 1]; see :func:`to_display`.

MLflow curves come from the run itself (``deblur_lib.runs.run_history``), so a figure shows
exactly what the tracking server stored: a NaN that was logged is drawn as a red cross on the
panel's lower edge (matplotlib would silently leave a gap), a value never logged is a gap.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from deblur_lib.runs import History

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


def pairs_and_kernels(
    blurs: Sequence[np.ndarray],
    sharps: Sequence[np.ndarray],
    kernels: Sequence[np.ndarray],
    names: Sequence[str] | None = None,
) -> Figure:
    """One row per pair: blurred, sharp, and the camera-shake kernel (metric space images)."""
    n = len(blurs)
    if not n == len(sharps) == len(kernels):
        raise ValueError(
            f"need as many sharps/kernels as blurs: {n}, {len(sharps)}, {len(kernels)}"
        )
    fig = Figure(figsize=(7.5, 2.6 * n), layout="constrained")
    axes = fig.subplots(n, 3, squeeze=False)
    for r in range(n):
        axes[r, 0].imshow(to_display(blurs[r]))
        axes[r, 1].imshow(to_display(sharps[r]))
        axes[r, 2].imshow(kernels[r], cmap="magma", interpolation="nearest")
        axes[r, 2].set_xlabel(f"{kernels[r].shape[0]} x {kernels[r].shape[1]} px", fontsize=9)
        if names is not None:
            axes[r, 0].set_ylabel(names[r], fontsize=9)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, title in zip(axes[0], ("blurred", "sharp", "kernel"), strict=True):
        ax.set_title(title, fontsize=10)
    return fig


def histogram(values: Sequence[float], xlabel: str, title: str = "", bins: int = 20) -> Figure:
    """A histogram of finite ``values`` with the mean marked."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        raise ValueError("histogram needs at least one finite value")
    fig = Figure(figsize=(5, 3), layout="constrained")
    ax = fig.subplots()
    ax.hist(arr, bins=min(bins, max(1, arr.size)), color="tab:blue", alpha=0.8)
    ax.axvline(arr.mean(), color="k", ls="--", label=f"mean {arr.mean():.2f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend()
    return fig


def _with_gaps(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Insert a NaN after each jump in ``steps`` (an epoch never logged), so the line breaks
    there instead of joining across the missing epoch."""
    gaps = np.flatnonzero(np.diff(steps) > 1)
    filled = np.insert(values.astype(float), gaps + 1, np.nan)
    return np.insert(steps.astype(float), gaps + 1, steps[gaps] + 1.0), filled


def plot_curves(
    runs: Mapping[str, History],
    keys: Sequence[str] = ("lr", "val_psnr", "val_ssim", "val_loss"),
    xlabel: str = "epoch",
) -> Figure:
    """One panel per metric key, one line per run (label -> ``runs.run_history`` output).

    Non-finite (or |x| >= 1e300, MLflow's clamped inf) values are drawn as red crosses on
    the panel's lower edge and counted in the legend; a PSNR/SSIM of exactly 0.0 gets a hollow
    square (the value the seed's broad ``except`` logged).
    """
    fig = Figure(figsize=(3.6 * len(keys), 3.0), layout="constrained")
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


def loss_grid(values: Mapping[str, Sequence[float]], xlabels: Sequence[str], title: str) -> Figure:
    """Grouped bars (label -> one value per x): e.g. loss of stock vs guarded MS-SSIM per case.

    Non-finite values are drawn as a red 'NaN'/'inf' text at the bar's position.
    """
    fig = Figure(figsize=(max(5.0, 1.3 * len(xlabels)), 3.2), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(values))
    for i, (label, vals) in enumerate(values.items()):
        xs = np.arange(len(xlabels)) + i * width
        arr = np.asarray(vals, dtype=np.float64)
        ax.bar(xs, np.where(np.isfinite(arr), arr, 0.0), width, label=label)
        for x, v in zip(xs, arr, strict=True):
            if not math.isfinite(v):
                ax.text(x, 0.0, str(v), color="red", ha="center", va="bottom", rotation=90)
    ax.set_xticks(np.arange(len(xlabels)) + 0.4 - width / 2, xlabels, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return fig


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """PNG bytes of ``fig`` (what Jupyter shows)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def _register_ipython_formatter() -> None:
    """Show pyplot-free Figures inline in IPython (pyplot's inline backend only does so once
    pyplot is imported)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        shell.display_formatter.formatters["image/png"].for_type(Figure, figure_png)


_register_ipython_formatter()
