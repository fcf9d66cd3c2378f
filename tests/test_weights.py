"""deblur_lib.weights: architectures, weights-only files with SHA-256, every model source
(checkpoint, folder, shipped name, MLflow registry via a temporary sqlite store), and pickle
payloads refused everywhere without running them."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from deblur_lib import models
from deblur_lib.models import MODEL_PRESETS, build_model
from deblur_lib.weights import WeightsError, load_model, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class _Payload:
    """Unpickling this opens (creates) the marker file: code runs if the loader unpickles."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_payload(path: Path, marker: Path) -> bytes:
    data = pickle.dumps({"intro.weight": _Payload(marker)})
    path.write_bytes(data)
    return data


def test_payload_runs_when_unpickled(tmp_path):
    """Control: the payload is live (plain pickle runs it), so the refusals below mean
    something."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


# --- architectures ----------------------------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_architecture_round_trip(preset):
    arch = models.preset_architecture(preset)
    assert arch == models.architecture(build_model(preset), preset)
    assert json.loads(json.dumps(arch)) == arch
    rebuilt = models.build_from_architecture(arch)
    assert models.architecture(rebuilt, preset) == arch


def test_architecture_width_override_and_errors():
    assert models.build_from_architecture({"preset": "tiny", "width": 12}).width == 12
    with pytest.raises(WeightsError, match="unknown architecture keys"):
        models.build_from_architecture({"preset": "tiny", "depth": 3})
    with pytest.raises(WeightsError, match="lacks"):
        models.build_from_architecture({"width": 8})
    with pytest.raises(WeightsError, match="unknown model preset"):
        models.build_from_architecture({"preset": "huge"})


# --- folder (save_weights) and SHA-256 --------------------------------------------------------
def test_folder_round_trip(tmp_path):
    model = _random_tiny()
    w, c = models.save_weights(model, tmp_path / "m", train_crop_size=64, preset="tiny")
    config = json.loads(c.read_text())
    assert config["sha256"] == models.file_sha256(w) and config["format"] == models.WEIGHTS_FORMAT
    loaded, info = load_model(str(tmp_path / "m"))
    assert _same_weights(model, loaded) and not loaded.training
    assert (info.kind, info.train_crop_size, info.sha256) == ("folder", 64, config["sha256"])


def test_sha256_mismatch_is_refused_before_loading(tmp_path):
    models.save_weights(_random_tiny(), tmp_path)
    data = bytearray((tmp_path / "weights.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / "weights.pt").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="SHA-256 mismatch"):
        load_model(str(tmp_path))


def test_nonfinite_and_mismatched_weights_are_refused(tmp_path):
    model = _random_tiny()
    with torch.no_grad():
        model.intro.weight[0, 0, 0, 0] = float("nan")
    models.save_weights(model, tmp_path / "nan")
    with pytest.raises(WeightsError, match="non-finite weights in \\['intro.weight'\\]"):
        load_model(str(tmp_path / "nan"))
    _, config = models.save_weights(_random_tiny(), tmp_path / "wide")
    card = json.loads(config.read_text())
    card["architecture"]["width"] = 16
    config.write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="do not fit architecture"):
        load_model(str(tmp_path / "wide"))


# --- checkpoints ----------------------------------------------------------------------------
def test_checkpoint_source(tmp_path):
    model = build_model("tiny", width=12)
    cfg = {"model_size": "tiny", "model_width": 12, "crop_size": 96}
    save_checkpoint(tmp_path / "best.pt", {"model": model.state_dict(), "config": cfg})
    loaded, info = load_model(str(tmp_path / "best.pt"))
    assert _same_weights(model, loaded) and loaded.width == 12
    assert (info.kind, info.train_crop_size, info.architecture["width"]) == ("checkpoint", 96, 12)


def test_pickle_payload_in_a_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "ran"
    _write_payload(tmp_path / "best.pt", marker)
    with pytest.raises(WeightsError, match="not a readable checkpoint"):
        load_model(str(tmp_path / "best.pt"))
    assert not marker.exists()


# --- shipped weights --------------------------------------------------------------------------
def test_shipped_lookup(tmp_path):
    model = _random_tiny()
    w, c = models.save_weights(model, tmp_path / "tmp", train_crop_size=256, preset="tiny")
    ship = tmp_path / "pretrained"
    ship.mkdir()
    w.rename(ship / "demo.pt")
    c.rename(ship / "demo.json")
    assert models.shipped_models(ship) == ["demo"]
    loaded, info = load_model("demo", pretrained_dir=ship)
    assert _same_weights(model, loaded) and info.kind == "shipped"
    with pytest.raises(WeightsError, match=r"not found.*shipped weights \(demo\)"):
        load_model("other", pretrained_dir=ship)


def test_weights_file_beside_its_card_loads_by_path(tmp_path):
    """``--model some/dir/NAME.pt`` for exported weights moved out of the package: the card
    beside them gives the architecture and hash; without it, the error names the missing card."""
    model = _random_tiny()
    w, c = models.save_weights(model, tmp_path / "tmp", train_crop_size=96, preset="tiny")
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    w.rename(copy / "mine.pt")
    c.rename(copy / "mine.json")
    loaded, info = load_model(str(copy / "mine.pt"))
    assert _same_weights(model, loaded) and info.kind == "shipped"
    assert info.train_crop_size == 96
    (copy / "mine.json").unlink()
    with pytest.raises(WeightsError, match=r"no 'model' entry.*card beside them \(mine\.json\)"):
        load_model(str(copy / "mine.pt"))


def test_pickle_payload_as_shipped_weights_is_refused(tmp_path):
    """Even with a card whose sha256 matches the payload, torch.load(weights_only) refuses."""
    marker, ship = tmp_path / "ran", tmp_path / "pretrained"
    ship.mkdir()
    _write_payload(ship / "evil.pt", marker)
    card = {"architecture": models.preset_architecture("tiny")}
    card["sha256"] = models.file_sha256(ship / "evil.pt")
    (ship / "evil.json").write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="refused: not a weights-only file"):
        load_model("evil", pretrained_dir=ship)
    assert not marker.exists()


# --- MLflow registry --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def registry(mlflow_store, tmp_path_factory):
    """Two versions of 'deblur-test' logged by the training side's Tracker (aliases:
    champion -> 1), and their models."""
    from mlflow import MlflowClient

    from deblur_lib.train.tracking import Tracker

    client = MlflowClient(mlflow_store)
    out = tmp_path_factory.mktemp("registry")
    tracker = Tracker("weights-test", mlflow_store, out, artifact_location=out / "artifacts")
    tracker.start(run_name="registry")
    models = [_random_tiny(1), _random_tiny(2)]
    example = torch.zeros(1, 3, 16, 16)
    uris = [
        tracker.log_model(
            m, "deblur-test", example if i == 0 else None, train_crop_size=64, preset="tiny"
        )
        for i, m in enumerate(models)
    ]
    tracker.end()
    client.set_registered_model_alias("deblur-test", "champion", "1")
    return {"uri": mlflow_store, "client": client, "models": models, "uris": uris}


@pytest.mark.parametrize(
    ("spec", "index"),
    [("models:/deblur-test/1", 0), ("models:/deblur-test/latest", 1), ("models:/deblur-test@champion", 0)],  # noqa: E501
)  # fmt: skip
def test_registry_round_trip(registry, spec, index):
    model, info = load_model(spec, tracking_uri=registry["uri"])
    assert _same_weights(model, registry["models"][index])
    assert info.kind == "registry" and info.train_crop_size == 64


def test_registry_shows_versions_with_signature(registry):
    """What `mlflow ui` lists: the registered model, its versions, and each model's signature."""
    client = registry["client"]
    versions = client.search_model_versions("name = 'deblur-test'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    logged = client.get_logged_model(registry["uris"][0].split("/")[-1])
    files = {f.path for f in client.list_logged_model_artifacts(logged.model_id)}
    assert {"MLmodel", "input_example.json", "artifacts"} <= files
    from mlflow.models import Model

    local = client.get_model_version_download_uri("deblur-test", "1").removeprefix("file://")
    mlmodel = Model.load(local)
    assert mlmodel.signature.inputs.inputs[0].shape == (-1, 3, -1, -1)
    assert "python_function" in mlmodel.flavors


def test_registry_errors(registry, tmp_path):
    with pytest.raises(WeightsError, match="deblur-missing"):
        load_model("models:/deblur-missing/1", tracking_uri=registry["uri"])
    with pytest.raises(WeightsError, match="expected models:/NAME/VERSION"):
        load_model("models:/deblur-test/one", tracking_uri=registry["uri"])
    absent = tmp_path / "none.db"
    with pytest.raises(WeightsError, match="no MLflow store"):
        load_model("models:/x/1", tracking_uri=f"sqlite:///{absent}")
    assert not absent.exists()


def test_registry_model_without_config_is_refused(registry, tmp_path):
    """A version whose artifacts were not written by Tracker.log_model (e.g. a pickled
    mlflow.pytorch model) is refused, not unpickled."""
    client = registry["client"]
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "model.pth").write_bytes(b"pickled module")
    client.create_registered_model("deblur-foreign")
    client.create_model_version("deblur-foreign", tmp_path.as_uri())
    with pytest.raises(WeightsError, match="no artifacts/config.json"):
        load_model("models:/deblur-foreign/1", tracking_uri=registry["uri"])


