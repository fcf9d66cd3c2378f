"""The seed project's ORIGINAL loss and metric code, kept as the "before" of every comparison.

Do not use this module for training or evaluation. It exists so that the notebooks can
reproduce the original failure (``--guards off``) and the benchmarks can time the original
code against the guarded replacements in ``deblur_lib.losses`` and ``deblur_lib.metrics``.
Its defects are deliberate and documented on each name:

- ``SeedCombinedLoss``: stock ``pytorch_msssim.ms_ssim`` (asserts on images of 160 px or less,
  NaN for a sample with one NaN pixel, inf/NaN gradients at tiny positive cs) on inputs
  denormalised with ``(x + 1) / 2`` and no clamp.
- ``SeedGuardedLoss``: the seed's "fix 1": ``try/except Exception`` around MS-SSIM, Python-side
  ``torch.isnan(x).any()`` checks (one host-device sync each) and a whole-batch Charbonnier
  fallback, which cannot help when the prediction itself is NaN.
- ``seed_calculate_metrics``: scikit-image per image on the host inside ``except Exception``
  that turns every failure (a too-small image, a shape mismatch, a programming error) into
  ``(0.0, 0.0)``; scikit-image defaults (7x7 uniform SSIM window); PSNR inf on identical images.
- ``evaluate_seed_style``: the seed's validation loop: per-batch averages, ``.item()`` per
  batch, ``seed_calculate_metrics`` inside ``except Exception``, NaN passed through.
- ``seed_calculate_metrics_missing_import``: the same function as the seed first shipped it,
  referencing ``np`` which was never imported (the seed analysis's fix 4): the ``NameError``
  is swallowed by the broad ``except`` and reported as metrics ``(0.0, 0.0)``.

Spaces: model space [-1, 1] in, as in the seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy
import torch
from pytorch_msssim import ms_ssim
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import Tensor, nn

from deblur_lib.evaluate import EvalReport

log = logging.getLogger(__name__)


def seed_denormalize(x: Tensor) -> Tensor:
    """The seed's model -> metric space map: ``(x + 1) / 2`` with no clamp."""
    return (x + 1) / 2


class SeedCharbonnierLoss(nn.Module):
    """The seed's Charbonnier loss: ``mean(sqrt(diff ** 2 + eps ** 2))`` over the batch."""

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        diff = pred - target
        return torch.mean(torch.sqrt(diff * diff + self.eps * self.eps))


class SeedCombinedLoss(nn.Module):
    """The seed's loss, unguarded: ``alpha * (1 - ms_ssim) + beta * charbonnier`` (scalar)."""

    def __init__(self, alpha: float = 0.84, beta: float = 0.16) -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.charbonnier = SeedCharbonnierLoss()

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        msssim = ms_ssim(seed_denormalize(pred), seed_denormalize(target), data_range=1.0)
        return self.alpha * (1 - msssim) + self.beta * self.charbonnier(pred, target)


class SeedGuardedLoss(nn.Module):
    """The seed's proposed fix 1, as written: Python NaN checks and a broad ``except``.

    Every check is a host-device sync. Any failure (NaN input, NaN MS-SSIM, any exception,
    including programming errors) makes the whole batch fall back to Charbonnier alone;
    ``.fallbacks`` counts those batches (a Python int).
    """

    def __init__(self, alpha: float = 0.84, beta: float = 0.16) -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.charbonnier = SeedCharbonnierLoss()
        self.fallbacks = 0

    def _fallback(self, pred: Tensor, target: Tensor, why: str) -> Tensor:
        self.fallbacks += 1
        log.warning("MS-SSIM failed (%s), using Charbonnier loss only", why)
        return self.charbonnier(pred, target)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        if torch.isnan(pred).any() or torch.isnan(target).any():  # two syncs
            return self._fallback(pred, target, "NaN in input")
        try:
            msssim = ms_ssim(seed_denormalize(pred), seed_denormalize(target), data_range=1.0)
            if torch.isnan(msssim) or torch.isinf(msssim):  # two more syncs
                return self._fallback(pred, target, "NaN/Inf MS-SSIM")
            return self.alpha * (1 - msssim) + self.beta * self.charbonnier(pred, target)
        except Exception as err:  # noqa: BLE001 - the seed's broad except, kept on purpose
            return self._fallback(pred, target, f"{type(err).__name__}: {err}")


