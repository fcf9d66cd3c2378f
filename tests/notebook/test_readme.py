"""The README's shipped-model figure: drawn from the shipped weights, no hand-picked image."""

import re

import pytest
import torch

from deblur_lib.notebook import readme
from deblur_lib.synth import synthesize


@pytest.fixture(scope="module")
def test_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    synthesize(root, n_train=1, n_test=5, size=96, seed=3, progress=False)
    return root / "test"


def _gain(label: str) -> float:
    return float(re.search(r"gain: ([+-][\d.]+) dB", label).group(1))


def test_shipped_row_shows_best_median_and_worst(test_dir, tmp_path):
    fig = readme.shipped_row(test_dir)
    axes = fig.axes
    assert len(axes) == 9  # 3 rows (best, median, worst) x blurred / restored / sharp
    labels = [ax.get_ylabel() for ax in axes if ax.get_ylabel()]
    assert [lab.split()[0] for lab in labels] == ["best", "median", "worst"]
    gains = [_gain(lab) for lab in labels]
    assert gains == sorted(gains, reverse=True)
    captions = [ax.get_xlabel() for ax in axes if ax.get_xlabel()]
    assert len(captions) == 6 and all(c.endswith(" dB") for c in captions)  # blurred, restored
    for row, gain in enumerate(gains):  # the row label is restored minus blurred PSNR
        before, after = (float(c.split()[0]) for c in captions[row * 2 : row * 2 + 2])
        assert after - before == pytest.approx(gain, abs=0.011)
    path = readme.write_png(fig, tmp_path / "shipped.png")
    assert 0 < path.stat().st_size <= readme.MAX_BYTES


def test_center_crop_and_missing_weights(test_dir):
    image = torch.zeros(3, 200, 150)
    assert readme._center(image, 128).shape == (3, 128, 128)
    assert readme._center(image, 256).shape == (3, 200, 150)
    with pytest.raises(ValueError, match="no shipped weights 'nope'"):
        readme.shipped_row(test_dir, name="nope")
