"""Figures only the notebooks draw: kernels, histograms, grouped bars; and inline display.

The figures of a training run (curves, blurred/restored/sharp grids) are
``deblur_lib.train.figures``; they are re-exported here so a notebook imports its figures from
one place. Importing this module inside IPython/Jupyter registers a PNG formatter, so a
returned ``Figure`` is shown inline. Images: model-space tensors (3, H, W) in [-1, 1] or
metric-space arrays (H, W, 3) in [0, 1] (``to_display``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from deblur_lib.train.figures import figure_png, image_grid, plot_curves, to_display

__all__ = [
    "figure_png",
    "histogram",
    "image_grid",
    "loss_grid",
    "pairs_and_kernels",
    "per_image_psnr",
    "plot_curves",
    "to_display",
]


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


def per_image_psnr(per_image, baseline: str) -> Figure:
    """Each method's PSNR gain over ``baseline`` (dB) per test image, images sorted by the first
    other method's gain; ``per_image``: ``classical.evaluate_methods``' long table (image,
    method, psnr). A dashed line marks each method's mean gain."""
    wide = per_image.pivot(index="image", columns="method", values="psnr")
    if baseline not in wide:
        raise ValueError(f"baseline {baseline!r} is not a method: {list(wide.columns)}")
    others = [m for m in dict.fromkeys(per_image.method) if m != baseline]
    gains = wide[others].sub(wide[baseline], axis=0).sort_values(others[0])
    fig = Figure(figsize=(8.0, 3.4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(gains))
    for i, method in enumerate(others):
        style = "o-" if i == 0 else "o"  # the sorting method as a line, the others as dots
        (line,) = ax.plot(x, gains[method], style, ms=3, lw=1, label=method)
        ax.axhline(gains[method].mean(), color=line.get_color(), ls="--", lw=0.8)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel(f"test image (sorted by {others[0]}'s gain)")
    ax.set_ylabel(f"PSNR gain over {baseline} (dB)")
    ax.legend(fontsize=7)
    return fig
