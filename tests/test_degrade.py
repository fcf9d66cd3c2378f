"""deblur_lib.degrade: tone curve, shake kernels, and the realistic blur pipeline (alignment,
saturation, signal-dependent noise, JPEG, determinism, input and parameter checks)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from deblur_lib.degrade import (
    DEFAULT_PARAMS,
    DegradeParams,
    convolve_valid,
    decode_u8,
    degrade,
    encode_u8,
    fft_size,
    kernel_side_range,
    linear_to_srgb,
    random_kernels,
    random_shake_kernel,
    srgb_to_linear,
)

CLEAN = DegradeParams(
    varying_share=0.0, highlight_share=0.0, shot_noise=(0, 0), read_noise=(0, 0), jpeg_share=0.0
)


def _scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A linear-light scene float32 (h, w, 3) from random 8-bit sRGB values."""
    return decode_u8(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _delta(k: int) -> np.ndarray:
    kernel = np.zeros((k, k), np.float32)
    kernel[k // 2, k // 2] = 1
    return kernel


# --- tone curve -------------------------------------------------------------------------------


def test_tone_curve_round_trips() -> None:
    levels = np.arange(256, dtype=np.uint8)
    assert np.array_equal(encode_u8(decode_u8(levels)), levels)
    assert decode_u8(levels).dtype == np.float32
    x = np.linspace(0, 1, 1001)
    np.testing.assert_allclose(linear_to_srgb(srgb_to_linear(x)), x, atol=1e-12)
    y = np.random.default_rng(0).random(10_000)
    exact = np.round(linear_to_srgb(y) * 255)
    assert np.abs(encode_u8(y).astype(int) - exact).max() <= 1
    assert encode_u8(np.array([-1.0, 2.0])).tolist() == [0, 255]  # clipped


def test_fft_size_is_5_smooth_and_not_smaller() -> None:
    for n in (1, 7, 97, 158, 286, 1000):
        m = fft_size(n)
        assert m >= n and m < 2 * n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        assert m == 1


# --- kernels ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [3, 7, 15, 31])
def test_random_shake_kernel(size: int) -> None:
    k = random_shake_kernel(size, np.random.default_rng(size))
    assert k.shape == (size, size) and k.dtype == np.float32
    assert k.min() >= 0 and abs(float(k.sum()) - 1) < 1e-5
    yy, xx = np.mgrid[:size, :size]
    centre = (size - 1) / 2
    assert abs((k * yy).sum() - centre) < 1e-3 and abs((k * xx).sum() - centre) < 1e-3
    again = random_shake_kernel(size, np.random.default_rng(size))
    assert np.array_equal(k, again)
    if size >= 15:
        assert (k > 0).sum() > size  # a trajectory, not a dot


@pytest.mark.parametrize("size", [4, 1, 7.0, True])
def test_random_shake_kernel_rejects_bad_size(size: object) -> None:
    with pytest.raises(ValueError, match="odd int"):
        random_shake_kernel(size, np.random.default_rng(0))


def test_random_kernels_sides_count_and_cap() -> None:
    rng = np.random.default_rng(0)
    sides, counts = set(), set()
    for _ in range(40):
        ks = random_kernels(rng, DEFAULT_PARAMS, max_side=32)
        assert ks.dtype == np.float32 and ks.ndim == 3 and ks.shape[1] == ks.shape[2]
        np.testing.assert_allclose(ks.sum(axis=(1, 2)), 1, atol=1e-5)
        sides.add(ks.shape[-1])
        counts.add(len(ks))
    assert sides <= set(range(7, 32, 2)) and len(sides) > 5 and counts == {1, 2}
    assert kernel_side_range(DEFAULT_PARAMS, 16) == (7, 15)  # capped at the odd <= max_side
    assert kernel_side_range(DEFAULT_PARAMS, 4) == (3, 3)
    one = DegradeParams(kernel_size=(9, 9), varying_share=0.0)
    assert random_kernels(rng, one).shape == (1, 9, 9)
    assert len(random_kernels(rng, DegradeParams(varying_share=1.0))) == 2


# --- the pipeline -----------------------------------------------------------------------------


def test_convolve_valid_is_a_true_convolution() -> None:
    rng = np.random.default_rng(0)
    scene = rng.random((12, 10, 3)).astype(np.float32)
    kernels = rng.random((2, 5, 5)).astype(np.float32)
    out = convolve_valid(scene, kernels)
    assert out.shape == (2, 8, 6, 3) and out.dtype == np.float32
    ref = np.zeros(out.shape)
    for n, k in enumerate(kernels):
        for u in range(5):
            for v in range(5):  # y[i] = sum_u k[u] x[i + 4 - u]: the kernel is flipped
                ref[n] += k[u, v] * scene[4 - u : 12 - u, 4 - v : 10 - v]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 2])