def seed_calculate_metrics(outputs: Tensor, targets: Tensor) -> tuple[float, float]:
    """The seed's metrics (with fix 4's import present): mean PSNR, SSIM or ``(0.0, 0.0)``.

    outputs, targets: (N, 3, H, W) model space. Per image on the host with scikit-image
    (default SSIM window: 7x7 uniform, not the Gaussian one of ``deblur_lib.metrics``).
    """
    try:
        outputs = seed_denormalize(outputs).clamp(0, 1).detach().cpu().numpy()
        targets = seed_denormalize(targets).clamp(0, 1).detach().cpu().numpy()
        psnr_total, ssim_total = 0.0, 0.0
        for output, target in zip(outputs, targets, strict=False):
            output = numpy.transpose(output, (1, 2, 0))
            target = numpy.transpose(target, (1, 2, 0))
            psnr_total += peak_signal_noise_ratio(target, output, data_range=1.0)
            ssim_total += structural_similarity(target, output, data_range=1.0, channel_axis=2)
        return psnr_total / len(outputs), ssim_total / len(outputs)
    except Exception as err:  # noqa: BLE001 - the seed's broad except, kept on purpose
        log.warning("Error calculating metrics: %s: %s", type(err).__name__, err)
        return 0.0, 0.0


def seed_calculate_metrics_missing_import(outputs: Tensor, targets: Tensor) -> tuple[float, float]:
    """``seed_calculate_metrics`` as the seed first shipped it, without ``import numpy as np``.

    The body uses ``np``, a name this module never binds, exactly as the seed did. Every call
    raises ``NameError`` inside the ``try``; the broad ``except`` logs it as an ordinary metric
    failure and returns ``(0.0, 0.0)``, which the seed then logged and fed to its scheduler.
    """
    try:
        outputs = seed_denormalize(outputs).clamp(0, 1).detach().cpu().numpy()
        targets = seed_denormalize(targets).clamp(0, 1).detach().cpu().numpy()
        psnr_total, ssim_total = 0.0, 0.0
        for output, target in zip(outputs, targets, strict=False):
            output = np.transpose(output, (1, 2, 0))  # noqa: F821 - the seed's missing import
            target = np.transpose(target, (1, 2, 0))  # noqa: F821
            psnr_total += peak_signal_noise_ratio(target, output, data_range=1.0)
            ssim_total += structural_similarity(target, output, data_range=1.0, channel_axis=2)
        return psnr_total / len(outputs), ssim_total / len(outputs)
    except Exception as err:  # noqa: BLE001 - the seed's broad except, kept on purpose
        log.warning("Error calculating metrics: %s: %s", type(err).__name__, err)
        return 0.0, 0.0


def evaluate_seed_style(
    model: nn.Module,
    loader: Iterable,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device | str,
    *,
    metrics: Callable[[Tensor, Tensor], tuple[float, float]] | None = None,
    channels_last: bool = False,
) -> EvalReport:
    """The ORIGINAL evaluation, for the notebooks' "before" runs (``--guards off``).

    Reproduces its flaws on purpose: per-batch (not per-image) averages, ``.item()`` per batch,
    ``legacy.seed_calculate_metrics`` whose broad ``except`` turns any failure into 0.0, and
    NaN passed through as it comes. Never skips a batch, so ``n_valid == n_total``.
    ``metrics``: model-space (outputs, targets) -> (PSNR, SSIM) floats; default
    ``seed_calculate_metrics``. ``channels_last``: the input's memory format, as ``evaluate``'s
    (speed only).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total_loss = total_psnr = total_ssim = 0.0
    n_batches = n_images = 0
    try:
        with torch.no_grad():
            for blur, sharp in loader:
                blur, sharp = blur.to(device), sharp.to(device)
                if channels_last:
                    blur = blur.contiguous(memory_format=torch.channels_last)
                out = model(blur)
                total_loss += criterion(out, sharp).item()
                try:
                    p, s = (metrics or seed_calculate_metrics)(out, sharp)
                except Exception:  # noqa: BLE001 (the seed's broad except, reproduced on purpose)
                    p, s = 0.0, 0.0
                # float(): skimage gives numpy scalars, which weights_only checkpoints refuse
                total_psnr, total_ssim = total_psnr + float(p), total_ssim + float(s)
                n_batches, n_images = n_batches + 1, n_images + blur.shape[0]
    finally:
        model.train(was_training)
    d = max(n_batches, 1)
    report = EvalReport(
        total_loss / d, total_psnr / d, total_ssim / d, n_batches, n_batches, {}, n_images, n_images
    )
    log.info(report.summary())
    return report
