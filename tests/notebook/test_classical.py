"""Classical baselines: Wiener and Richardson-Lucy with the true kernel beat the blurred input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import convolve
from skimage import data
from skimage.metrics import peak_signal_noise_ratio
from skimage.transform import resize

from deblur_lib.notebook import classical


def _motion_kernel(size: int = 11) -> np.ndarray:
    kernel = np.zeros((size, size))
    for i in range(size):
        kernel[size // 2 + (i - size // 2) // 3, i] = 1.0
    return kernel / kernel.sum()


@pytest.fixture(scope="module")
def sample() -> classical.Sample:
    rng = np.random.default_rng(0)
    sharp = resize(data.astronaut()[100:356, 100:356], (96, 96), anti_aliasing=True)
    kernel = _motion_kernel()
    blur = np.stack([convolve(sharp[..., c], kernel, mode="reflect") for c in range(3)], -1)
    blur = np.clip(blur + rng.normal(0.0, 0.01, blur.shape), 0.0, 1.0)
    return classical.Sample("0000", blur.astype(np.float32), sharp.astype(np.float32), kernel)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return peak_signal_noise_ratio(a, b, data_range=1.0)


@pytest.mark.parametrize(("method", "param"), [("wiener", 0.1), ("richardson_lucy", 20)])
def test_deconvolution_beats_the_blurred_input(sample, method, param):
    out = classical.deblur(method, sample.blur, sample.kernel, param)
    assert out.shape == sample.blur.shape
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert _psnr(sample.sharp, out) > _psnr(sample.sharp, sample.blur) + 1.0


def test_tune_reports_every_grid_value_and_picks_the_best(sample):
    tuned = classical.tune("wiener", [sample], grid=(0.003, 0.1))
    assert set(tuned.scores) == {0.003, 0.1}
    assert tuned.best == max(tuned.scores, key=tuned.scores.get)
    assert tuned.param_name == "balance"


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda s: classical.wiener_deblur(s.blur[..., 0], s.kernel), "H, W, 3"),
        (lambda s: classical.wiener_deblur(s.blur, s.kernel[None]), "2-D"),
        (lambda s: classical.wiener_deblur(s.blur[:5, :5], s.kernel), "smaller than the kernel"),
        (lambda s: classical.wiener_deblur(s.blur, s.kernel, balance=0.0), "balance"),
        (lambda s: classical.richardson_lucy_deblur(s.blur, s.kernel, num_iter=0), "num_iter"),
        (lambda s: classical.deblur("tv", s.blur, s.kernel, 1.0), "unknown method"),
        (lambda s: classical.tune("wiener", []), "at least one"),
    ],
)
def test_bad_input_raises_value_error(sample, call, match):
    with pytest.raises(ValueError, match=match):
        call(sample)


def test_load_samples_reads_the_synthesize_layout(tmp_path, sample):
    from PIL import Image

    for sub in ("blur", "sharp", "kernels"):
        (tmp_path / sub).mkdir()
    for sub, img in (("blur", sample.blur), ("sharp", sample.sharp)):
        Image.fromarray((img * 255).round().astype(np.uint8)).save(tmp_path / sub / "0000.png")
    np.save(tmp_path / "kernels" / "0000.npy", sample.kernel.astype(np.float32))
    (loaded,) = classical.load_samples(tmp_path)
    assert loaded.name == "0000" and loaded.blur.shape == (96, 96, 3)
    np.testing.assert_allclose(loaded.kernel, sample.kernel, atol=1e-6)
    (tmp_path / "kernels" / "0000.npy").unlink()
    with pytest.raises(FileNotFoundError, match="0000.npy"):
        classical.load_samples(tmp_path)


def test_evaluate_methods_scores_every_method_on_every_sample(sample):
    methods = {
        "blurred": lambda s: s.blur,
        "sharp": lambda s: s.sharp,
        "wiener": classical.restorer("wiener", 0.1),
        "identity model": classical.model_restorer(torch.nn.Identity()),
    }
    table, outputs = classical.evaluate_methods([sample, sample], methods)
    assert len(table) == 8 and set(outputs) == set(methods)
    mean = table.groupby("method")["psnr"].mean()
    assert mean["sharp"] == 100.0  # deblur_lib.metrics caps identical images
    assert mean["wiener"] > mean["blurred"]
    assert mean["identity model"] == pytest.approx(mean["blurred"], abs=1e-3)
    assert table["ssim"].between(-1, 1).all()
    with pytest.raises(ValueError, match="returned"):
        classical.evaluate_methods([sample], {"bad": lambda s: s.blur[:4]})


def test_tuning_table_marks_the_chosen_value(sample):
    tuned = classical.tune("richardson_lucy", [sample], grid=(5, 10))
    table = classical.tuning_table([tuned])
    assert list(table["value"]) == [5, 10] and table["chosen"].sum() == 1
    assert table.loc[table["chosen"], "value"].item() == tuned.best
