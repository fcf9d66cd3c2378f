"""deblur_lib.tracking: filtered MLflow logging, metrics.jsonl, resume, models, outages.

One sqlite store per module (creating one costs seconds); each test uses its own experiment.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from deblur_lib.train import tracking
from deblur_lib.train.tracking import DEFAULT_TRACKING_URI, Tracker, invalid_reason

LOGGER = "deblur_lib.tracking"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    return f"sqlite:///{db}"


@pytest.fixture
def tracker(store, tmp_path, request) -> Tracker:
    return Tracker(
        experiment=request.node.name,
        tracking_uri=store,
        out_dir=tmp_path / "out",
        artifact_location=tmp_path / "artifacts",
    )


def _client(store: str):
    from mlflow import MlflowClient

    return MlflowClient(store)


def _history(store: str, run_id: str, name: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in _client(store).get_metric_history(run_id, name)]


def _jsonl(tracker: Tracker) -> list[dict]:
    return [json.loads(line) for line in tracker.jsonl_path.read_text().splitlines()]


def _outage_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.getMessage().startswith("MLflow tracking server")
    ]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _connection_error(*args, **kwargs):
    import requests
    from mlflow.exceptions import MlflowException

    try:
        raise requests.exceptions.ConnectionError("Connection refused")
    except requests.exceptions.ConnectionError as exc:
        raise MlflowException(f"API request failed with exception {exc}") from None


# --- pure helpers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("val_psnr", math.nan, "nan"),
        ("train_loss", math.inf, "inf"),
        ("train_loss", -math.inf, "-inf"),
        ("val_psnr", None, "missing"),
        ("val_psnr", 999.0, "sentinel 999.0"),
        ("train_loss", -999.0, "sentinel -999.0"),
        ("val_psnr", 0.0, "sentinel 0.0"),
        ("val_ssim", 0.0, "sentinel 0.0"),
        ("test_psnr_db", 0.0, "sentinel 0.0"),
        ("val_PSNR", 0.0, "sentinel 0.0"),
        ("val_psnr_partial", 0.0, "sentinel 0.0"),
        ("msssim_fallbacks", 0.0, None),  # a counter, not a quality metric
        ("skipped_steps", 0.0, None),
        ("train_loss", 0.0, None),
        ("val_psnr", 100.0, None),  # the documented cap is a valid value
        ("val_ssim", 1.0, None),
        ("val_psnr", 998.9, None),
    ],
)
def test_invalid_reason(name, value, reason):
    assert invalid_reason(name, value) == reason


def test_tracking_uri_resolution(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri() == DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert tracking.resolve_tracking_uri() == "http://example:5000"
    assert tracking.resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_http_env_defaults_do_not_override_the_user(monkeypatch, tmp_path):
    for key in tracking.HTTP_ENV_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "77")
    Tracker(out_dir=tmp_path)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"


def test_import_is_cheap_and_disabled_tracker_never_imports_mlflow(tmp_path):
    code = (
        "import sys, json\n"
        "from deblur_lib.train.tracking import Tracker\n"
        "assert 'mlflow' not in sys.modules\n"
        f"t = Tracker(out_dir={str(tmp_path)!r}, enabled=False)\n"
        "assert t.start(run_name='x', params={'a': 1}) == ''\n"
        "t.log_params({'a': 1}); t.set_tags({'b': 2})\n"
        "print(json.dumps(t.log_metrics({'val_psnr': float('nan'), 'loss': 0.5}, step=3)))\n"
        "assert t.log_model(None) is None\n"
        "t.end()\n"
        "assert 'mlflow' not in sys.modules, 'mlflow was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["val_psnr"]
    (record,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["val_psnr"] is None and record["loss"] == 0.5 and record["step"] == 3


# --- sqlite store ----------------------------------------------------------------------------


def test_only_valid_metrics_reach_mlflow_and_jsonl_keeps_everything(tracker, store, caplog):
    run_id = tracker.start(run_name="filter", params={"lr": 1e-3, "long": "x" * 7000})
    records = [
        {"train_loss": 0.5, "val_psnr": math.nan, "val_ssim": 0.0, "grad_norm": math.inf},
        {"train_loss": 0.4, "val_psnr": 999.0, "val_ssim": 0.8, "msssim_fallbacks": 0},
        {"train_loss": -math.inf, "val_psnr": 25.0, "val_ssim": 0.0, "grad_norm": 1.5},
        {"train_loss": 0.3, "val_psnr": 0.0, "val_ssim": math.nan, "grad_norm": torch.tensor(2.0)},
    ]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dropped = [tracker.log_metrics(rec, step=i) for i, rec in enumerate(records)]
    tracker.end()
    assert dropped == [
        ["val_psnr", "val_ssim", "grad_norm"],
        ["val_psnr"],
        ["train_loss", "val_ssim"],
        ["val_psnr", "val_ssim"],
    ]
    assert _history(store, run_id, "train_loss") == [(0, 0.5), (1, 0.4), (3, 0.3)]
    assert _history(store, run_id, "val_psnr") == [(2, 25.0)]
    assert _history(store, run_id, "val_ssim") == [(1, 0.8)]
    assert _history(store, run_id, "grad_norm") == [(2, 1.5), (3, 2.0)]
    assert _history(store, run_id, "msssim_fallbacks") == [(1, 0.0)]
    run = _client(store).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.001" and len(run.data.params["long"]) == 6000
    assert tracker.dropped == {"val_psnr": 3, "val_ssim": 3, "grad_norm": 1, "train_loss": 1}
    warned = [
        r.getMessage().split("'")[1] for r in caplog.records if "not logged" in r.getMessage()
    ]
    assert sorted(warned) == sorted(tracker.dropped)  # once per name
    lines = _jsonl(tracker)
    assert [line["step"] for line in lines] == [0, 1, 2, 3]
    assert lines[0]["val_psnr"] is None and lines[0]["invalid"]["val_psnr"] == "nan"
    assert lines[1]["val_psnr"] is None and lines[1]["invalid"]["val_psnr"] == "sentinel 999.0"
    assert lines[2]["train_loss"] is None and lines[2]["invalid"]["train_loss"] == "-inf"
    assert lines[3]["grad_norm"] == 2.0 and lines[3]["dropped"] == dropped[3]
    assert all(isinstance(line["time"], float) for line in lines)


def test_raw_mode_logs_what_the_seed_logged(tracker, store):
    """Guards off: NaN and 0.0 reach MLflow (inf is clamped by MLflow to 1.8e308)."""
    run_id = tracker.start(run_name="raw")
    dropped = tracker.log_metrics(
        {"val_psnr": math.nan, "val_ssim": 0.0, "x": math.inf, "y": None}, step=0, raw=True
    )
    tracker.end()
    assert dropped == ["y"]
    assert math.isnan(_history(store, run_id, "val_psnr")[0][1])
    assert _history(store, run_id, "val_ssim") == [(0, 0.0)]
    assert _history(store, run_id, "x")[0][1] > 1e308
    assert _jsonl(tracker)[0]["invalid"] == {
        "val_psnr": "nan",
        "val_ssim": "sentinel 0.0",
        "x": "inf",
        "y": "missing",
    }


def test_resume_continues_the_same_run(tracker, store, tmp_path, request, caplog):
    run_id = tracker.start(run_name="resume", params={"lr": 0.1, "epochs": 3})
    tracker.log_metrics({"val_psnr": 20.0}, step=0)
    tracker.end("KILLED")
    again = Tracker(experiment=request.node.name, tracking_uri=store, out_dir=tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert again.start(params={"lr": 0.1, "epochs": 5}, run_id=run_id) == run_id
    assert _client(store).get_run(run_id).info.status == "RUNNING"
    again.log_metrics({"val_psnr": 21.0}, step=1)
    again.end()
    run = _client(store).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1", "epochs": "3"}
    assert run.data.tags["param_changed.epochs"] == "5"
    assert _history(store, run_id, "val_psnr") == [(0, 20.0), (1, 21.0)]
    assert [line["step"] for line in _jsonl(again)] == [0, 1]
    assert any("'epochs' is '3'" in r.getMessage() for r in caplog.records)
    assert len(_client(store).search_runs([run.info.experiment_id])) == 1


def test_resume_of_an_unknown_run_starts_a_new_one(tracker, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        run_id = tracker.start(run_id="0" * 32)
    assert run_id and run_id != "0" * 32
    assert any("not found" in r.getMessage() for r in caplog.records)
    tracker.end()


def test_tags_artifacts_and_context_manager(tracker, store, tmp_path):
    path = tmp_path / "curves.txt"
    path.write_text("hello")
    with tracker as t:
        run_id = t.start()
        t.set_tags({"stop_reason": "completed", "n": 3})
        t.log_artifact(path)
        t.log_artifact(path, artifact_path="plots")
        with pytest.raises(FileNotFoundError):
            t.log_artifact(tmp_path / "missing.png")
    run = _client(store).get_run(run_id)
    assert run.data.tags["stop_reason"] == "completed" and run.data.tags["n"] == "3"
    names = {a.path for a in _client(store).list_artifacts(run_id)}
    assert names == {"curves.txt", "plots"}
    assert run.info.artifact_uri.startswith((tmp_path / "artifacts").as_uri())
    with pytest.raises(RuntimeError, match="boom"), tracker:
        tracker.start()
        raise RuntimeError("boom")
    assert _client(store).get_run(tracker.run_id).info.status == "FAILED"
    with pytest.raises(KeyboardInterrupt), tracker:
        tracker.start()
        raise KeyboardInterrupt
    assert _client(store).get_run(tracker.run_id).info.status == "KILLED"


def test_bad_metric_input(tracker):
    tracker.start()
    with pytest.raises(ValueError, match="reserved"):
        tracker.log_metrics({"step": 1.0}, step=0)
    with pytest.raises(TypeError, match="must be a number, got str"):
        tracker.log_metrics({"loss": "0.1"}, step=0)
    with pytest.raises(RuntimeError, match="start"):
        Tracker(out_dir=tracker.out_dir).set_tags({"a": 1})
    tracker.end()


def test_non_outage_errors_propagate(tracker, monkeypatch):
    from mlflow.exceptions import MlflowException

    tracker.start()

    def invalid(*args, **kwargs):
        raise MlflowException("bad value", error_code="INVALID_PARAMETER_VALUE")

    monkeypatch.setattr(tracker._client, "log_batch", invalid)
    with pytest.raises(MlflowException, match="bad value"):
        tracker.log_metrics({"loss": 1.0}, step=0)
    assert not tracker.offline


def test_log_model_registers_weights_only_and_loads_back(tracker, store, monkeypatch):
    """The registered model is config.json + weights.pt: weights.load_model rebuilds it
    without unpickling, and MLflow's own pyfunc loader (models-from-code) agrees."""
    import mlflow.pyfunc

    from deblur_lib.models import build_model
    from deblur_lib.weights import load_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    with torch.no_grad():
        model.ending.weight.normal_(0, 0.1)  # not the identity
    run_id = tracker.start(run_name="model")
    example = torch.rand(1, 3, 40, 40) * 2 - 1
    uri = tracker.log_model(
        model, "deblur_test", example, train_crop_size=32, preset="tiny", description="card"
    )
    tracker.end()
    assert uri.startswith("models:/")
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the global URI was restored
    x = torch.rand(2, 3, 24, 20) * 2 - 1
    with torch.no_grad():
        expected = model(x)
    for source in (uri, "models:/deblur_test/latest", "models:/deblur_test/1"):
        loaded, info = load_model(source, tracking_uri=store)
        assert info.kind == "registry" and info.train_crop_size == 32
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected)
    mlflow.set_tracking_uri(store)
    try:
        served = mlflow.pyfunc.load_model("models:/deblur_test/1").predict(x.numpy())
    finally:
        mlflow.set_tracking_uri(None)
    torch.testing.assert_close(torch.from_numpy(served), expected.clamp(-1, 1))
    client = _client(store)
    (version,) = client.search_model_versions("name='deblur_test'")
    assert version.run_id == run_id and version.description == "card"
    assert client.get_run(run_id).data.tags["best_model_uri"] == uri
    logged = client.get_logged_model(uri.split("/")[-1])
    assert logged.experiment_id == client.get_run(run_id).info.experiment_id