def test_pickle_payload_in_a_registry_artifact_is_refused(registry, tmp_path):
    """Replace version 2's weights.pt by a payload and forge config.json's sha256 to match:
    torch.load(weights_only=True) still refuses, and the payload never runs."""
    client, marker = registry["client"], tmp_path / "ran"
    root = Path(client.get_model_version_download_uri("deblur-test", "2").removeprefix("file://"))
    wfile, cfile = root / "artifacts" / "weights.pt", root / "artifacts" / "config.json"
    original, config = wfile.read_bytes(), cfile.read_text()
    try:
        _write_payload(wfile, marker)
        with pytest.raises(WeightsError, match="SHA-256 mismatch"):
            load_model("models:/deblur-test/2", tracking_uri=registry["uri"])
        forged = json.loads(config) | {"sha256": models.file_sha256(wfile)}
        cfile.write_text(json.dumps(forged))
        with pytest.raises(WeightsError, match="refused: not a weights-only file"):
            load_model("models:/deblur-test/2", tracking_uri=registry["uri"])
        assert not marker.exists()
    finally:
        wfile.write_bytes(original)
        cfile.write_text(config)


def test_mlflow_pyfunc_loader_also_avoids_unpickling(registry):
    """mlflow.pyfunc.load_model runs deblur_lib/train/mlflow_model.py (load_from_files)."""
    import mlflow.pyfunc
    import numpy as np

    local = registry["client"].get_model_version_download_uri("deblur-test", "1")
    pyfunc = mlflow.pyfunc.load_model(local)
    x = np.zeros((1, 3, 16, 16), np.float32)
    assert pyfunc.predict(x).shape == (1, 3, 16, 16)
