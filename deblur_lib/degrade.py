"""How a sharp scene becomes a blurred photo: camera-shake kernels and a realistic degradation.

The pipeline follows Wei et al. (2022), "Rethinking blur synthesis for deep real-world image
deblurring": blur is an integral of scene radiance, so it happens in linear light, before the
sensor clips and adds noise and before the camera's tone curve; blurring gamma-encoded pixels
and adding white Gaussian noise (what many synthetic sets do) trains models that fail on real
blur. Saturation and JPEG follow Rim et al. (2022), "Realistic blur synthesis for learning image
deblurring" (RSBlur): light sources brighter than the sensor's white point smear into wide
streaks only if their radiance is allowed to exceed 1 before the blur and is clipped after it.

Steps of :func:`degrade` (all on float32 numpy arrays (H, W, 3)):
1. the scene in linear light (the inverse sRGB curve of an 8-bit image, :func:`srgb_to_linear`),
   >= 0; near-white pixels of some scenes are boosted above 1 (saturated highlights);
2. the sharp target: the unblurred scene, clipped to [0, 1], sRGB-encoded, 8-bit;
3. blur: a camera-shake PSF (:func:`random_shake_kernel`), or for a share of samples two PSFs
   blended by a smooth random weight map (spatially varying blur), 'valid' convolution of the
   scene, which is padded by the kernel radius, so sharp and blurred stay pixel-aligned;
4. the sensor: clip to [0, 1] (saturation), Poisson-Gaussian noise (signal-dependent shot noise
   of variance `shot * x` plus read noise of std `read`, Foi et al. 2008's heteroscedastic
   Gaussian approximation), clip again;
5. the camera: sRGB tone curve, 8-bit rounding, and for a share of samples JPEG at a random
   quality.

Pure numpy (FFT convolution) and Pillow (JPEG); no scipy.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
from PIL import Image

__all__ = [
    "DEFAULT_PARAMS",
    "DegradeParams",
    "Degraded",
    "degrade",
    "fft_size",
    "linear_to_srgb",
    "random_kernels",
    "random_shake_kernel",
    "srgb_to_linear",
]


# --- tone curve -------------------------------------------------------------------------------


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    """Inverse sRGB tone curve (IEC 61966-2-1): encoded [0, 1] -> linear light [0, 1]."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(y: np.ndarray) -> np.ndarray:
    """sRGB tone curve: linear light [0, 1] -> encoded [0, 1] (inputs clipped to [0, 1])."""
    y = np.clip(np.asarray(y, dtype=np.float64), 0.0, 1.0)
    return np.where(y <= 0.0031308, 12.92 * y, 1.055 * y ** (1 / 2.4) - 0.055)


_DECODE_U8 = srgb_to_linear(np.arange(256) / 255).astype(np.float32)  # uint8 -> linear
_ENCODE_LEVELS = 65535  # linear light is quantized to 16 bits before the table look-up
_ENCODE_U8 = np.round(linear_to_srgb(np.arange(_ENCODE_LEVELS + 1) / _ENCODE_LEVELS) * 255)
_ENCODE_U8 = _ENCODE_U8.astype(np.uint8)


def decode_u8(image: np.ndarray) -> np.ndarray:
    """uint8 sRGB image (any shape) -> float32 linear light in [0, 1], by table look-up."""
    return _DECODE_U8[image]


def encode_u8(linear: np.ndarray) -> np.ndarray:
    """float linear light (any shape; clipped to [0, 1]) -> uint8 sRGB, by a 16-bit table.

    Exact for the 256 levels of :func:`decode_u8` (an 8-bit round trip is the identity) and
    at most one level from ``round(255 * linear_to_srgb(x))`` elsewhere (ties of the table).
    """
    scaled = np.clip(linear, 0.0, 1.0) * np.float32(_ENCODE_LEVELS) + np.float32(0.5)
    return _ENCODE_U8[scaled.astype(np.uint16)]


