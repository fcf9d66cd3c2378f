"""Figures: each builds without pyplot, validates its input and marks what it must mark."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from deblur_lib.notebook import plots
from deblur_lib.notebook.runs import History


def _img(seed: int = 0, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).random((size, size, 3))


def test_to_display_maps_model_space_tensors_and_metric_space_arrays():
    t = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    np.testing.assert_allclose(plots.to_display(t)[0, :, 0], [0.0, 0.5, 1.0, 1.0])
    arr = np.full((2, 2, 3), math.nan)
    assert (plots.to_display(arr) == 0).all()
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        plots.to_display(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        plots.to_display(np.zeros((4, 4)))


def test_image_grid_shape_titles_and_captions():
    fig = plots.image_grid(
        {"a": [_img(0), _img(1)], "b": [torch.zeros(3, 16, 16), _img(2)]},
        row_labels=["r0", "r1"],
        captions={"a": ["1 dB", "2 dB"]},
    )
    axes = fig.get_axes()
    assert isinstance(fig, Figure) and len(axes) == 4
    assert axes[0].get_title() == "a" and axes[0].get_xlabel() == "1 dB"
    with pytest.raises(ValueError, match="equal length"):
        plots.image_grid({"a": [_img()], "b": []})


def test_pairs_and_kernels_and_histogram():
    kernel = np.eye(5) / 5
    fig = plots.pairs_and_kernels([_img()], [_img(1)], [kernel], names=["0000"])
    assert len(fig.get_axes()) == 3 and fig.get_axes()[2].get_xlabel() == "5 x 5 px"
    with pytest.raises(ValueError, match="as many"):
        plots.pairs_and_kernels([_img()], [], [kernel])
    hist = plots.histogram([1.0, 2.0, math.nan], "dB")
    assert "mean 1.50" in hist.get_axes()[0].get_legend().get_texts()[0].get_text()
    with pytest.raises(ValueError, match="finite"):
        plots.histogram([math.nan], "dB")


def test_plot_curves_marks_nonfinite_and_never_logged():
    history: History = {
        "lr": (np.array([0, 1, 2]), np.array([2e-3, 2e-3, 2e-4])),
        "val_psnr": (np.array([0, 1, 2]), np.array([20.0, math.nan, 1.8e308])),
        "val_ssim": (np.array([], dtype=np.int64), np.array([])),
        "val_loss": (np.array([0, 1, 2]), np.array([0.2, 0.1, 0.0])),
    }
    fig = plots.plot_curves({"run": history})
    lr, psnr, ssim, _ = fig.get_axes()
    assert lr.get_yscale() == "log"
    labels = [t.get_text() for t in psnr.get_legend().get_texts()]
    assert "run: 2 non-finite" in labels
    assert "run: never logged" in [t.get_text() for t in ssim.get_legend().get_texts()]


def test_loss_grid_writes_nonfinite_values_as_text():
    fig = plots.loss_grid({"stock": [0.1, math.nan], "ours": [0.1, 0.2]}, ["64", "128"], "t")
    texts = [t.get_text() for t in fig.get_axes()[0].texts]
    assert texts == ["nan"]


def test_figure_png_is_a_png():
    assert plots.figure_png(plots.image_grid({"a": [_img()]})).startswith(b"\x89PNG")


def test_plot_curves_breaks_the_line_at_an_epoch_never_logged():
    """An invalid epoch is not logged; the curve must show a gap there, not join across it."""
    history: History = {"val_psnr": (np.array([0, 1, 3, 4]), np.array([20.0, 21.0, 22.0, 23.0]))}
    fig = plots.plot_curves({"run": history}, keys=("val_psnr",))
    (line,) = fig.get_axes()[0].get_lines()[:1]
    x, y = line.get_xdata(), line.get_ydata()
    assert list(x) == [0, 1, 2, 3, 4]
    assert np.isnan(y[2]) and np.isfinite(np.delete(y, 2)).all()
