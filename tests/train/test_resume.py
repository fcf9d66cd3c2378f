"""Crash and resume: the CLI killed with SIGKILL mid-epoch, then mid-checkpoint-write, then resumed.

One chain of three ``python -m deblur_lib.train ... --resume auto`` processes (the command a
user reruns), each waiting on what the run writes, not on the clock:
1. with tests/hooks.py's ``--step_delay`` (so the progress bar redraws at every step),
   killed once epoch 0 is in metrics.jsonl and the bar shows two steps of epoch 1 done;
2. with tests/hooks.py's ``--write_delay`` (a checkpoint write pauses half-way),
   killed while its epoch-1 checkpoint is half-written on disk;
3. left to finish.
After each kill every checkpoint on disk loads; at the end the run has all planned epochs,
each kill lost at most the epoch in progress, and MLflow holds one run (the same id
throughout) with every epoch step exactly once.

And a checkpoint corrupted after it was written (a flipped bit in its weights, which torch
itself loads without a complaint): ``--resume auto`` refuses it by its digest.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from deblur_lib.guards import StepGuard
from deblur_lib.models import build_model
from deblur_lib.train.__main__ import EXIT_USAGE, main
from deblur_lib.train.checkpoint import Progress, training_state
from deblur_lib.train.config import TrainConfig
from deblur_lib.train.loop import build_optimizer, build_scheduler
from deblur_lib.weights import load_checkpoint, save_checkpoint

EPOCHS = 4
STEPS = 4  # per epoch
TIMEOUT_S = 180  # per wait; generous for a loaded 2-core CI machine
HOOKS = str(Path(__file__).resolve().parents[1] / "hooks.py")  # test hooks, by patching


class Run:
    """A training subprocess whose stderr (log lines and tqdm bars) is read by a thread."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=full_env
        )
        self.err = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := os.read(self.proc.stderr.fileno(), 65536):
            self.err += chunk.decode(errors="replace")

    def wait_for(self, condition, what: str) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"exited ({self.proc.returncode}) before {what}:\n{self.err}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timeout waiting for {what}:\n{self.err[-3000:]}")
            time.sleep(0.02)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._reader.join(10)

    def finish(self) -> int:
        code = self.proc.wait(TIMEOUT_S * 2)
        self._reader.join(10)
        return code


@pytest.fixture
def runs():
    started: list[Run] = []
    yield started
    for run in started:  # never leave a training process behind
        if run.proc.poll() is None:
            run.kill()


def _jsonl_steps(out_dir: Path) -> list[int]:
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _load_all(out_dir: Path) -> dict[str, dict]:
    """Every checkpoint on disk must load (weights_only, digest checked), finite weights only."""
    states = {}
    for path in sorted(out_dir.glob("*.pt")):
        state = load_checkpoint(path)
        assert all(
            torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()
        )
        states[path.name] = state
    assert "last.pt" in states
    return states


