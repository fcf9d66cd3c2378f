"""Guarded training losses: Charbonnier, adaptive MS-SSIM and their per-sample combination.

All losses take *model space* tensors (N, C, H, W) in [-1, 1] (pred and target alike) and
never synchronise with the device: no ``.item()``, no ``bool(tensor)``, no Python branch on a
tensor value. Fallbacks are decided per sample with ``torch.where`` and counted in device-side
counters that ``CombinedLoss.read_stats()`` reads at the logging interval.

MS-SSIM scales (``msssim_scales``), with the smaller side ``n = min(H, W)`` and the 11 px window:
``L = max{l in 1..5 : n > 10 * 2 ** (l - 1)}`` (the stock library's ``n > 160`` test, generalised).

====================  =======================================================================
``n >= 161``          5-scale MS-SSIM, identical to ``pytorch_msssim.ms_ssim`` (data_range=1)
``21 <= n <= 160``    MS-SSIM on ``L`` = 2..4 scales, the first L standard weights rescaled
``11 <= n <= 20``     single-scale SSIM: loss = 1 - SSIM (in [0, 2])
``n <= 10``           Charbonnier (no window fits)
====================  =======================================================================

Each reduced mode warns once per ``MSSSIMLoss`` instance.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deblur_lib.metrics import WIN_SIZE, gaussian_window, ssim_cs

MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, as pytorch_msssim
CS_FLOOR = 1e-6
"""Below this, a scale's cs / SSIM value ``c`` enters MS-SSIM as ``CS_FLOOR ** w * c / CS_FLOOR``
(the chord of ``c ** w``) instead of ``c ** w``, whose slope ``w * c ** (w - 1)`` is infinite at
0 (the stock library's inf/NaN gradients). At and above the floor the value is exactly the stock
one, at or below 0 it is 0 as the stock relu gives; the slope stays under
``(1 + w) * CS_FLOOR ** (w - 1)``."""
_REDUCTIONS = ("mean", "none")
_INTERNAL_DIRS = (str(Path(torch.__file__).parent), str(Path(__file__)))


def _outside_stacklevel() -> int:
    """``warnings.warn`` stacklevel of the first frame outside this file and torch, so a
    warning names the line that called the loss, not ``torch/nn/modules/module.py``."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def _check(pred: Tensor, target: Tensor, reduction: str, who: str) -> None:
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        raise TypeError(
            f"{who}: expected tensors, got {type(pred).__name__}, {type(target).__name__}"
        )
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(
            f"{who}: expected pred and target of the same shape (N, C, H, W), got "
            f"{tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{who}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return per_sample
    return per_sample.mean(dtype=torch.float64).float()  # float64 sum: no overflow near 3e38


def msssim_scales(height: int, width: int, win_size: int = WIN_SIZE, max_scales: int = 5) -> int:
    """Number of MS-SSIM scales for an image: 2..5 MS-SSIM, 1 plain SSIM, 0 none (see module)."""
    n = min(height, width)
    return max(
        (k for k in range(1, max_scales + 1) if n > (win_size - 1) * 2 ** (k - 1)), default=0
    )


def _scale_weights(weights: tuple[float, ...], scales: int) -> list[float]:
    """The first ``scales`` weights, rescaled to the full set's sum (the published weights sum
    to 1.0001; keeping that sum keeps 5-scale values identical to pytorch_msssim)."""
    factor = sum(weights) / sum(weights[:scales])
    return [w * factor for w in weights[:scales]]


def floored_power(c: Tensor, w: float) -> Tensor:
    """``c ** w`` for ``c >= CS_FLOOR``, the chord ``CS_FLOOR ** w * c / CS_FLOOR`` below, 0 for
    ``c <= 0``: continuous, finite slope everywhere (stock: ``relu(c) ** w``, infinite slope)."""
    return c.clamp(min=CS_FLOOR) ** w * (c / CS_FLOOR).clamp(0, 1)


class CharbonnierLoss(nn.Module):
    """``mean(sqrt((pred - target) ** 2 + eps ** 2))`` in float32; "none" gives (N,) per sample.

    Computed as ``hypot(pred - target, eps)`` with a float64 mean: finite (value and gradient)
    for every finite input, where the textbook form overflows to inf beyond |diff| ~ 1.8e19.
    """

    def __init__(self, eps: float = 1e-3, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(
                f"CharbonnierLoss: reduction must be one of {_REDUCTIONS}, got {reduction!r}"
            )
        self.eps, self.reduction = eps, reduction

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        _check(pred, target, self.reduction, "CharbonnierLoss")
        diff = pred.float() - target.float()
        eps = torch.full((), self.eps, device=diff.device)  # a fill kernel, not a copy
        # hypot and a float64 mean: no overflow for |diff| > 1.8e19 (square) or > 1e33 (sum)
        per_sample = torch.hypot(diff, eps).flatten(1).mean(1, dtype=torch.float64).float()
        return _reduce(per_sample, self.reduction)


class MSSSIMLoss(nn.Module):
    """``1 - MS-SSIM`` of model-space tensors, in float32 even under autocast.

    pred, target: (N, C, H, W) in [-1, 1]; mapped to [0, 1] by ``(x.clamp(-1, 1) + 1) / 2`` and
    compared with ``data_range=1``. Returns a scalar ("mean") or (N,) ("none"), in [0, 1]
    (up to 2 in the single-scale SSIM mode). Finite value and gradient for every finite input
    (the clamp bounds every statistic; ``CS_FLOOR`` bounds the slopes); a NaN in a sample gives
    NaN for that sample only. Scales adapt to small images as described in the module docstring.
    """

    def __init__(
        self, reduction: str = "mean", weights: tuple[float, ...] = MSSSIM_WEIGHTS
    ) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(
                f"MSSSIMLoss: reduction must be one of {_REDUCTIONS}, got {reduction!r}"
            )
        self.reduction, self.weights = reduction, tuple(weights)
        self._charbonnier = CharbonnierLoss(reduction="none")
        self._warned: set[int] = set()

    def _warn_once(self, scales: int, shape: tuple[int, ...]) -> None:
        if scales == len(self.weights) or scales in self._warned:
            return
        self._warned.add(scales)
        size = f"{shape[-2]}x{shape[-1]} px"
        if scales == 0:
            what = f"no {WIN_SIZE}x{WIN_SIZE} window fits: using the Charbonnier loss instead"
        elif scales == 1:
            what = "using single-scale SSIM (1 - SSIM) instead of MS-SSIM"
        else:
            w = [round(x, 4) for x in _scale_weights(self.weights, scales)]
            what = f"using {scales} of {len(self.weights)} MS-SSIM scales, weights {w}"
        min_full = (WIN_SIZE - 1) * 2 ** (len(self.weights) - 1) + 1
        msg = f"MSSSIMLoss: {size} input is under {min_full} px; {what} (warned once)"
        warnings.warn(msg, stacklevel=_outside_stacklevel())

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        _check(pred, target, self.reduction, "MSSSIMLoss")
        scales = msssim_scales(*pred.shape[-2:], max_scales=len(self.weights))
        self._warn_once(scales, tuple(pred.shape))
        if scales == 0:
            return _reduce(self._charbonnier(pred, target), self.reduction)
        with torch.autocast(device_type=pred.device.type, enabled=False):
            x = (pred.float().clamp(-1, 1) + 1) / 2
            y = (target.float().clamp(-1, 1) + 1) / 2
            per_sample = 1 - self._msssim(x, y, scales)
        return _reduce(per_sample, self.reduction)

    def _msssim(self, x: Tensor, y: Tensor, scales: int) -> Tensor:
        """MS-SSIM (N,) of metric-space float32 x, y on ``scales`` scales (1: plain SSIM)."""
        win = gaussian_window(device=x.device)  # cached per device: no copy per call
        values = []
        for level in range(scales):
            ssim_c, cs = ssim_cs(x, y, 1.0, win)
            if level < scales - 1:
                values.append(cs)
                padding = [d % 2 for d in x.shape[-2:]]
                x = F.avg_pool2d(x, kernel_size=2, padding=padding)
                y = F.avg_pool2d(y, kernel_size=2, padding=padding)
        if scales == 1:
            return ssim_c.mean(1)
        values.append(ssim_c)
        result = None
        for c, w in zip(values, _scale_weights(self.weights, scales), strict=True):  # (N, C)
            term = floored_power(c, w)
            result = term if result is None else result * term
        return result.mean(1)


class CombinedLoss(nn.Module):
    """``alpha * (1 - MS-SSIM) + beta * Charbonnier`` per sample, mean over the batch.

    pred, target: (N, C, H, W) model space. A sample with a non-finite pixel in pred or target
    (or, defensively, a non-finite MS-SSIM term) uses Charbonnier alone (weight 1); its MS-SSIM
    branch is computed on zeros so no NaN can enter the backward pass through it. A NaN or inf
    *prediction* still gives a non-finite Charbonnier term: no loss can repair a broken model
    output, so the step guard must skip that step (this loss counts it in ``nonfinite_pred``).

    ``.stats``: device counters (0-d int64) "samples", "msssim_fallbacks", "nonfinite_pred",
    "nonfinite_target", updated in place without a sync; ``read_stats()`` syncs once.
    """

    STAT_NAMES = ("samples", "msssim_fallbacks", "nonfinite_pred", "nonfinite_target")

    def __init__(
        self, alpha: float = 0.84, beta: float = 0.16, eps: float = 1e-3, reduction: str = "mean"
    ) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(
                f"CombinedLoss: reduction must be one of {_REDUCTIONS}, got {reduction!r}"
            )
        self.alpha, self.beta, self.reduction = alpha, beta, reduction
        self.msssim = MSSSIMLoss(reduction="none")
        self.charbonnier = CharbonnierLoss(eps=eps, reduction="none")
        self._stats = {k: torch.zeros((), dtype=torch.int64) for k in self.STAT_NAMES}

    @property
    def stats(self) -> dict[str, Tensor]:
        """The live device counters (0-d int64 tensors); reading their values syncs."""
        return self._stats

    def read_stats(self) -> dict[str, int]:
        """Counter values as ints: one host-device sync; call at the logging interval."""
        values = torch.stack([self._stats[k] for k in self.STAT_NAMES]).tolist()
        return dict(zip(self.STAT_NAMES, values, strict=True))

    def reset_stats(self) -> None:
        for v in self._stats.values():
            v.zero_()

    def _counters_on(self, device: torch.device) -> dict[str, Tensor]:
        if self._stats["samples"].device != device:
            with torch.inference_mode(False):  # normal tensors even if first seen in eval
                self._stats = {k: v.to(device) for k, v in self._stats.items()}
        return self._stats

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        _check(pred, target, self.reduction, "CombinedLoss")
        ok_pred = torch.isfinite(pred).flatten(1).all(1)  # (N,) bool, stays on the device
        ok_target = torch.isfinite(target).flatten(1).all(1)
        ok = (ok_pred & ok_target).view(-1, 1, 1, 1)
        ms = self.msssim(torch.where(ok, pred, 0.0), torch.where(ok, target, 0.0))
        use_ms = ok.view(-1) & torch.isfinite(ms)
        ms = torch.where(use_ms, ms, 0.0)
        charb = self.charbonnier(pred, target)
        per_sample = torch.where(use_ms, self.alpha * ms + self.beta * charb, charb)
        stats = self._counters_on(pred.device)
        stats["samples"].add_(pred.shape[0])
        stats["msssim_fallbacks"].add_((~use_ms).sum())
        stats["nonfinite_pred"].add_((~ok_pred).sum())
        stats["nonfinite_target"].add_((~ok_target).sum())
        return _reduce(per_sample, self.reduction)