def test_delta_kernel_without_noise_or_jpeg_gives_the_sharp_image(n: int) -> None:
    scene = _scene(40, 44)
    out = degrade(scene, np.stack([_delta(9)] * n), np.random.default_rng(0), CLEAN)
    assert out.blur.shape == out.sharp.shape == (32, 36, 3)
    assert out.blur.dtype == out.sharp.dtype == np.uint8
    assert np.array_equal(out.blur, out.sharp)
    assert np.array_equal(out.sharp, encode_u8(scene[4:-4, 4:-4]))  # the scene's centre
    assert np.array_equal(out.kernel, _delta(9))


def test_blur_keeps_the_image_centred() -> None:
    """A point light blurred by a real shake PSF: its blurred centroid is the sharp point."""
    rng = np.random.default_rng(3)
    kernel = random_shake_kernel(21, rng)
    scene = np.zeros((61, 61, 3), np.float32)
    scene[30, 34] = 0.9
    out = degrade(scene, kernel, rng, CLEAN)
    sharp, blur = decode_u8(out.sharp)[..., 0], decode_u8(out.blur)[..., 0]
    assert np.unravel_index(sharp.argmax(), sharp.shape) == (20, 24)
    yy, xx = np.mgrid[: blur.shape[0], : blur.shape[1]]
    total = blur.sum()
    assert abs((blur * yy).sum() / total - 20) < 0.2 and abs((blur * xx).sum() / total - 24) < 0.2
    assert (blur > 0).sum() > 20  # spread by the kernel


def test_returned_kernel_sums_to_one_for_varying_blur() -> None:
    rng = np.random.default_rng(1)
    kernels = random_kernels(rng, DegradeParams(varying_share=1.0), max_side=15)
    out = degrade(_scene(50, 50), kernels, rng)
    assert out.kernel.shape == kernels.shape[1:] and out.kernel.dtype == np.float32
    assert abs(float(out.kernel.sum()) - 1) < 1e-5 and out.kernel.min() >= 0


def test_spatially_varying_blur_blends_two_kernels() -> None:
    """Two delta kernels shifted apart: every output pixel lies between the two shifted copies."""
    left, right = np.zeros((2, 5, 5), np.float32)
    left[2, 0] = right[2, 4] = 1
    scene = _scene(40, 40)
    out = degrade(scene, np.stack([left, right]), np.random.default_rng(0), CLEAN)
    a = decode_u8(encode_u8(convolve_valid(scene, left[None])[0]))
    b = decode_u8(encode_u8(convolve_valid(scene, right[None])[0]))
    got = decode_u8(out.blur)
    lo, hi = np.minimum(a, b) - 2e-3, np.maximum(a, b) + 2e-3
    assert ((got >= lo) & (got <= hi)).mean() > 0.99
    assert not np.array_equal(out.blur, encode_u8(a)) and not np.array_equal(out.blur, encode_u8(b))


def test_highlights_exceed_white_before_the_blur_and_clip_after() -> None:
    """A one-pixel white line under a 5 px horizontal box blur: 1/5 of white spread over 5 px,
    unless the highlight is boosted (x6), when the streak itself saturates."""
    scene = np.full((21, 25, 3), 0.05, np.float32)
    scene[:, 12] = 1.0
    box = np.zeros((5, 5), np.float32)
    box[2] = 0.2
    boosted = replace(CLEAN, highlight_share=1.0, highlight_gain=(6.0, 6.0))
    plain = degrade(scene, box, np.random.default_rng(0), CLEAN)
    bright = degrade(scene, box, np.random.default_rng(0), boosted)
    for out in (plain, bright):  # the sharp target is clipped: white stays 255, the rest as is
        assert (out.sharp[:, 10] == 255).all()
        assert np.array_equal(np.delete(out.sharp, 10, axis=1), np.delete(plain.sharp, 10, axis=1))
    streak = decode_u8(plain.blur[:, 8:13])
    np.testing.assert_allclose(streak, 0.2 + 0.8 * 0.05, atol=3e-3)  # linear light is additive
    assert (bright.blur[:, 8:13] == 255).all()  # 6 * 0.2 > 1: clipped after the blur
    assert np.array_equal(bright.blur[:, :6], plain.blur[:, :6])  # below threshold: unchanged


@pytest.mark.parametrize("shot, read", [(2e-3, 2e-3), (5e-4, 5e-3), (0.0, 4e-3)])
def test_noise_variance_follows_shot_and_read_parameters(shot: float, read: float) -> None:
    """Poisson-Gaussian noise: variance shot * x + read^2 at linear level x, measured in linear
    light after decoding the 8-bit output (plus the 8-bit step's step^2 / 12 in linear light)."""
    params = replace(CLEAN, shot_noise=(shot, shot), read_noise=(read, read))
    variances = []
    for level in (0.1, 0.3, 0.6):
        scene = np.full((160, 160, 3), level, np.float32)
        out = degrade(scene, _delta(3), np.random.default_rng(0), params)
        measured = decode_u8(out.blur).astype(np.float64).var()
        s = float(linear_to_srgb(level))
        step = float(srgb_to_linear(s + 0.5 / 255) - srgb_to_linear(s - 0.5 / 255))
        expected = shot * level + read**2 + step**2 / 12
        assert measured == pytest.approx(expected, rel=0.15)
        variances.append(measured)
    if shot:
        assert variances[0] < variances[1] < variances[2]  # signal-dependent