# --- parameters -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DegradeParams:
    """Knobs of :func:`random_kernels` and :func:`degrade`; a (lo, hi) pair is a sampling range.

    Light is linear, in units of the sensor's white point (1.0 = saturation).
    - kernel_size: PSF side range in px, odd ints, 3 <= lo <= hi; uniform over the odd sides,
      capped by :func:`random_kernels`'s `max_side`. Default (7, 31).
    - varying_share: probability in [0, 1] of spatially varying blur (two PSFs blended by a
      smooth random weight map). Default 0.25.
    - highlight_share: probability in [0, 1] that near-white scene pixels are boosted above
      the white point before the blur (saturated light sources). Default 0.3.
    - highlight_threshold: linear level in (0, 1) where the boost starts (it ramps linearly to
      the full gain at 1.0). Default 0.95 (sRGB 249/255): pixels that were (nearly) clipped in
      the 8-bit source, the lights whose true radiance is unknown; a lower threshold also
      burns out bright surfaces of the sharp target.
    - highlight_gain: range of the boost factor on pure white, >= 1, uniform. Default (1.5, 6.0).
    - shot_noise: range of the shot-noise gain `a` (noise variance `a * x` at linear level x),
      log-uniform; (0, 0) disables it; a = 1e-3 is ~1000 photo-electrons at white. Default
      (1e-4, 3e-3).
    - read_noise: range of the read-noise std `b` (linear light), log-uniform; (0, 0) disables
      it. Default (5e-4, 3e-3).
    - jpeg_share: probability in [0, 1] that the blurred photo is JPEG-compressed. Default 0.5.
    - jpeg_quality: range of the Pillow JPEG quality, ints, 1 <= lo <= hi <= 100, uniform.
      Default (70, 95).
    """

    kernel_size: tuple[int, int] = (7, 31)
    varying_share: float = 0.25
    highlight_share: float = 0.3
    highlight_threshold: float = 0.95
    highlight_gain: tuple[float, float] = (1.5, 6.0)
    shot_noise: tuple[float, float] = (1e-4, 3e-3)
    read_noise: tuple[float, float] = (5e-4, 3e-3)
    jpeg_share: float = 0.5
    jpeg_quality: tuple[int, int] = (70, 95)

    def __post_init__(self) -> None:
        k_lo, k_hi = _pair(self, "kernel_size", int)
        if k_lo < 3 or k_lo > k_hi or k_lo % 2 == 0 or k_hi % 2 == 0:
            _bad("kernel_size", self.kernel_size, "odd ints with 3 <= lo <= hi")
        for name in ("varying_share", "highlight_share", "jpeg_share"):
            value = _real(self, name)
            if not 0.0 <= value <= 1.0:
                _bad(name, value, "a probability in [0, 1]")
        threshold = _real(self, "highlight_threshold")
        if not 0.0 < threshold < 1.0:
            _bad("highlight_threshold", threshold, "a linear level in (0, 1)")
        g_lo, g_hi = _pair(self, "highlight_gain", float)
        if not 1.0 <= g_lo <= g_hi:
            _bad("highlight_gain", self.highlight_gain, "1 <= lo <= hi")
        for name in ("shot_noise", "read_noise"):
            lo, hi = _pair(self, name, float)
            if not (lo == hi == 0.0 or 0.0 < lo <= hi):
                _bad(name, getattr(self, name), "0 < lo <= hi (log-uniform), or (0, 0) for none")
        q_lo, q_hi = _pair(self, "jpeg_quality", int)
        if not 1 <= q_lo <= q_hi <= 100:
            _bad("jpeg_quality", self.jpeg_quality, "ints with 1 <= lo <= hi <= 100")

    def to_dict(self) -> dict[str, object]:
        """Field -> value (pairs as lists), JSON-ready, for manifests and run logs."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in fields(self)
        }


def _bad(name: str, value: object, expected: str) -> None:
    raise ValueError(f"DegradeParams.{name} must be {expected}, got {value!r}")


def _real(params: DegradeParams, name: str) -> float:
    value = getattr(params, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        _bad(name, value, "a finite number")
    return float(value)


def _pair(params: DegradeParams, name: str, kind: type) -> tuple[float, float]:
    value = getattr(params, name)
    types = (int,) if kind is int else (int, float)
    ok = isinstance(value, tuple | list) and len(value) == 2
    ok = ok and all(isinstance(v, types) and not isinstance(v, bool) for v in value)
    if not ok or not all(math.isfinite(v) for v in value):
        _bad(name, value, f"a (lo, hi) pair of {'ints' if kind is int else 'numbers'}")
    return value[0], value[1]


DEFAULT_PARAMS = DegradeParams()  # the documented defaults


# --- kernels ----------------------------------------------------------------------------------


def random_shake_kernel(size: int, rng: np.random.Generator) -> np.ndarray:
    """Random camera-shake PSF: float32 (size, size), >= 0, sums to 1, centroid at the centre.

    Trajectory as in Boracchi & Foi (2012), "Modeling the performance of image restoration
    from motion blur": a constant-speed random walk with inertia, a centripetal pull and
    occasional abrupt shakes (2000 steps, their parameter ranges), cut to a random exposure
    fraction, scaled to span 60-100% of the support and splatted bilinearly (subpixel).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 3 or size % 2 == 0:
        raise ValueError(f"kernel size must be an odd int >= 3, got {size!r}")
    n, length = 2000, 60.0
    anxiety, centripetal = 0.1 * rng.random(), 0.7 * rng.random()
    gauss, big_shake, angle = 10.0 * rng.random(), 0.2 * rng.random(), 2 * np.pi * rng.random()
    u, a = rng.random(n), rng.random(n).tolist()
    gx, gy = rng.standard_normal(n) * gauss, rng.standard_normal(n) * gauss
    gx, gy, shakes = gx.tolist(), gy.tolist(), (u < big_shake * anxiety).tolist()
    step = length / (n - 1)
    # the exposure cut is drawn after the walk's noise (as in the original order) but before
    # the walk, which then stops at `keep` steps; the loop draws nothing
    keep = max(2, int(n * rng.uniform(0.25, 1.0)))  # exposure fraction
    # Python floats throughout: numpy scalars would make the loop ~5x slower
    vx, vy = math.cos(angle) * step, math.sin(angle) * step
    x = y = 0.0
    xs, ys = [0.0] * keep, [0.0] * keep
    for t in range(keep - 1):  # ~0.5 us a step
        dx = anxiety * (gx[t] - centripetal * x) * step
        dy = anxiety * (gy[t] - centripetal * y) * step
        if shakes[t]:  # abrupt shake: turn back by ~180 degrees
            c, s = math.cos(np.pi + a[t] - 0.5), math.sin(np.pi + a[t] - 0.5)
            dx, dy = dx + 2 * (vx * c - vy * s), dy + 2 * (vx * s + vy * c)
        vx, vy = vx + dx, vy + dy
        norm = (vx * vx + vy * vy) ** 0.5 / step
        vx, vy = vx / norm, vy / norm
        x, y = x + vx, y + vy
        xs[t + 1], ys[t + 1] = x, y
    px, py = np.asarray(xs[:keep]), np.asarray(ys[:keep])
    px, py = px - px.mean(), py - py.mean()
    radius = max(np.abs(px).max(), np.abs(py).max())
    scale = rng.uniform(0.6, 1.0) * (size - 3) / 2 / radius if radius > 0 else 0.0
    px, py = px * scale + (size - 1) / 2, py * scale + (size - 1) / 2
    x0, y0 = np.floor(px).astype(np.int64), np.floor(py).astype(np.int64)
    fx, fy = px - x0, py - y0
    kernel = np.zeros(size * size)
    for ox, oy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy)):
        kernel += np.bincount((y0 + oy) * size + x0 + ox, weights=w, minlength=size * size)
    kernel += np.bincount((y0 + 1) * size + x0 + 1, weights=fx * fy, minlength=size * size)
    return (kernel / kernel.sum()).reshape(size, size).astype(np.float32)


