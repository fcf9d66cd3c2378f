"""Tests for deblur_lib.metrics: scikit-image parity, the PSNR cap, guards, no sync."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import deblur_lib.metrics as metrics
from deblur_lib.metrics import PSNR_CAP_DB, MetricError, calculate_metrics, denormalize, psnr, ssim

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_pair(shape: tuple[int, ...], seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=g, dtype=torch.float64)
    pred = (target + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return pred.to(dtype), target.to(dtype)


def _astronaut_pair(n: int = 3, size: int = 96, seed: int = 0):
    """Real-image crops (sharp) and blurred + noisy versions, metric space (n, 3, s, s)."""
    img = torch.from_numpy(skdata.astronaut()).permute(2, 0, 1).float() / 255
    g = torch.Generator().manual_seed(seed)
    corners = torch.randint(0, img.shape[-1] - size, (n, 2), generator=g).tolist()
    sharp = torch.stack([img[:, r : r + size, c : c + size] for r, c in corners])
    blurred = F.avg_pool2d(sharp, 5, 1, 2, count_include_pad=False)
    noisy = (blurred + 0.02 * torch.randn(sharp.shape, generator=g)).clamp(0, 1)
    return noisy, sharp


def _hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def _sk_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return structural_similarity(
        b, a, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
        channel_axis=-1,
    )  # fmt: skip


PAIRS = {
    "random_f32": lambda: _random_pair((3, 3, 48, 64)),
    "random_f64": lambda: _random_pair((2, 3, 40, 40), seed=1, dtype=torch.float64),
    "random_11px": lambda: _random_pair((2, 3, 11, 30), seed=2),
    "astronaut": lambda: _astronaut_pair(),
    "astronaut_blur_only": lambda: (
        F.avg_pool2d(_astronaut_pair()[1], 3, 1, 1),
        _astronaut_pair()[1],
    ),
}


@pytest.mark.parametrize("name", PAIRS)
def test_psnr_and_ssim_match_skimage(name: str) -> None:
    pred, target = PAIRS[name]()
    a, b = _hwc(pred), _hwc(target)
    ref_psnr = [
        peak_signal_noise_ratio(bi, ai, data_range=1.0) for ai, bi in zip(a, b, strict=True)
    ]
    ref_ssim = [_sk_ssim(ai, bi) for ai, bi in zip(a, b, strict=True)]
    p, s = psnr(pred, target), ssim(pred, target)
    assert p.dtype == s.dtype == torch.float64 and p.shape == s.shape == (pred.shape[0],)
    np.testing.assert_allclose(p.numpy(), ref_psnr, rtol=0, atol=1e-4)
    np.testing.assert_allclose(s.numpy(), ref_ssim, rtol=0, atol=1e-3)
    np.testing.assert_allclose(s.numpy(), ref_ssim, rtol=0, atol=1e-5)  # in fact much closer


def test_single_channel_and_crop_border_match_skimage() -> None:
    pred, target = _random_pair((2, 1, 50, 60), seed=3)
    a, b = pred[:, 0].numpy(), target[:, 0].numpy()
    for crop in (0, 4):
        sl = np.s_[crop : a.shape[1] - crop, crop : a.shape[2] - crop]
        for i in range(2):
            ref_p = peak_signal_noise_ratio(b[i][sl], a[i][sl], data_range=1.0)
            ref_s = structural_similarity(
                b[i][sl], a[i][sl], gaussian_weights=True, sigma=1.5,
                use_sample_covariance=False, data_range=1.0,
            )  # fmt: skip
            assert abs(psnr(pred, target, crop_border=crop)[i].item() - ref_p) < 1e-4
            assert abs(ssim(pred, target, crop_border=crop)[i].item() - ref_s) < 1e-3


def test_y_channel_is_bt601_of_rgb_not_bgr() -> None:
    pred, target = _astronaut_pair(2, 64)
    y_pred = rgb2ycbcr(_hwc(pred))[..., 0] / 255  # skimage: RGB in [0, 1] -> Y in [16, 235]
    y_target = rgb2ycbcr(_hwc(target))[..., 0] / 255
    for i in range(2):
        ref = peak_signal_noise_ratio(y_target[i], y_pred[i], data_range=1.0)
        assert abs(psnr(pred, target, y_channel=True)[i].item() - ref) < 1e-4
        ref_s = structural_similarity(
            y_target[i], y_pred[i], gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=1.0,
        )  # fmt: skip
        assert abs(ssim(pred, target, y_channel=True)[i].item() - ref_s) < 1e-3
    bgr = psnr(pred.flip(1), target.flip(1), y_channel=True)  # BasicSR's BGR helper on RGB data
    assert (bgr - psnr(pred, target, y_channel=True)).abs().min() > 0.01


def test_identical_images_give_the_documented_cap() -> None:
    _, target = _random_pair((2, 3, 32, 32))
    with np.errstate(divide="ignore"):
        assert peak_signal_noise_ratio(_hwc(target)[0], _hwc(target)[0], data_range=1.0) == np.inf
    assert psnr(target, target).tolist() == [PSNR_CAP_DB, PSNR_CAP_DB]
    torch.testing.assert_close(ssim(target, target), torch.ones(2, dtype=torch.float64))
    assert (psnr(target, target + 1e-6) == PSNR_CAP_DB).all()  # 120 dB is capped too


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_pixel_gives_nonfinite_result_for_its_sample_only(value: float) -> None:
    pred, target = _random_pair((3, 3, 32, 32))
    clean_p, clean_s = psnr(pred, target), ssim(pred, target)
    pred[1, 2, 3, 4] = value
    p, s = psnr(pred, target), ssim(pred, target)
    assert not torch.isfinite(p[1]) and not torch.isfinite(s[1])
    keep = torch.tensor([True, False, True])
    torch.testing.assert_close(p[keep], clean_p[keep])
    torch.testing.assert_close(s[keep], clean_s[keep])


def test_chunked_batches_equal_single_images(monkeypatch) -> None:
    pred, target = _random_pair((7, 3, 24, 24), seed=4)
    whole_p, whole_s = psnr(pred, target), ssim(pred, target)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMS", 2 * 3 * 24 * 24)  # chunks of 2 images
    torch.testing.assert_close(psnr(pred, target), whole_p)
    torch.testing.assert_close(ssim(pred, target), whole_s)
    singles = torch.cat([ssim(pred[i : i + 1], target[i : i + 1]) for i in range(7)])
    torch.testing.assert_close(singles, whole_s)


@pytest.mark.parametrize("shape", [(2, 3, 10, 64), (1, 3, 5, 5)])
def test_too_small_for_the_window_raises_naming_the_shape(shape: tuple[int, ...]) -> None:
    pred, target = _random_pair(shape)
    with pytest.raises(ValueError, match="win_size exceeds image extent"):
        _sk_ssim(_hwc(pred)[0], _hwc(target)[0])  # what the seed's broad except hid
    with pytest.raises(MetricError, match=rf"\({', '.join(map(str, shape))}\)"):
        ssim(pred, target)
    with pytest.raises(MetricError, match="11x11"):
        calculate_metrics(pred * 2 - 1, target * 2 - 1)
    assert psnr(pred, target).shape == (shape[0],)  # PSNR has no window


def test_crop_border_leaving_too_little_raises() -> None:
    pred, target = _random_pair((1, 3, 24, 24))
    with pytest.raises(MetricError, match="crop_border=7"):
        ssim(pred, target, crop_border=7)
    with pytest.raises(MetricError, match="crop_border=12"):
        psnr(pred, target, crop_border=12)


BAD_INPUTS = {
    "shape_mismatch": (torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 16, 15), r"\(2, 3, 16, 15\)"),
    "batch_mismatch": (torch.zeros(2, 3, 16, 16), torch.zeros(3, 3, 16, 16), r"\(3, 3, 16, 16\)"),
    "three_dims": (torch.zeros(3, 16, 16), torch.zeros(3, 16, 16), r"\(3, 16, 16\)"),
    "uint8": (torch.zeros(1, 3, 16, 16, dtype=torch.uint8),) * 2 + (r"torch\.uint8",),
    "not_a_tensor": (np.zeros((1, 3, 16, 16)), torch.zeros(1, 3, 16, 16), "ndarray"),
}


@pytest.mark.parametrize("fn", [psnr, ssim, calculate_metrics])
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_input_mistakes_raise_value_errors_naming_shapes(fn, case: str) -> None:
    pred, target, pattern = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=pattern):
        fn(pred, target)


BAD_ARGUMENTS = [
    {"data_range": 0},
    {"data_range": -1.0},
    {"data_range": math.inf},
    {"data_range": math.nan},
    {"data_range": True},
    {"y_channel": True},
]


@pytest.mark.parametrize("kwargs", BAD_ARGUMENTS, ids=[str(k) for k in BAD_ARGUMENTS])
def test_bad_arguments_raise(kwargs: dict) -> None:
    """A MetricError (a ValueError): inf, NaN or a bool data_range used to pass unchecked."""
    pred, target = _random_pair((1, 1, 16, 16))
    for fn in (psnr, ssim):
        with pytest.raises(MetricError):
            fn(pred, target, **kwargs)


@pytest.mark.parametrize("fn", [psnr, ssim, calculate_metrics])
def test_empty_batch_is_a_metric_error(fn) -> None:
    """Not an IndexError from inside the chunking: the library's own error, naming the shape."""
    with pytest.raises(MetricError, match=r"empty batch.*\(0, 3, 16, 16\)"):
        fn(torch.zeros(0, 3, 16, 16), torch.zeros(0, 3, 16, 16))