def test_noise_is_signal_dependent_at_the_defaults() -> None:
    rng = np.random.default_rng(0)
    dark, bright = [], []
    for _ in range(8):
        for level, into in ((0.05, dark), (0.5, bright)):
            scene = np.full((64, 64, 3), level, np.float32)
            out = degrade(scene, _delta(3), rng, DegradeParams(jpeg_share=0.0))
            into.append(decode_u8(out.blur).var())
    assert np.mean(bright) > 2 * np.mean(dark)


def test_jpeg_changes_only_the_blurred_image() -> None:
    scene = _scene(70, 70)
    kernel = random_shake_kernel(7, np.random.default_rng(0))
    plain = degrade(scene, kernel, np.random.default_rng(5), CLEAN)
    errors = []
    for quality in (30, 90):
        jpeg = replace(CLEAN, jpeg_share=1.0, jpeg_quality=(quality, quality))
        coded = degrade(scene, kernel, np.random.default_rng(5), jpeg)
        assert np.array_equal(coded.sharp, plain.sharp)
        errors.append(np.abs(coded.blur.astype(int) - plain.blur.astype(int)).mean())
    assert errors[0] > errors[1] > 0


def test_degrade_is_deterministic_per_rng_state() -> None:
    scene = _scene(48, 48)
    kernels = random_kernels(np.random.default_rng(0), DegradeParams(varying_share=1.0), 15)
    params = DegradeParams(highlight_share=1.0, jpeg_share=1.0)
    a = degrade(scene, kernels, np.random.default_rng(7), params)
    b = degrade(scene, kernels, np.random.default_rng(7), params)
    c = degrade(scene, kernels, np.random.default_rng(8), params)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a.blur, c.blur)


@pytest.mark.parametrize(
    "scene, kernels, match",
    [
        (np.zeros((20, 20), np.float32), _delta(3), r"\(H, W, 3\), got \(20, 20\)"),
        (np.zeros((20, 20, 3), np.float64), _delta(3), "float32"),
        (np.zeros((20, 20, 3), np.float32), np.ones((4, 4)) / 16, r"k odd; got \(1, 4, 4\)"),
        (np.zeros((20, 20, 3), np.float32), np.ones((3, 3, 3)) / 9, r"\(3, 3, 3\)"),
        (np.zeros((4, 20, 3), np.float32), _delta(5), "smaller than the kernel"),
        (np.full((20, 20, 3), -1, np.float32), _delta(3), ">= 0"),
        (np.full((20, 20, 3), np.nan, np.float32), _delta(3), "finite"),
        (np.zeros((20, 20, 3), np.float32), np.ones((3, 3)), "sum to 1"),
    ],
)
def test_degrade_rejects_bad_inputs(scene: np.ndarray, kernels: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        degrade(scene, kernels, np.random.default_rng(0))


# --- parameters -------------------------------------------------------------------------------


def test_default_params_are_documented_values() -> None:
    d = DEFAULT_PARAMS.to_dict()
    assert d["kernel_size"] == [7, 31] and d["jpeg_quality"] == [70, 95]
    assert DegradeParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}) == (
        DEFAULT_PARAMS
    )
    with pytest.raises(AttributeError):
        DEFAULT_PARAMS.jpeg_share = 0.0  # frozen


@pytest.mark.parametrize(
    "field, value",
    [
        ("kernel_size", (8, 31)),
        ("kernel_size", (7, 32)),
        ("kernel_size", (1, 7)),
        ("kernel_size", (15, 7)),
        ("kernel_size", 7),
        ("kernel_size", (7.0, 31.0)),
        ("varying_share", 1.5),
        ("varying_share", -0.1),
        ("highlight_share", float("nan")),
        ("jpeg_share", True),
        ("highlight_threshold", 1.0),
        ("highlight_threshold", 0.0),
        ("highlight_gain", (0.5, 2.0)),
        ("highlight_gain", (3.0, 2.0)),
        ("shot_noise", (0.0, 1e-3)),
        ("shot_noise", (-1e-3, 1e-3)),
        ("read_noise", (2e-3, 1e-3)),
        ("read_noise", (1e-3, float("inf"))),
        ("jpeg_quality", (0, 90)),
        ("jpeg_quality", (70, 101)),
        ("jpeg_quality", (70.0, 90.0)),
    ],
)
def test_params_reject_bad_fields(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"DegradeParams.{field}"):
        DegradeParams(**{field: value})
