"""ema: the weight average follows taken steps only, without a host sync, and is what a run
validates, saves as best and returns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deblur_lib.train import TrainConfig, fit
from deblur_lib.train.ema import WeightAverage
from deblur_lib.weights import load_checkpoint, load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(value: float) -> tuple[nn.Linear, WeightAverage]:
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(0.0)
        model.bias.fill_(0.0)
    ema = WeightAverage(model, 0.5)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(value)
    return model, ema


def test_a_taken_step_moves_the_average_by_the_warmed_up_decay():
    model, ema = _pair(1.0)
    ema.update(model, torch.tensor(True))
    # first update: decay = min(0.5, 2 / 11) = 2/11, so the average moves 9/11 of the way
    assert torch.allclose(ema.model.weight, torch.full((2, 2), 9 / 11))
    for _ in range(30):
        ema.update(model, torch.tensor(True))
    assert torch.allclose(ema.model.bias, torch.ones(2), atol=1e-6)


def test_a_skipped_step_leaves_the_average_unchanged_without_a_sync(monkeypatch):
    model, ema = _pair(5.0)  # weights a skipped step left (finite: the skip kept them)
    before = [t.clone() for t in ema.model.parameters()]

    def refuse(*args, **kwargs):
        raise AssertionError("a host sync in WeightAverage.update")

    for attr in ("item", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, attr, refuse)
    ema.update(model, torch.tensor(False))
    monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(before, ema.model.parameters(), strict=True))
    assert ema.updates == 1


def test_state_round_trip_and_bad_decay():
    model, ema = _pair(1.0)
    ema.update(model, torch.tensor(True))
    other = WeightAverage(nn.Linear(2, 2), 0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and torch.equal(other.model.weight, ema.model.weight)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="decay must be in"):
            WeightAverage(model, bad)


def test_fit_validates_saves_and_returns_the_average(tiny_data, mlflow_store, tmp_path):
    cfg = TrainConfig(
        train_data=str(tiny_data / "train"),
        test_data=str(tiny_data / "test"),
        out_dir=str(tmp_path / "run"),
        tracking_uri=mlflow_store,
        experiment="ema",
        model_size="tiny",
        crop_size=32,
        batch_size=2,
        num_epochs=2,
        learning_rate=1e-2,
        ema=0.9,
        device="cpu",
        log_model=False,
        inject_fault="nan_loss@step=1",
    )
    result = fit(cfg)
    assert result.ok and result.skipped_steps == 1
    last, best = (load_checkpoint(c) for c in (result.last_checkpoint, result.best_checkpoint))
    assert last["ema"]["updates"] == 8  # every step, the skipped one included
    raw = dict(best["model"])
    averaged = best["ema"]["model"]
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw)  # two different sets
    for model in (result.model, load_model(str(result.best_checkpoint))[0]):
        assert all(torch.equal(v, averaged[k]) for k, v in model.state_dict().items())