def kernel_side_range(params: DegradeParams, max_side: int) -> tuple[int, int]:
    """The odd PSF sides :func:`random_kernels` draws from: `params.kernel_size`, capped at the
    largest odd int <= `max_side` (at least 3)."""
    cap = max(3, max_side - (1 - max_side % 2))
    hi = min(params.kernel_size[1], cap)
    return min(params.kernel_size[0], hi), hi


def random_kernels(
    rng: np.random.Generator, params: DegradeParams, max_side: int = 31
) -> np.ndarray:
    """One PSF, or two for spatially varying blur (probability `params.varying_share`).

    Returns float32 (n, k, k), n in {1, 2}, each >= 0, sum 1, centroid at the centre; k is
    odd, uniform in :func:`kernel_side_range` (`max_side` in px: e.g. half the crop).
    """
    lo, hi = kernel_side_range(params, max_side)
    side = 2 * int(rng.integers(lo // 2, hi // 2 + 1)) + 1
    count = 2 if rng.random() < params.varying_share else 1
    return np.stack([random_shake_kernel(side, rng) for _ in range(count)])


# --- degradation ------------------------------------------------------------------------------


class Degraded(NamedTuple):
    """Output of :func:`degrade`: uint8 sRGB `blur` and `sharp` (H, W, 3), pixel-aligned, and
    `kernel` float32 (k, k), the blur's PSF (for spatially varying blur, the PSFs averaged
    with the mean of the weight map: exact only where the map is flat)."""

    blur: np.ndarray
    sharp: np.ndarray
    kernel: np.ndarray


def fft_size(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n: an FFT length numpy handles fast (a large prime factor can
    make a transform 10x slower)."""
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p = p35
            while p < n:
                p *= 2
            best = min(best, p)
            p35 *= 3
        p5 *= 5
    return best


def convolve_valid(scene: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    """'valid' 2-D convolution of each channel with each kernel, by FFT.

    scene float32 (H, W, C), kernels float32 (n, k, k) -> float32 (n, H - k + 1, W - k + 1, C).
    Output pixel (i, j) is centred on scene pixel (i + k // 2, j + k // 2).
    """
    h, w = scene.shape[:2]
    k = kernels.shape[-1]
    shape = (fft_size(h), fft_size(w))
    out = np.empty((len(kernels), h - k + 1, w - k + 1, scene.shape[2]), dtype=np.float32)
    # float64 and one 2-D transform at a time: numpy's float32 and batched FFTs are 2-4x slower
    kspecs = [np.fft.rfft2(kernel.astype(np.float64), s=shape) for kernel in kernels]
    for c in range(scene.shape[2]):
        spectrum = np.fft.rfft2(scene[:, :, c].astype(np.float64), s=shape)
        for i, kspec in enumerate(kspecs):
            out[i, :, :, c] = np.fft.irfft2(spectrum * kspec, s=shape)[k - 1 : h, k - 1 : w]
    return out


def _smooth_weights(h: int, w: int, grid: np.ndarray) -> np.ndarray:
    """A (g, g) grid of values in [0, 1], bilinearly stretched over (h, w): float32 (h, w)."""
    g = grid.shape[0]

    def hat(n: int) -> np.ndarray:  # (n, g) linear-interpolation weights
        t = np.linspace(0.0, g - 1.0, n)[:, None]
        return np.maximum(0.0, 1.0 - np.abs(t - np.arange(g)[None])).astype(np.float32)

    return hat(h) @ grid.astype(np.float32) @ hat(w).T


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    u = rng.random()
    return 0.0 if hi == 0.0 else float(lo * (hi / lo) ** u)


def _check_inputs(scene: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    if not isinstance(scene, np.ndarray) or scene.ndim != 3 or scene.shape[2] != 3:
        got = getattr(scene, "shape", type(scene).__name__)
        raise ValueError(f"scene must be a numpy array (H, W, 3), got {got}")
    if scene.dtype != np.float32:
        raise ValueError(f"scene must be float32 linear light, got dtype {scene.dtype}")
    kernels = np.asarray(kernels, dtype=np.float32)
    if kernels.ndim == 2:
        kernels = kernels[None]
    k = kernels.shape[-1]
    if kernels.ndim != 3 or kernels.shape[0] not in (1, 2) or kernels.shape[1] != k or k % 2 == 0:
        raise ValueError(
            f"kernels must be (k, k) or (n, k, k), n in {{1, 2}}, k odd; got {kernels.shape}"
        )
    if min(scene.shape[:2]) < k:
        raise ValueError(f"scene {scene.shape} is smaller than the kernel {kernels.shape}")
    if not (np.isfinite(scene).all() and scene.min() >= 0):
        raise ValueError(f"scene {scene.shape} must be finite and >= 0 (linear light)")
    sums = kernels.sum(axis=(1, 2))
    if not np.isfinite(kernels).all() or kernels.min() < 0 or np.abs(sums - 1).max() > 1e-3:
        raise ValueError(
            f"kernels {kernels.shape} must be finite, >= 0 and sum to 1, got sums {sums.tolist()}"
        )
    return kernels


def degrade(
    scene: np.ndarray,
    kernels: np.ndarray,
    rng: np.random.Generator,
    params: DegradeParams = DEFAULT_PARAMS,
) -> Degraded:
    """Turn a linear-light scene into a pixel-aligned (blurred photo, sharp target) pair.

    Args:
        scene: float32 (H + k - 1, W + k - 1, 3), linear light, >= 0 (values above 1 are
            radiance beyond the white point); padded by the kernel radius on every side.
        kernels: float (k, k) or (n, k, k), n in {1, 2}, odd k, each summing to 1 with its
            centroid at the centre (:func:`random_kernels`). Two kernels are blended by a
            smooth random weight map (spatially varying blur).
        rng: the only source of randomness (same state -> same bytes).
        params: the sampling ranges (:class:`DegradeParams`).

    Returns:
        :class:`Degraded` (blur, sharp: uint8 sRGB (H, W, 3); kernel: float32 (k, k)). The
        sharp target is the scene's centre (H, W), boosted, clipped to [0, 1], sRGB-encoded.
        With a delta kernel, no highlights, no noise and no JPEG, blur == sharp.
    """
    kernels = _check_inputs(scene, kernels)
    k = kernels.shape[-1]
    r = k // 2
    # every random number is drawn in a fixed order, whatever the branch: switching one step
    # off (noise, JPEG) leaves the others' draws unchanged
    boost = rng.random() < params.highlight_share
    gain = rng.uniform(*params.highlight_gain)
    shot = _log_uniform(rng, *params.shot_noise)
    read = _log_uniform(rng, *params.read_noise)
    jpeg = rng.random() < params.jpeg_share
    quality = int(rng.integers(params.jpeg_quality[0], params.jpeg_quality[1] + 1))
    grid = rng.random((3, 3))

    if boost and gain > 1.0:  # pixels from the threshold up to white ramp to `gain`
        t = params.highlight_threshold
        brightest = np.maximum(np.maximum(scene[..., 0], scene[..., 1]), scene[..., 2])
        ramp = np.clip((brightest - t) * np.float32(1.0 / (1.0 - t)), 0.0, 1.0)
        scene = scene * (1.0 + np.float32(gain - 1.0) * ramp)[..., None]
    h, w = scene.shape[0] - 2 * r, scene.shape[1] - 2 * r
    sharp = encode_u8(scene[r : r + h, r : r + w])

    blurred = convolve_valid(scene, kernels)
    if len(kernels) == 2:
        weight = _smooth_weights(h, w, grid)[..., None]
        blurred = blurred[1] + weight * (blurred[0] - blurred[1])
        mean_w = float(weight.mean())
        psf = (mean_w * kernels[0] + (1.0 - mean_w) * kernels[1]).astype(np.float32)
    else:
        blurred, psf = blurred[0], kernels[0]
    np.clip(blurred, 0.0, 1.0, out=blurred)  # the sensor saturates
    if shot > 0 or read > 0:
        std = np.sqrt(np.float32(shot) * blurred + np.float32(read * read))
        blurred += std * rng.standard_normal(blurred.shape, dtype=np.float32)
    blur = encode_u8(blurred)
    if jpeg:
        buffer = io.BytesIO()
        Image.fromarray(blur).save(buffer, format="JPEG", quality=quality)
        with Image.open(buffer) as img:
            blur = np.asarray(img.convert("RGB"))
    return Degraded(blur, sharp, psf)