@pytest.mark.slow
def test_sigkill_mid_epoch_and_mid_checkpoint_then_resume(tiny_data, mlflow_store, tmp_path, runs):
    out_dir = tmp_path / "run"
    argv = []
    flags = {
        "train_data": tiny_data / "train",
        "test_data": tiny_data / "test",
        "out_dir": out_dir,
        "tracking_uri": mlflow_store,
        "experiment": "resume-test",
        "model_size": "tiny",
        "crop_size": 32,
        "batch_size": 2,
        "num_epochs": EPOCHS,
        "max_steps_per_epoch": STEPS,
        "learning_rate": 1e-3,
        "device": "cpu",
        "num_workers": 0,
        "log_model": "false",
        "resume": "auto",
    }
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]

    # 1. killed in the middle of epoch 1: epoch 0 is logged and epoch 1's progress bar shows
    #    steps done (the step-delay test hook slows steps down so that the bar redraws each one)
    first = Run([sys.executable, HOOKS, "--step_delay", "0.3", "--", *argv])
    runs.append(first)
    in_epoch_1 = re.compile(rf"epoch 1:\s+\d+%.*?\|\s*[2-{STEPS - 1}]/{STEPS}")
    first.wait_for(
        lambda: 0 in _jsonl_steps(out_dir) and in_epoch_1.search(first.err), "a step of epoch 1"
    )
    first.kill()
    states = _load_all(out_dir)
    run_id = states["last.pt"]["run_id"]
    assert run_id and states["last.pt"]["epoch"] == 0  # lost: the part of epoch 1 done

    # 2. killed while a checkpoint of epoch 1 is half-written (best.pt or last.pt, whichever
    #    comes first): the files on disk stay those of epoch 0
    second = Run([sys.executable, HOOKS, "--write_delay", "60", "--", *argv])
    runs.append(second)

    def half_written() -> list[Path]:
        found = list(out_dir.glob(f".*.pt.{second.proc.pid}.tmp"))
        return [t for t in found if t.stat().st_size > 0]

    second.wait_for(half_written, "a half-written checkpoint")
    tmp = half_written()[0]
    second.kill()
    assert "resumed from" in second.err and "epoch 1:" in second.err
    states = _load_all(out_dir)
    assert states["last.pt"]["epoch"] == 0 and states["last.pt"]["run_id"] == run_id
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp)  # what a non-atomic write would have left in place

    # 3. resumed to the end
    third = Run([sys.executable, "-m", "deblur_lib.train", *argv])
    runs.append(third)
    assert third.finish() == 0, third.err
    assert "Training finished: 4 epochs" in third.err and "interrupted by a crash" in third.err
    assert not list(out_dir.glob(".*.tmp"))
    states = _load_all(out_dir)
    last = states["last.pt"]
    assert last["epoch"] == EPOCHS - 1 and last["run_id"] == run_id
    assert [h["epoch"] for h in last["history"]] == list(range(EPOCHS))
    assert last["step"] == EPOCHS * STEPS  # the killed partial epochs were redone, not counted
    assert _jsonl_steps(out_dir) == list(range(EPOCHS))

    client = MlflowClient(tracking_uri=mlflow_store)
    exp = client.get_experiment_by_name("resume-test")
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stop_reason"] == "completed"
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(EPOCHS)), (key, steps)  # each epoch exactly once


def test_resume_refuses_a_checkpoint_corrupted_after_it_was_written(tiny_data, tmp_path, capsys):
    """One bit flipped in the middle of last.pt's largest tensor storage: torch.load returns the
    changed weights without a complaint; ``--resume auto`` stops with a usage error naming
    the file and the digest mismatch, before anything is trained or logged (without the
    digest this run resumes and finishes: exit 0)."""
    out_dir = tmp_path / "run"
    cfg = TrainConfig(
        train_data=str(tiny_data / "train"),
        test_data=str(tiny_data / "test"),
        out_dir=str(out_dir),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        model_size="tiny",
        crop_size=32,
        batch_size=2,
        num_epochs=2,
        max_steps_per_epoch=1,
        device="cpu",
        num_workers=0,
        log_model=False,
    )
    model = build_model("tiny")
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    objects = (model, optimizer, build_scheduler(optimizer, cfg, 1), StepGuard())
    path = out_dir / "last.pt"
    save_checkpoint(path, training_state(*objects, Progress(epoch=0), cfg.to_dict()), model)
    before = torch.load(path, weights_only=True)["model"]
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size if "/data/" in i.filename else -1)
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
    raw[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x10
    path.write_bytes(raw)
    after = torch.load(path, weights_only=True)["model"]  # no error from torch
    assert [k for k in before if not torch.equal(before[k], after[k])] != []

    argv = [f"--{k}={v}" for k, v in cfg.to_dict().items() if v is not None] + ["--resume=auto"]
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{path}: not a readable checkpoint (digest mismatch: stored " in err
    assert sorted(p.name for p in out_dir.iterdir()) == ["last.pt"]  # nothing trained, logged
