"""Tracking outage: a real ``mlflow server`` killed (and restarted) while ``fit`` trains against it.

The server runs as a subprocess on 127.0.0.1 (a free port, its own sqlite file and artifact
folder, one worker); fixtures always kill it. The outage is timed by wrapping
``Tracker.log_metrics`` (the real method runs; the wrapper kills or restarts the server right
after a given epoch is logged), so the test is deterministic without sleeping. What the server
stored is read from its sqlite file directly (no server needed). The tests share one server
(a start costs seconds): the restart case runs first and leaves it running for the kill case.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from deblur_lib.train import fit
from deblur_lib.train.config import TrainConfig
from deblur_lib.train.tracking import Tracker

torch.set_num_threads(2)
READY_TIMEOUT_S = 240  # mlflow server imports a lot; a loaded 2-core machine needs time
EPOCHS = 4
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mlflow server`` in its own process group (it forks a uvicorn worker)."""

    def __init__(self, root: Path) -> None:
        self.db, self.port = root / "server.db", _free_port()
        self.artifacts, self.log = root / "artifacts", root / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def store(self) -> MlflowClient:
        """A client on the server's own sqlite file: readable while the server is down."""
        return MlflowClient(tracking_uri=f"sqlite:///{self.db}")

    def start(self) -> None:
        mlflow = Path(sys.executable).with_name("mlflow")
        argv = [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.db}"]
        argv += ["--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--workers", "1"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=log, start_new_session=True, cwd=self.db.parent
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mlflow server did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None


@pytest.fixture(scope="module")
def _server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow_server"))
    yield srv
    srv.kill()  # always: no server outlives the tests


@pytest.fixture
def server(_server):
    """The module's server, running (started, or restarted after a test killed it: each start
    costs seconds of imports, so the tests share one server and its store)."""
    if _server.proc is None:
        _server.start()
    return _server


@pytest.fixture
def on_epoch_logged(monkeypatch):
    """``actions[step]()`` runs right after the real ``Tracker.log_metrics`` logged that step."""
    actions: dict[int, callable] = {}
    real = Tracker.log_metrics

    def hooked(self, metrics, step, **kwargs):
        dropped = real(self, metrics, step, **kwargs)
        if step in actions:
            actions.pop(step)()
        return dropped

    monkeypatch.setattr(Tracker, "log_metrics", hooked)
    return actions


def _cfg(tiny_data: Path, tmp_path: Path, server: Server, **overrides) -> TrainConfig:
    values = {
        "train_data": str(tiny_data / "train"),
        "test_data": str(tiny_data / "test"),
        "out_dir": str(tmp_path / "out"),
        "tracking_uri": server.uri,
        "tracking_retry_s": 0.5,
        "experiment": "outage",
        "model_size": "tiny",
        "crop_size": 32,
        "batch_size": 2,
        "num_epochs": EPOCHS,
        "max_steps_per_epoch": 2,
        "learning_rate": 1e-3,
        "device": "cpu",
        "num_workers": 0,
        "log_model": False,
    }
    return TrainConfig(**{**values, **overrides})


def _jsonl_steps(cfg: TrainConfig) -> list[int]:
    import json

    lines = Path(cfg.out_dir, "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def _outage_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and "unreachable (" in r.getMessage()
    ]


def test_server_back_before_the_end(tiny_data, tmp_path, server, on_epoch_logged, caplog):
    on_epoch_logged[0] = server.kill
    on_epoch_logged[1] = server.start  # blocks until the server answers again
    cfg = _cfg(tiny_data, tmp_path, server, log_model=True, registered_model_name="outage-net")
    with caplog.at_level(logging.INFO, logger="deblur_lib"):
        result = fit(cfg)
    assert result.ok and _jsonl_steps(cfg) == list(range(EPOCHS))
    assert len(_outage_warnings(caplog)) == 1, caplog.text
    assert "reachable again" in caplog.text
    store = server.store
    run = store.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stop_reason"] == "completed"
    for key in ("train_loss", "val_psnr", "lr"):
        steps = [m.step for m in store.get_metric_history(result.run_id, key)]
        assert steps == list(range(EPOCHS)), (key, steps)  # queued epoch 1 replayed, no dups
    assert store.search_model_versions("name='outage-net'")  # the model reached it too
    figures = {Path(p).name for p in (server.artifacts).rglob("*.png")}
    assert figures == {"curves.png", "triplets.png"}


def test_server_killed_mid_run(tiny_data, tmp_path, server, on_epoch_logged, caplog):
    on_epoch_logged[0] = server.kill  # epoch 0 reaches the server, the rest cannot
    cfg = _cfg(tiny_data, tmp_path, server)
    with caplog.at_level(logging.INFO, logger="deblur_lib"):
        result = fit(cfg)
    assert result.ok and result.epochs_completed == EPOCHS
    assert _jsonl_steps(cfg) == list(range(EPOCHS))  # every epoch kept locally
    assert len(_outage_warnings(caplog)) == 1, caplog.text
    others = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert others == _outage_warnings(caplog)  # nothing else warned
    assert "not sent to MLflow" in caplog.text  # the end says what stayed local
    store = server.store
    run = store.get_run(result.run_id)
    assert [m.step for m in store.get_metric_history(result.run_id, "train_loss")] == [0]
    assert run.info.status == "RUNNING"  # the end of the run never reached the server
    assert run.data.params["num_epochs"] == str(EPOCHS)