def _forbid(*_args, **_kwargs):
    raise RuntimeError("host-device sync in a hot path")


def test_psnr_and_ssim_never_sync(monkeypatch) -> None:
    pred, target = _random_pair((3, 3, 32, 32))
    pred[0, 0, 5, 5] = float("nan")
    for name in ("item", "__bool__", "tolist", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, _forbid)
    p, s = psnr(pred, target, crop_border=2, y_channel=True), ssim(pred, target)
    monkeypatch.undo()
    assert torch.isnan(p[0]) and torch.isfinite(s[1:]).all()


def test_calculate_metrics_model_space() -> None:
    pred, target = _astronaut_pair(3, 64)
    out, tgt = pred * 2 - 1, target * 2 - 1
    p, s = calculate_metrics(out, tgt)
    assert isinstance(p, float) and isinstance(s, float)
    x, y = denormalize(out), denormalize(tgt)
    assert p == pytest.approx(psnr(x, y).mean().item(), abs=1e-12)
    assert s == pytest.approx(ssim(x, y).mean().item(), abs=1e-12)
    assert p == pytest.approx(psnr(pred, target).mean().item(), abs=1e-4)
    over = out.clone()
    over[:, :, :4] = 1.5  # model outputs beyond [-1, 1] are clamped, as denormalize documents
    assert calculate_metrics(over, tgt) == calculate_metrics(over.clamp(-1, 1), tgt)
    assert calculate_metrics(tgt, tgt) == (PSNR_CAP_DB, pytest.approx(1.0))