def test_system_metrics_are_sampled_into_the_run_until_it_ends(store, tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "SYSTEM_METRICS_INTERVAL_S", 0.2)
    tracker = Tracker("sysmetrics", store, tmp_path, system_metrics=True)
    run_id = tracker.start(run_name="sys")
    time.sleep(1.5)
    tracker.end()
    metrics = _client(store).get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert "system/system_memory_usage_megabytes" in metrics
    assert tracker._monitor is None  # stopped with the run


# --- outages ---------------------------------------------------------------------------------


def test_unreachable_server_fails_fast_with_one_warning(tmp_path, caplog):
    start = time.monotonic()
    tracker = Tracker(
        tracking_uri=f"http://127.0.0.1:{_closed_port()}",
        out_dir=tmp_path,
        retry_interval_s=0.2,
    )
    with caplog.at_level(logging.WARNING):
        assert tracker.start(run_name="down", params={"a": 1}) == ""
        for step in range(6):
            tracker.log_metrics({"train_loss": 1.0 / (step + 1), "val_psnr": 20.0}, step=step)
            time.sleep(0.05)
        assert tracker.log_model(nn.Linear(1, 1)) is None
        tracker.end()
    elapsed = time.monotonic() - start
    assert elapsed < 10, f"outage handling took {elapsed:.1f} s"
    assert len(_outage_warnings(caplog)) == 1, _outage_warnings(caplog)
    assert not [r for r in caplog.records if r.name.startswith("urllib3")]
    assert any("model not logged" in r.getMessage() for r in caplog.records)
    assert tracker.offline and tracker.outages == 1
    assert [line["step"] for line in _jsonl(tracker)] == list(range(6))


