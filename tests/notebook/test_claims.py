"""The seed-analysis claims: each function measures its situation and derives its verdict."""

from __future__ import annotations

import warnings

import pytest

from deblur_lib.notebook import claims

EXPECTED = {
    claims.msssim_min_size: "holds",
    claims.gaussian_extreme_values: "holds only when",
    claims.batch_statistics: "does not hold",
    claims.wrong_data_range: "holds only when",
    claims.nan_propagation: "holds",
    claims.psnr_needs_unit_range: "does not hold",
    claims.denormalization_overflow: "holds only when",
    claims.identical_images: "does not hold",
    claims.metric_exception_returns_zero: "holds",
}


@pytest.fixture(scope="module")
def results() -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {fn: fn() for fn in claims.SEED_CLAIMS}


def test_every_seed_claim_is_checked():
    assert set(claims.SEED_CLAIMS) == set(EXPECTED)


@pytest.mark.parametrize("fn", list(EXPECTED), ids=lambda f: f.__name__)
def test_claim_verdict(results, fn):
    claim = results[fn]
    assert claim.test == fn.__name__
    assert claim.section in (claims.MSSSIM_SECTION, claims.METRICS_SECTION)
    assert claim.evidence, "a verdict needs evidence"
    assert claim.holds == EXPECTED[fn], claim.verdict


def test_evidence_behind_key_verdicts(results):
    size = results[claims.msssim_min_size].evidence
    assert size["stock ms_ssim @ 160 px"].startswith("AssertionError")
    assert isinstance(size["stock ms_ssim @ 161 px"], list)
    assert (
        results[claims.batch_statistics].evidence["batch 16 vs batch 1 (4 samples), max |diff|"]
        < 1e-5
    )
    nan = results[claims.nan_propagation].evidence
    assert nan["weights NaN after 1 step"] == "100%"
    zero = results[claims.metric_exception_returns_zero].evidence
    assert zero["6 px batch (skimage raises ValueError inside)"] == (0.0, 0.0)


def test_claims_table_has_one_row_per_claim(results):
    table = claims.claims_table(list(results.values()))
    assert len(table) == len(EXPECTED)
    assert {"section", "claim", "tested by", "result", "verdict", "evidence"} <= set(table.columns)
    assert set(table["result"]) <= {"holds", "does not hold", "holds only when"}


def test_a_verdict_without_a_category_is_rejected():
    with pytest.raises(ValueError, match="category"):
        _ = claims.Claim("s", "c", "t", {"x": 1}, "maybe").holds