def test_calculate_metrics_nonfinite_raises_with_counts() -> None:
    pred, target = _random_pair((2, 3, 16, 16))
    out, tgt = pred * 2 - 1, target * 2 - 1
    out[0, 0, 0, :3] = float("nan")
    tgt[1, 1, 1, 1] = float("-inf")
    with pytest.raises(MetricError, match="3 in outputs, 1 in targets"):
        calculate_metrics(out, tgt)


def test_calculate_metrics_rejects_targets_outside_model_space() -> None:
    pred, target = _random_pair((1, 3, 16, 16))
    with pytest.raises(MetricError, match=r"\[-1, 1\]"):
        calculate_metrics(pred * 255, target * 255)


def test_denormalize_clamps_to_metric_space() -> None:
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0])
    assert denormalize(x).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_without_sync() -> None:
    pred, target = _astronaut_pair(4, 64)
    ref_p, ref_s = psnr(pred, target), ssim(pred, target)
    pred, target = pred.cuda(), target.cuda()
    psnr(pred, target), ssim(pred, target)  # warm-up: caches the window on the device
    torch.cuda.set_sync_debug_mode("error")
    try:
        p, s = psnr(pred, target), ssim(pred, target)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(p.cpu(), ref_p, rtol=0, atol=1e-6)
    # float32 SSIM moves ~1e-6 with the order of the 11-tap sums, which differs on CUDA
    torch.testing.assert_close(s.cpu(), ref_s, rtol=0, atol=1e-5)
