"""The seed's fixes, checked: small crops, NaN predictions, hidden NameError, bad batches."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from deblur_lib.data import synthesize
from deblur_lib.models import build_model
from deblur_lib.notebook import fixes


@pytest.fixture(scope="module")
def test_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("synth")
    synthesize(root, n_train=1, n_test=3, size=64, seed=0, progress=False)
    return str(root / "test")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("tiny").eval()


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_small_crops_stock_asserts_seed_drops_msssim_ours_adapts():
    claim = fixes.small_crops(sizes=(64, 161))
    assert claim.holds == "holds", claim.verdict
    small, full = claim.evidence["64 px"], claim.evidence["161 px"]
    assert small["stock (seed loss)"] == "AssertionError"
    assert small["seed fix 1"].endswith("(Charbonnier only)")
    assert small["ours MS-SSIM fallbacks"] == 0 and small["ours grad finite"]
    assert full["stock (seed loss)"] != "AssertionError"


def test_small_crops_on_a_real_pair_and_a_crop_too_big():
    pair = (torch.rand(1, 3, 70, 70) * 2 - 1, torch.rand(1, 3, 70, 70) * 2 - 1)
    assert fixes.small_crops(pair=pair, sizes=(32,)).holds == "holds"
    with pytest.raises(ValueError, match="does not fit"):
        fixes.small_crops(pair=pair, sizes=(71,))


def test_no_loss_rescues_a_nan_prediction():
    claim = fixes.charbonnier_fallback_on_nan_prediction()
    assert claim.holds == "holds", claim.verdict
    assert all(v["NaN grads"] == "100%" for v in claim.evidence.values())
    assert math.isfinite(claim.evidence["Charbonnier, NaN sample dropped"]["loss"])


def test_broad_except_hides_the_nameerror_and_evaluate_does_not():
    claim = fixes.broad_except_hides_nameerror()
    assert claim.holds == "holds", claim.verdict
    assert claim.evidence["seed metrics with the missing import"] == (0.0, 0.0)
    assert claim.evidence["evaluate()"].startswith("NameError")


def test_bad_validation_set_layout(test_dir):
    batches, labels = fixes.bad_validation_set(test_dir, n_good=3, batch_size=2)
    assert labels == ["2 good image(s)", "1 good image(s)", "6x6 px crop", "NaN pixel in input"]
    assert [tuple(b.shape) for b, _ in batches] == [
        (2, 3, 64, 64),
        (1, 3, 64, 64),
        (1, 3, 6, 6),
        (1, 3, 64, 64),
    ]
    assert torch.isnan(batches[3][0]).sum() == 3 and torch.isfinite(batches[3][1]).all()
    with pytest.raises(ValueError, match="needs 5"):
        fixes.bad_validation_set(test_dir, n_good=5)


def test_per_batch_table_shows_zero_and_nan_vs_named_skips(test_dir, model):
    batches, labels = fixes.bad_validation_set(test_dir)
    table = fixes.per_batch_table(model, batches, labels).set_index("batch")
    assert table.loc["6x6 px crop", "seed PSNR"] == 0.0
    assert table.loc["6x6 px crop", "ours"] == "metric_error"
    assert math.isnan(table.loc["NaN pixel in input", "seed PSNR"])
    assert table.loc["NaN pixel in input", "ours"] == "nonfinite_output"
    assert (table.loc[["2 good image(s)", "1 good image(s)"], "ours"] == "valid").all()


def test_per_image_average_matches_evaluate_not_the_seed(test_dir, model):
    batches, labels = fixes.bad_validation_set(test_dir)
    good = [b for b, label in zip(batches, labels, strict=True) if "good" in label]
    claim = fixes.per_image_average(model, good)
    assert claim.holds == "holds only when", claim.verdict
    ev = claim.evidence
    assert ev["evaluate() (per-image mean)"] == pytest.approx(ev["true per-image mean"], abs=1e-3)
    assert ev["batch sizes"] == [2, 1]
