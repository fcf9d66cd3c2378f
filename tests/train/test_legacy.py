"""Tests for deblur_lib.legacy: the seed's code keeps its documented (bad) behaviour."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import deblur_lib.train.legacy as legacy
from deblur_lib.metrics import calculate_metrics
from deblur_lib.train.legacy import (
    SeedCharbonnierLoss,
    SeedCombinedLoss,
    SeedGuardedLoss,
    seed_calculate_metrics,
    seed_calculate_metrics_missing_import,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Model-space (n, 3, size, size) textured target and a noisy prediction."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 4, size // 4, generator=g)
    target = F.interpolate(coarse, size=(size, size), mode="bilinear") * 2 - 1
    pred = (target + 0.1 * torch.randn(target.shape, generator=g)).clamp(-1, 1)
    return pred, target


def _forbid(*_args, **_kwargs):
    raise RuntimeError("host-device sync in a hot path")


def test_seed_combined_loss_formula() -> None:
    pred, target = _pair(2, 176)
    ms = ms_ssim((pred + 1) / 2, (target + 1) / 2, data_range=1.0)
    charb = torch.sqrt((pred - target) ** 2 + 1e-6).mean()
    expected = 0.84 * (1 - ms) + 0.16 * charb
    torch.testing.assert_close(SeedCombinedLoss()(pred, target), expected)
    torch.testing.assert_close(SeedCharbonnierLoss()(pred, target), charb)


def test_seed_combined_loss_crashes_on_128px_crops() -> None:
    pred, target = _pair(2, 128)
    with pytest.raises(AssertionError, match="larger than 160"):
        SeedCombinedLoss()(pred, target)


def test_seed_combined_loss_one_nan_pixel_makes_the_batch_loss_nan() -> None:
    pred, target = _pair(4, 176)
    pred[2, 0, 10, 10] = float("nan")
    assert torch.isnan(SeedCombinedLoss()(pred, target))


def test_seed_guarded_falls_back_for_the_whole_batch_on_small_crops(caplog) -> None:
    pred, target = _pair(2, 128)
    loss_fn = SeedGuardedLoss()
    with caplog.at_level(logging.WARNING, logger="deblur_lib.legacy"):
        value = loss_fn(pred, target)
    torch.testing.assert_close(value, SeedCharbonnierLoss()(pred, target))
    assert loss_fn.fallbacks == 1 and "AssertionError" in caplog.text


def test_seed_guarded_equals_seed_loss_when_nothing_fails() -> None:
    pred, target = _pair(2, 176)
    loss_fn = SeedGuardedLoss()
    torch.testing.assert_close(loss_fn(pred, target), SeedCombinedLoss()(pred, target))
    assert loss_fn.fallbacks == 0


def test_seed_guarded_fallback_cannot_rescue_a_nan_prediction() -> None:
    pred, target = _pair(3, 176)
    pred[0, 1, 2, 3] = float("nan")
    loss_fn = SeedGuardedLoss()
    p = pred.clone().requires_grad_(True)
    value = loss_fn(p, target)
    value.backward()
    assert loss_fn.fallbacks == 1
    assert torch.isnan(value)  # the whole batch got Charbonnier, which is NaN as well
    assert not torch.isfinite(p.grad).all()


def test_seed_guarded_misses_the_tiny_cs_gradient() -> None:
    """A finite but diverged prediction: MS-SSIM is finite, so no fallback; its gradient is not."""
    pred = (torch.rand(1, 3, 176, 176, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 3e19
    target = -torch.ones(1, 3, 176, 176)
    loss_fn = SeedGuardedLoss()
    p = pred.clone().requires_grad_(True)
    value = loss_fn(p, target)
    value.backward()
    assert loss_fn.fallbacks == 0 and not torch.isfinite(p.grad).all()


def test_seed_guarded_syncs_and_hides_programming_errors(monkeypatch) -> None:
    pred, target = _pair(1, 176)
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "__bool__", _forbid)
        with pytest.raises(RuntimeError, match="sync"):  # `if torch.isnan(x).any()` syncs
            SeedGuardedLoss()(pred, target)

    def broken(*_args, **_kwargs):
        raise NameError("name 'F' is not defined")

    monkeypatch.setattr(legacy, "ms_ssim", broken)
    loss_fn = SeedGuardedLoss()
    loss_fn(pred, target)  # a bug in our own code, silently "handled"
    assert loss_fn.fallbacks == 1


def test_seed_metrics_match_skimage_defaults() -> None:
    pred, target = _pair(3, 48)
    a = ((pred + 1) / 2).permute(0, 2, 3, 1).numpy()
    b = ((target + 1) / 2).permute(0, 2, 3, 1).numpy()
    ref_p = np.mean(
        [peak_signal_noise_ratio(y, x, data_range=1.0) for x, y in zip(a, b, strict=True)]
    )
    ref_s = np.mean(
        [
            structural_similarity(y, x, data_range=1.0, channel_axis=2)
            for x, y in zip(a, b, strict=True)
        ]
    )
    p, s = seed_calculate_metrics(pred, target)
    assert p == pytest.approx(ref_p, abs=1e-9) and s == pytest.approx(ref_s, abs=1e-9)


@pytest.mark.parametrize(
    ("outputs", "targets", "hidden"),
    [
        (*_pair(2, 6), "win_size exceeds image extent"),
        (torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 16, 12), "ValueError"),
    ],
    ids=["image_smaller_than_window", "shape_mismatch"],
)
def test_seed_metrics_turn_errors_into_zero(outputs, targets, hidden: str, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="deblur_lib.legacy"):
        assert seed_calculate_metrics(outputs, targets) == (0.0, 0.0)
    assert hidden in caplog.text


def test_seed_metrics_report_inf_for_a_perfect_result() -> None:
    _, target = _pair(1, 32)
    with np.errstate(divide="ignore"):
        p, s = seed_calculate_metrics(target, target)
    assert p == float("inf") and s == pytest.approx(1.0)


def test_missing_import_is_swallowed_as_zero_metrics(caplog) -> None:
    pred, target = _pair(2, 32)
    with caplog.at_level(logging.WARNING, logger="deblur_lib.legacy"):
        assert seed_calculate_metrics_missing_import(pred, target) == (0.0, 0.0)
    assert "NameError: name 'np' is not defined" in caplog.text
    assert not hasattr(legacy, "np")  # the name really is unbound in that module
    p, s = calculate_metrics(pred, target)  # the same batch, measured properly
    assert p > 15 and 0 < s < 1
