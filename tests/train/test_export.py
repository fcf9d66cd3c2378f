"""``--init_from`` (a second training stage) and ``train.export`` (weights, model card, history)
on CPU with the tiny model and the session's 64 px split."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from deblur_lib.models import load_from_files
from deblur_lib.train import export as export_module  # its test_scores is not a pytest test
from deblur_lib.train import fit
from deblur_lib.train.build import build_net
from deblur_lib.train.config import TrainConfig
from deblur_lib.train.distributed import DistContext
from deblur_lib.train.export import export, main
from deblur_lib.weights import load_model

torch.set_num_threads(2)


def _cfg(tiny_data: Path, out: Path, uri: str, **kw) -> TrainConfig:
    cfg = TrainConfig(
        train_data=str(tiny_data / "train"), test_data=str(tiny_data / "test"),
        out_dir=str(out), tracking_uri=uri, experiment="test-export", model_size="tiny",
        crop_size=48, batch_size=4, num_epochs=1, learning_rate=1e-3, device="cpu",
        num_workers=0, log_every=1,
    )  # fmt: skip
    return replace(cfg, **kw)


@pytest.fixture(scope="module")
def first(tiny_data, mlflow_store, tmp_path_factory) -> tuple[TrainConfig, Path]:
    """A finished one-epoch run (stage 1): its config and best.pt."""
    cfg = _cfg(tiny_data, tmp_path_factory.mktemp("stage1"), mlflow_store)
    result = fit(cfg)
    assert result.ok
    return cfg, Path(result.best_checkpoint)


def test_init_from_starts_from_exactly_those_weights(first, tmp_path):
    cfg, best = first
    model, _ = build_net(replace(cfg, init_from=str(best), out_dir=str(tmp_path)),
                         DistContext(), torch.device("cpu"))  # fmt: skip
    want = load_model(str(best))[0].state_dict()
    got = model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    fresh, _ = build_net(cfg, DistContext(), torch.device("cpu"))  # without it: a fresh net
    assert not all(torch.equal(fresh.state_dict()[k], want[k]) for k in want)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_size": "small"}, "is not --model_size small's"),
        ({"init_from": "no-such-weights.pt"}, "--init_from: model 'no-such-weights.pt' not found"),
    ],
)
def test_init_from_problems_are_usage_errors(first, tmp_path, change, message):
    cfg, best = first
    bad = replace(cfg, **{"init_from": str(best), "out_dir": str(tmp_path / "out"), **change})
    with pytest.raises(ValueError, match=message):
        bad.validate()
    assert not (tmp_path / "out").exists()


def test_export_writes_weights_card_and_history_that_load_back(first, tiny_data, tmp_path):
    _, best = first
    card = export(best, tiny_data / "test", "t", tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["t.history.json", "t.json", "t.md", "t.pt"]
    model, info = load_from_files(tmp_path / "t.pt", tmp_path / "t.json", source="t")
    assert info.sha256 == card["sha256"]
    original = load_model(str(best))[0]
    x = torch.rand(1, 3, 40, 40) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model(x), original(x))
    assert card["test"]["n_images"] == 4 and "init_from" not in card["training"]
    assert len(json.loads((tmp_path / "t.history.json").read_text())) == 1
    md = (tmp_path / "t.md").read_text()
    assert f"{card['test']['psnr']:.2f} dB" in md
    assert f"sharp images: {card['test']['sharp_in_psnr']:.2f} dB" in md
    assert card["generator"]["kernel_min"] == 7 and "PSF sides 7-31 px" in md


class _Blur3(torch.nn.Module):
    """A 3x3 box blur of each channel (model space in and out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def test_sharp_in_score_is_the_cap_for_identity_and_drops_for_a_blur(tiny_data):
    same = export_module.test_scores(torch.nn.Identity(), tiny_data / "test")
    assert same["sharp_in_psnr"] == 100.0  # PSNR's documented cap: the sharp image unchanged
    assert same["psnr"] == pytest.approx(same["blurred_psnr"]) and same["gain_db"] == 0.0
    blurred = export_module.test_scores(_Blur3(), tiny_data / "test")
    assert 10.0 < blurred["sharp_in_psnr"] < 60.0  # a model that softens sharp input
    assert [r["name"] for r in blurred["per_image"]] == [r["name"] for r in same["per_image"]]


def test_a_second_stage_card_names_the_first(first, tiny_data, mlflow_store, tmp_path):
    cfg, best = first
    stage2 = _cfg(tiny_data, tmp_path / "stage2", mlflow_store, init_from=str(best),
                  learning_rate=1e-4)  # fmt: skip
    result = fit(stage2)
    assert result.ok
    card = export(Path(result.best_checkpoint), tiny_data / "test", "t2", tmp_path / "out")
    init = card["training"]["init_from"]
    assert init["source"] == str(best) and init["steps"] == 2 and init["learning_rate"] == 1e-3
    assert init["kernel_min"] == 7  # the first stage's PSF sides (its config's default)
    assert card["training"]["config"]["init_from"] == str(best)
    history = json.loads((tmp_path / "out" / "t2.history.json").read_text())
    assert [(r["stage"], r["epoch"]) for r in history] == [(1, 0), (2, 1)]
    md = (tmp_path / "out" / "t2.md").read_text()
    assert f"| started from | `{best}`: 2 steps of its own" in md


def test_export_cli_refuses_a_missing_test_split(first, tmp_path, capsys):
    _, best = first
    assert main([str(best), "--test_data", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "none" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.pt"))