def test_outage_queues_and_replays_in_order(tracker, store, monkeypatch, caplog):
    run_id = tracker.start(run_name="blip")
    tracker.retry_interval_s = 0.0
    tracker.log_metrics({"train_loss": 1.0}, step=0)
    real = tracker._client.log_batch
    monkeypatch.setattr(tracker._client, "log_batch", _connection_error)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        tracker.log_metrics({"train_loss": 2.0}, step=1)
        tracker.set_tags({"phase": "down"})
        tracker.log_metrics({"train_loss": 3.0}, step=2)
        assert tracker.offline and len(tracker._pending) == 3
        monkeypatch.setattr(tracker._client, "log_batch", real)
        tracker.log_metrics({"train_loss": 4.0}, step=3)
    assert not tracker.offline and not tracker._pending
    tracker.end()
    assert _history(store, run_id, "train_loss") == [(0, 1.0), (1, 2.0), (2, 3.0), (3, 4.0)]
    assert _client(store).get_run(run_id).data.tags["phase"] == "down"
    assert len(_outage_warnings(caplog)) == 1


def test_server_down_at_start_creates_the_run_when_back(tracker, store, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", _connection_error)
    tracker.retry_interval_s = 0.0
    assert tracker.start(run_name="late", params={"lr": 0.5}) == ""
    tracker.log_metrics({"train_loss": 1.0}, step=0)
    assert tracker.offline and tracker.run_id is None
    monkeypatch.undo()
    tracker.log_metrics({"train_loss": 2.0}, step=1)
    tracker.end()
    assert tracker.run_id and not tracker.offline
    run = _client(store).get_run(tracker.run_id)
    assert run.info.run_name == "late" and run.data.params == {"lr": "0.5"}
    assert run.info.status == "FINISHED"
    assert _history(store, tracker.run_id, "train_loss") == [(0, 1.0), (1, 2.0)]


def test_retry_waits_for_the_interval(tracker, monkeypatch):
    tracker.start()
    tracker.retry_interval_s = 3600.0
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        _connection_error()

    monkeypatch.setattr(tracker._client, "log_batch", failing)
    for step in range(5):
        tracker.log_metrics({"train_loss": 1.0}, step=step)
    assert len(calls) == 1 and len(tracker._pending) == 5
    monkeypatch.undo()
    tracker.end()  # end() retries regardless of the interval
    assert not tracker._pending


def test_write_jsonl_off(tmp_path):
    tracker = Tracker(out_dir=tmp_path / "rank1", enabled=False, write_jsonl=False)
    tracker.start()
    tracker.log_metrics({"loss": 1.0}, step=0)
    assert not (tmp_path / "rank1").exists()


def test_sampler_thread_outage_messages_are_dropped_only_while_offline(tmp_path):
    """MLflow's system-metrics thread retries and warns when the server is gone; the tracker's
    one outage warning already says it, so those records go, and nothing else does."""
    t = Tracker(out_dir=tmp_path, enabled=False)

    def record(thread: str) -> logging.LogRecord:
        rec = logging.LogRecord("urllib3.connectionpool", logging.WARNING, __file__, 1,
                                "Retrying (Retry(total=0))", None, None)  # fmt: skip
        rec.threadName = thread
        return rec

    assert t._drop_monitor_outage(record("SystemMetricsMonitor"))  # online: kept
    t.offline = True
    assert not t._drop_monitor_outage(record("SystemMetricsMonitor"))  # offline: dropped
    assert t._drop_monitor_outage(record("MainThread"))  # our own thread: kept
