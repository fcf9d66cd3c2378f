"""The shipped weights: weights-only with a matching model card, and as good as the card says
on a freshly generated test set (a seed no training or card measurement used)."""

from __future__ import annotations

import json

import pytest
import torch

from deblur_lib.data import PairedImageFolder
from deblur_lib.metrics import denormalize, psnr
from deblur_lib.models import DEFAULT_MODEL, PRETRAINED_DIR, DeblurNet, file_sha256
from deblur_lib.predict import deblur
from deblur_lib.synth import GENERATOR_VERSION, synthesize

FRESH_SEED = 7  # the card was measured on seed 0's test split; training used seed 1's stream
TOLERANCE_DB = 0.5
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def card() -> dict:
    path = PRETRAINED_DIR / f"{DEFAULT_MODEL}.json"
    assert path.is_file(), f"no shipped weights: {path} (make pretrain writes them)"
    return json.loads(path.read_text())


def test_the_weights_file_is_small_weights_only_and_matches_its_card(card):
    weights = PRETRAINED_DIR / f"{DEFAULT_MODEL}.pt"
    assert weights.stat().st_size <= 2 * 2**20
    assert file_sha256(weights) == card["sha256"]
    state = torch.load(weights, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    history = json.loads((PRETRAINED_DIR / f"{DEFAULT_MODEL}.history.json").read_text())
    own = [r for r in history if r.get("stage") in (None, 2)]  # a two-stage run: stage 2's
    assert len(own) == card["training"]["epoch"] + 1
    assert [r["epoch"] for r in history] == list(range(len(history)))
    assert card["generator"]["version"] == GENERATOR_VERSION
    for key in ("git_commit", "machine", "wall_s", "steps", "config"):
        assert card["training"][key], key


@pytest.mark.slow
def test_the_gain_over_the_blurred_input_holds_on_a_fresh_test_set(card, tmp_path):
    n, size = 48, card["test"]["split_settings"]["size"]
    synthesize(tmp_path, n_train=1, n_test=n, size=size, seed=FRESH_SEED, progress=False)
    model = DeblurNet.from_pretrained(DEFAULT_MODEL)
    pairs = PairedImageFolder(tmp_path / "test")
    gains = []
    for i in range(len(pairs)):
        blur, sharp = (t[None] for t in pairs[i])
        target = denormalize(sharp)
        restored = psnr(denormalize(deblur(model, blur)), target)
        gains.append(float(restored[0] - psnr(denormalize(blur), target)[0]))
    gain = sum(gains) / len(gains)
    expected = card["test"]["gain_db"]
    assert abs(gain - expected) <= TOLERANCE_DB, f"fresh gain {gain:.2f} dB, card {expected:.2f}"
