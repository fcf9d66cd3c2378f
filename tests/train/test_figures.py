"""figures: the PNGs a finished run logs (curves, blurred/restored/sharp triplets)."""

from __future__ import annotations

import pytest
import torch

from deblur_lib.models import build_model
from deblur_lib.train import figures


def test_figures_are_pngs(tmp_path):
    history = [
        {"epoch": 0, "train_loss": 0.3, "lr": 1e-3, "val_psnr": 20.0, "val_ssim": 0.5},
        {"epoch": 1, "train_loss": 0.2, "lr": 1e-3},  # an invalid epoch: nothing logged
    ]
    arrays = figures.history_arrays(history)
    assert arrays["val_psnr"][0].tolist() == [0] and arrays["val_loss"][0].size == 0
    curves = figures.curves_png(history, tmp_path / "c.png")
    pairs = [(torch.zeros(3, 20, 30), torch.ones(3, 20, 30))] * 2
    triplets = figures.triplets_png(build_model("tiny"), pairs, tmp_path / "t.png")
    for path in (curves, triplets):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="at least one"):
        figures.triplets_png(build_model("tiny"), [], tmp_path / "x.png")
