"""Batched PSNR and SSIM on the tensors' device, and the guarded ``calculate_metrics``.

Spaces: ``psnr`` and ``ssim`` take *metric space* tensors (N, C, H, W) in [0, 1] (more
generally ``[0, data_range]``); ``calculate_metrics`` takes *model space* tensors in [-1, 1]
and maps them with ``denormalize``.

``psnr`` and ``ssim`` never synchronise with the device: no value checks, no ``.item()``.
A non-finite pixel gives a non-finite result for its own sample only. Shape, dtype and
argument mistakes (host-side facts: an empty batch, mismatched shapes, a ``data_range`` that is
not a finite number > 0, bools included) raise ``MetricError`` (a ``ValueError``) naming them.

Parity (tested): ``psnr`` matches ``skimage.metrics.peak_signal_noise_ratio`` to 1e-4 dB
below the cap; ``ssim`` matches ``skimage.metrics.structural_similarity(gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=-1)`` to 1e-3. scikit-image
filters with an 11-tap Gaussian (truncate 3.5) in 'reflect' mode and then crops (11 - 1) // 2
pixels from every side of the SSIM map; the cropped map depends on interior pixels only, so a
'valid' convolution gives the same map without any padding.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

PSNR_CAP_DB = 100.0
"""PSNR reported for identical images (MSE 0, where the formula gives inf) and the upper bound
of every PSNR value. 100 dB is an RMS error of 1e-5 of the data range, far below 8-bit
quantisation (~59 dB), so no real restoration is capped; ``calculate_metrics`` stays finite."""

WIN_SIZE = 11  # px; Gaussian window of SSIM / MS-SSIM (Wang et al. 2004)
WIN_SIGMA = 1.5  # px
SSIM_K = (0.01, 0.03)  # SSIM stabilising constants K1, K2 (times data_range, squared)
# BT.601 luma for RGB in [0, 1] -> Y in [16, 235] / 255 (as MATLAB rgb2ycbcr, BasicSR, skimage).
_Y_OFFSET = 16.0 / 255.0
_Y_RGB = (65.481 / 255.0, 128.553 / 255.0, 24.966 / 255.0)
_CHUNK_ELEMS = 1 << 19  # CPU: values per chunk of images (two 256x256 RGB images)
_TARGET_RANGE_TOL = 1e-3  # calculate_metrics: model-space targets must lie in [-1, 1] +- this


class MetricError(ValueError):
    """A metric cannot be computed from these inputs (bad shape, non-finite values, ...)."""


def denormalize(x: Tensor) -> Tensor:
    """Model space [-1, 1] -> metric space [0, 1]; out-of-range values are clamped first."""
    return (x.clamp(-1, 1) + 1) / 2


@functools.lru_cache(maxsize=16)
def gaussian_window(
    size: int = WIN_SIZE, sigma: float = WIN_SIGMA, device=None, dtype=torch.float32
) -> Tensor:
    """Normalised 1-D Gaussian (size,), computed in ``dtype`` (float32: bit-identical to
    ``pytorch_msssim._fspecial_gauss_1d``; float64: to scipy.ndimage's kernel).

    Cached per (size, sigma, device, dtype) so hot paths make no host-to-device copy; the
    cached tensor is shared: do not modify it in place.
    """
    with torch.inference_mode(False), torch.no_grad():  # usable later with autograd too
        coords = torch.arange(size, dtype=dtype) - size // 2
        g = torch.exp(-(coords**2) / (2 * sigma**2))
        return (g / g.sum()).to(device=device)


def gaussian_blur_valid(x: Tensor, win: Tensor) -> Tensor:
    """Separable 'valid' Gaussian blur: (B, K, H, W) -> (B, K, H - s + 1, W - s + 1).

    One grouped convolution per axis over all K maps at once (``win``: (s,), x's dtype).
    """
    k, s = x.shape[1], win.shape[0]
    w = win.view(1, 1, 1, s).expand(k, 1, 1, s)
    x = F.conv2d(x, w.transpose(2, 3), groups=k)
    return F.conv2d(x, w, groups=k)


def ssim_cs(x: Tensor, y: Tensor, data_range: float, win: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean SSIM and contrast-structure (cs) maps' means, each (N, C).

    x, y: (N, C, H, W), same dtype, H and W >= len(win). Differentiable; no padding; the
    five local statistics (mu_x, mu_y, E[x^2], E[y^2], E[xy]) are filtered in one pass. Same
    formula as ``pytorch_msssim._ssim`` (population covariance, alpha = beta = gamma = 1).
    """
    c = x.shape[1]
    c1 = (SSIM_K[0] * data_range) ** 2
    c2 = (SSIM_K[1] * data_range) ** 2
    stats = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    if x.device.type == "cpu":  # oneDNN's depthwise convolution is ~3x faster in NHWC
        stats = stats.contiguous(memory_format=torch.channels_last)
    mu_x, mu_y, e_xx, e_yy, e_xy = gaussian_blur_valid(stats, win).split(c, dim=1)
    mu_xy = mu_x * mu_y
    mu_xx = mu_x * mu_x
    mu_yy = mu_y * mu_y
    cs_map = (2 * (e_xy - mu_xy) + c2) / (e_xx - mu_xx + e_yy - mu_yy + c2)
    ssim_map = (2 * mu_xy + c1) / (mu_xx + mu_yy + c1) * cs_map
    return ssim_map.mean((2, 3)), cs_map.mean((2, 3))


def _check_pair(pred: Tensor, target: Tensor, data_range: float, crop_border: int, y: bool):
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        raise MetricError(
            f"expected two tensors, got {type(pred).__name__}, {type(target).__name__}"
        )
    if pred.shape != target.shape or pred.dim() != 4:
        raise MetricError(
            f"expected pred and target of the same shape (N, C, H, W), got {tuple(pred.shape)} "
            f"and {tuple(target.shape)}"
        )
    if not (pred.is_floating_point() and target.is_floating_point()):
        raise MetricError(
            f"expected floating tensors in metric space [0, 1], got {pred.dtype} and "
            f"{target.dtype} (shape {tuple(pred.shape)}); convert uint8 with x.float() / 255"
        )
    if pred.shape[0] == 0:
        raise MetricError(f"empty batch: pred and target have shape {tuple(pred.shape)}")
    if pred.device != target.device:
        raise MetricError(f"pred on {pred.device} but target on {target.device}")
    real = isinstance(data_range, int | float) and not isinstance(data_range, bool)
    if not (real and math.isfinite(data_range) and data_range > 0):
        raise MetricError(f"data_range must be a finite number > 0, got {data_range!r}")
    h, w = pred.shape[-2:]
    if not (isinstance(crop_border, int) and 0 <= 2 * crop_border < min(h, w)):
        raise MetricError(f"crop_border={crop_border!r} does not fit shape {tuple(pred.shape)}")
    if y and pred.shape[1] != 3:
        raise MetricError(f"y_channel=True needs RGB (N, 3, H, W), got {tuple(pred.shape)}")


def _prepare(x: Tensor, crop_border: int, y_channel: bool, dtype: torch.dtype) -> Tensor:
    if crop_border:
        x = x[..., crop_border:-crop_border, crop_border:-crop_border]
    x = x.to(dtype)
    if y_channel:
        r, g, b = x.unbind(1)
        x = (_Y_OFFSET + _Y_RGB[0] * r + _Y_RGB[1] * g + _Y_RGB[2] * b).unsqueeze(1)
    return x


def _chunks(x: Tensor) -> list[slice]:
    """Image slices of about ``_CHUNK_ELEMS`` values on CPU (cache-sized temporaries, no
    page-faulting multi-MB allocations per op); the whole batch at once on a GPU."""
    if x.device.type != "cpu":
        return [slice(None)]
    step = max(1, _CHUNK_ELEMS // max(1, x[0].numel()))
    return [slice(i, i + step) for i in range(0, x.shape[0], step)]


def _ssim_inference(x: Tensor, y: Tensor, data_range: float, win: Tensor) -> Tensor:
    """Per-image SSIM (n,) float64 of one chunk, without autograd: the formula of ``ssim_cs``
    (same operation order), with the statistics written straight into one (channels-last on
    CPU) buffer and the maps computed in place: fewer passes over memory than ``ssim_cs``."""
    n, c, h, w = x.shape
    c1 = (SSIM_K[0] * data_range) ** 2
    c2 = (SSIM_K[1] * data_range) ** 2
    fmt = torch.channels_last if x.device.type == "cpu" else torch.contiguous_format
    stats = torch.empty((n, 5 * c, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
    stats[:, :c] = x
    stats[:, c : 2 * c] = y
    torch.mul(x, x, out=stats[:, 2 * c : 3 * c])
    torch.mul(y, y, out=stats[:, 3 * c : 4 * c])
    torch.mul(x, y, out=stats[:, 4 * c :])
    mu_x, mu_y, e_xx, e_yy, e_xy = gaussian_blur_valid(stats, win).contiguous().split(c, dim=1)
    mu_xy = mu_x * mu_y
    mu_x.square_()
    mu_y.square_()
    denominator = e_xx.sub_(mu_x).add_(e_yy).sub_(mu_y).add_(c2)  # sigma_x^2 + sigma_y^2 + C2
    cs_map = e_xy.sub_(mu_xy).mul_(2).add_(c2).div_(denominator)  # (2 sigma_xy + C2) / ...
    luminance_denominator = mu_x.add_(mu_y).add_(c1)
    ssim_map = mu_xy.mul_(2).add_(c1).div_(luminance_denominator).mul_(cs_map)
    return ssim_map.mean((2, 3), dtype=torch.float64).mean(1)


@torch.no_grad()
def psnr(
    pred: Tensor,
    target: Tensor,
    data_range: float = 1.0,
    crop_border: int = 0,
    y_channel: bool = False,
) -> Tensor:
    """PSNR in dB per image, (N,) float64, capped at ``PSNR_CAP_DB``.

    pred, target: (N, C, H, W) floats in metric space [0, data_range]. ``crop_border`` px are
    dropped on every side; ``y_channel`` evaluates BT.601 luma of RGB input (C == 3, RGB order,
    Y in [16, 235] / 255). Differences in float32 (float64 for float64 input), squares summed
    in float64: within 1e-6 dB of an all-float64 computation.
    """
    _check_pair(pred, target, data_range, crop_border, y_channel)
    dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    sse = []
    for s in _chunks(pred):
        diff = _prepare(pred[s], crop_border, y_channel, dtype)
        diff = diff - _prepare(target[s], crop_border, y_channel, dtype)
        sse.append(diff.square_().sum((1, 2, 3), dtype=torch.float64))
    h, w = (d - 2 * crop_border for d in pred.shape[-2:])
    mse = torch.cat(sse) / ((1 if y_channel else pred.shape[1]) * h * w)
    value = 10 * torch.log10(data_range**2 / mse)
    return value.clamp(max=PSNR_CAP_DB)  # mse 0 -> inf -> cap; NaN stays NaN


@torch.no_grad()
def ssim(
    pred: Tensor,
    target: Tensor,
    data_range: float = 1.0,
    crop_border: int = 0,
    y_channel: bool = False,
) -> Tensor:
    """SSIM per image (mean over channels), (N,) float64; 11x11 Gaussian window, sigma 1.5.

    pred, target: (N, C, H, W) floats in metric space [0, data_range], H and W at least 11 px
    after cropping (else ``MetricError``). Filtering runs in float32 (float64 for float64
    input); map means accumulate in float64. Arguments as in ``psnr``.
    """
    _check_pair(pred, target, data_range, crop_border, y_channel)
    h, w = (d - 2 * crop_border for d in pred.shape[-2:])
    if min(h, w) < WIN_SIZE:
        raise MetricError(
            f"ssim needs images of at least {WIN_SIZE}x{WIN_SIZE} px (Gaussian window), got "
            f"shape {tuple(pred.shape)} with crop_border={crop_border} ({h}x{w} px)"
        )
    dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    win = gaussian_window(device=pred.device, dtype=dtype)
    out = []
    for s in _chunks(pred):
        p = _prepare(pred[s], crop_border, y_channel, dtype)
        t = _prepare(target[s], crop_border, y_channel, dtype)
        out.append(_ssim_inference(p, t, data_range, win))
    return torch.cat(out)


def calculate_metrics(outputs: Tensor, targets: Tensor) -> tuple[float, float]:
    """Mean PSNR (dB) and mean SSIM over a batch of *model space* tensors (N, 3, H, W).

    Outputs are clamped to [-1, 1] by ``denormalize``; targets must already lie in [-1, 1].
    Raises ``MetricError`` for non-finite values (with the count of bad values), targets out of
    range, mismatched shapes or images under 11 px; never returns 0.0 for a failure.
    Synchronises with the device (reads counts and the result): call once per batch at most.
    """
    _check_pair(outputs, targets, 1.0, 0, False)
    bad_out = (~torch.isfinite(outputs)).sum()
    bad_tgt = (~torch.isfinite(targets)).sum()
    lo, hi = torch.aminmax(torch.nan_to_num(targets))
    checks = torch.stack([bad_out.double(), bad_tgt.double(), lo.double(), hi.double()])
    bad_out, bad_tgt, lo, hi = checks.tolist()  # the one sync of the checks
    if bad_out or bad_tgt:
        raise MetricError(
            f"non-finite values: {int(bad_out)} in outputs, {int(bad_tgt)} in targets "
            f"(of {outputs.numel()} each, shape {tuple(outputs.shape)})"
        )
    if lo < -1 - _TARGET_RANGE_TOL or hi > 1 + _TARGET_RANGE_TOL:
        raise MetricError(
            f"targets must be in model space [-1, 1], got [{lo:.4g}, {hi:.4g}] "
            f"(shape {tuple(targets.shape)})"
        )
    x, y = denormalize(outputs), denormalize(targets)
    p, s = torch.stack([psnr(x, y).mean(), ssim(x, y).mean()]).tolist()
    if not (math.isfinite(p) and math.isfinite(s)):
        raise MetricError(f"non-finite metric: psnr={p}, ssim={s} (shape {tuple(outputs.shape)})")
    return p, s
