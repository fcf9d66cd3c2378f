"""Classical non-blind deconvolution baselines: scikit-image Wiener and Richardson-Lucy.

Both are given the TRUE blur kernel that ``deblur_lib.data.synthesize`` saved next to
each pair, so they are an upper bound on what a classical method can do without
estimating the kernel. All images here are numpy float arrays (H, W, 3) in metric
space [0, 1]; kernels are float (k, k) summing to 1.

The synthetic blur is a 'valid' convolution of a larger scene (in linear light, before noise,
the sRGB curve and JPEG: ``deblur_lib.degrade``), while both scikit-image
methods assume circular (Wiener) or zero (Richardson-Lucy) boundaries. Deconvolving the
image as-is rings from the borders inward (Wiener at small ``balance`` lands BELOW the
blurred input), so we mirror-pad by 3 kernel sizes and taper the padded border towards
its own circular blur (MATLAB's ``edgetaper``), then crop back. On a 15 px motion kernel
this takes Wiener from ~16 dB to ~25 dB (blurred input: 22 dB).

Parameters (Wiener ``balance``, Richardson-Lucy ``num_iter``) are tuned by a small grid
search on TRAIN images (:func:`tune`), then applied unchanged to the test split. Each method
also runs in linear light (``wiener_linear``, ``richardson_lucy_linear``: linearise, deconvolve,
re-encode), where the synthetic blur happened.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from skimage.metrics import peak_signal_noise_ratio
from skimage.restoration import richardson_lucy, wiener

from deblur_lib import predict
from deblur_lib.data import load_image
from deblur_lib.degrade import linear_to_srgb, srgb_to_linear
from deblur_lib.metrics import psnr, ssim

WIENER_BALANCES = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
RL_ITERATIONS = (5, 10, 20, 30)
PAD_KERNELS = 3  # mirror padding, in kernel sizes


@dataclass
class Sample:
    """One test or train pair: ``blur``/``sharp`` (H, W, 3) float in [0, 1], ``kernel`` (k, k)."""

    name: str
    blur: np.ndarray
    sharp: np.ndarray
    kernel: np.ndarray


@dataclass
class Tuned:
    """Result of :func:`tune`: the best parameter and the mean train PSNR (dB) of each one."""

    method: str
    param_name: str
    best: float
    scores: dict[float, float] = field(default_factory=dict)


def _check(image: np.ndarray, kernel: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) in [0, 1], got shape {image.shape}")
    if kernel.ndim != 2:
        raise ValueError(f"kernel must be 2-D (k, k), got shape {kernel.shape}")
    if min(image.shape[:2]) < kernel.shape[0] or min(image.shape[:2]) < kernel.shape[1]:
        raise ValueError(f"image {image.shape} is smaller than the kernel {kernel.shape}")


def _circular_blur(channel: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``channel`` (H, W) convolved circularly with a centred ``kernel`` (k, k)."""
    otf = np.zeros_like(channel)
    otf[: kernel.shape[0], : kernel.shape[1]] = kernel
    otf = np.roll(otf, (-(kernel.shape[0] // 2), -(kernel.shape[1] // 2)), axis=(0, 1))
    return np.real(np.fft.ifft2(np.fft.fft2(channel) * np.fft.fft2(otf)))


def _padded(image: np.ndarray, kernel: np.ndarray) -> tuple[np.ndarray, int]:
    """Mirror-pad (H, W, 3) by ``PAD_KERNELS`` kernel sizes and taper the border (edgetaper)."""
    pad = PAD_KERNELS * max(kernel.shape)
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="symmetric")
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.linspace(0.0, 1.0, pad))
    weights = [np.ones(n) for n in padded.shape[:2]]
    for w in weights:
        w[:pad], w[-pad:] = ramp, ramp[::-1]
    w2d = np.outer(*weights)
    for c in range(padded.shape[2]):
        blurred = _circular_blur(padded[..., c], kernel)
        padded[..., c] = w2d * padded[..., c] + (1.0 - w2d) * blurred
    return padded, pad


def wiener_deblur(image: np.ndarray, kernel: np.ndarray, balance: float = 1e-2) -> np.ndarray:
    """Wiener-Hunt deconvolution per channel (``skimage.restoration.wiener``).

    ``image`` (H, W, 3) float in [0, 1]; ``kernel`` (k, k) summing to 1; ``balance`` > 0
    trades noise against sharpness. Returns (H, W, 3) float64 clipped to [0, 1].
    """
    _check(image, kernel)
    if balance <= 0:
        raise ValueError(f"balance must be > 0, got {balance}")
    psf = kernel.astype(np.float64) / kernel.sum()
    padded, pad = _padded(image.astype(np.float64), psf)
    out = np.stack([wiener(padded[..., c], psf, balance, clip=False) for c in range(3)], axis=-1)
    return np.clip(out[pad:-pad, pad:-pad], 0.0, 1.0)


def richardson_lucy_deblur(image: np.ndarray, kernel: np.ndarray, num_iter: int = 20) -> np.ndarray:
    """Richardson-Lucy deconvolution (``skimage.restoration.richardson_lucy``), all channels.

    ``image`` (H, W, 3) float in [0, 1]; ``kernel`` (k, k); ``num_iter`` >= 1 (more
    iterations: sharper, but noise grows). Returns (H, W, 3) float64 in [0, 1].
    """
    _check(image, kernel)
    if num_iter < 1:
        raise ValueError(f"num_iter must be >= 1, got {num_iter}")
    psf = kernel.astype(np.float64) / kernel.sum()
    padded, pad = _padded(np.clip(image.astype(np.float64), 0.0, 1.0), psf)
    out = richardson_lucy(np.clip(padded, 0.0, None), psf[..., None], num_iter=int(num_iter))
    return np.clip(out[pad:-pad, pad:-pad], 0.0, 1.0)


def in_linear_light(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """``fn`` applied in linear light: the sRGB image is linearised (``degrade``'s curve, the
    one the blur was simulated under), deconvolved, and re-encoded. Blur is linear in light,
    not in sRGB values, so this is the physically right place to invert it."""

    def linear(image: np.ndarray, kernel: np.ndarray, param: float) -> np.ndarray:
        out = fn(srgb_to_linear(np.clip(image, 0.0, 1.0)), kernel, param)
        return np.clip(linear_to_srgb(np.clip(out, 0.0, 1.0)), 0.0, 1.0)

    return linear


METHODS: dict[str, tuple[Callable[..., np.ndarray], str, Sequence[float]]] = {
    "wiener": (wiener_deblur, "balance", WIENER_BALANCES),
    "richardson_lucy": (richardson_lucy_deblur, "num_iter", RL_ITERATIONS),
    "wiener_linear": (in_linear_light(wiener_deblur), "balance", WIENER_BALANCES),
    "richardson_lucy_linear": (in_linear_light(richardson_lucy_deblur), "num_iter", RL_ITERATIONS),
}


def deblur(method: str, image: np.ndarray, kernel: np.ndarray, param: float) -> np.ndarray:
    """Run ``method`` ("wiener" | "richardson_lucy") with its single parameter ``param``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(METHODS)}")
    fn, name, _ = METHODS[method]
    value = int(param) if name == "num_iter" else float(param)
    return fn(image, kernel, value)


def tune(method: str, samples: Sequence[Sample], grid: Sequence[float] | None = None) -> Tuned:
    """Grid-search ``method``'s parameter on ``samples`` (train pairs) by mean PSNR (dB).

    Ties go to the first grid value. Returns a :class:`Tuned` with every score.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(METHODS)}")
    if not samples:
        raise ValueError("tune needs at least one sample")
    _, name, default_grid = METHODS[method]
    scores: dict[float, float] = {}
    for value in grid or default_grid:
        psnrs = [
            peak_signal_noise_ratio(
                s.sharp, deblur(method, s.blur, s.kernel, value), data_range=1.0
            )
            for s in samples
        ]
        scores[value] = float(np.mean(psnrs))
    best = max(scores, key=lambda v: scores[v])
    return Tuned(method=method, param_name=name, best=best, scores=scores)


def tuning_table(tuned: Sequence[Tuned]) -> pd.DataFrame:
    """One row per (method, parameter value): mean train PSNR (dB) and whether it was chosen."""
    rows = [
        {
            "method": t.method,
            "parameter": t.param_name,
            "value": v,
            "train PSNR (dB)": score,
            "chosen": v == t.best,
        }
        for t in tuned
        for v, score in t.scores.items()
    ]
    return pd.DataFrame(rows)


def restorer(method: str, param: float) -> Callable[[Sample], np.ndarray]:
    """A function Sample -> (H, W, 3) [0, 1] running ``method`` with the true kernel."""
    return lambda s: deblur(method, s.blur, s.kernel, param)


def model_restorer(
    model: torch.nn.Module, device: str | torch.device = "cpu"
) -> Callable[[Sample], np.ndarray]:
    """A function Sample -> (H, W, 3) [0, 1]: ``predict.deblur`` of the full blurred image (the
    same inference as ``python -m deblur_lib.predict``: tiled when large, output clamped)."""

    def run(sample: Sample) -> np.ndarray:
        blur = np.ascontiguousarray(sample.blur, dtype=np.float32)
        return predict.deblur(model, blur, device=device)

    return run


def evaluate_methods(
    samples: Sequence[Sample], methods: dict[str, Callable[[Sample], np.ndarray]]
) -> tuple[pd.DataFrame, dict[str, list[np.ndarray]]]:
    """Run every method on every sample; PSNR (dB) and SSIM per image with ``deblur_lib.metrics``.

    Returns a long DataFrame (image, method, psnr, ssim) and each method's outputs
    ((H, W, 3) float arrays in [0, 1]) in sample order.
    """

    rows, outputs = [], {m: [] for m in methods}
    for s in samples:
        target = torch.from_numpy(np.asarray(s.sharp, np.float64)).permute(2, 0, 1)[None]
        for name, fn in methods.items():
            out = np.asarray(fn(s))
            if out.shape != s.sharp.shape:
                raise ValueError(
                    f"{name} returned {out.shape} for {s.name}, expected {s.sharp.shape}"
                )
            outputs[name].append(out)
            pred = torch.from_numpy(out.astype(np.float64)).permute(2, 0, 1)[None]
            rows.append(
                {
                    "image": s.name,
                    "method": name,
                    "psnr": float(psnr(pred, target)[0]),
                    "ssim": float(ssim(pred, target)[0]),
                }
            )
    return pd.DataFrame(rows), outputs


def load_samples(split_dir: str | Path, limit: int | None = None) -> list[Sample]:
    """Read ``split_dir/{blur,sharp}/NAME.png`` and ``split_dir/kernels/NAME.npy`` (sorted).

    The layout is the one ``deblur_lib.data.synthesize`` writes; a pair without its
    kernel raises ``FileNotFoundError`` naming the missing file.
    """

    root = Path(split_dir)
    blurs = sorted((root / "blur").glob("*.png"))
    if not blurs:
        raise FileNotFoundError(f"no PNGs in {root / 'blur'} (expected {root}/blur/NAME.png)")
    out = []
    for path in blurs[:limit]:
        kernel_path = root / "kernels" / f"{path.stem}.npy"
        if not kernel_path.exists():
            raise FileNotFoundError(f"missing kernel {kernel_path} for {path}")
        sharp = load_image(root / "sharp" / path.name)
        out.append(Sample(path.stem, load_image(path), sharp, np.load(kernel_path)))
    return out
