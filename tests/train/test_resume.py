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
itself loads without a complaint): ``--resume auto`` refuses it by its digest. Then resume
with other settings (``config.RESUME_POLICY``), ``--resume FILE`` into another ``--out_dir``,
``--resume auto`` of a finished run, and a damaged ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import logging
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
from deblur_lib.train import fit
from deblur_lib.train.__main__ import EXIT_USAGE, main
from deblur_lib.train.build import build_optimizer, build_scheduler, cosine_warmup_factor
from deblur_lib.train.checkpoint import Progress, training_state
from deblur_lib.train.config import RESUME_POLICY, TrainConfig, resume_changes
from deblur_lib.train.tracking import Tracker
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


@pytest.mark.slow
def test_sigterm_ends_the_run_like_ctrl_c(tiny_data, mlflow_store, tmp_path, runs):
    """What a batch scheduler or ``docker stop`` sends. Before: the process died at once and
    the MLflow run stayed RUNNING forever. Now: exit 143, one line, the run KILLED with
    stop_reason=terminated, last.pt the last finished epoch's (valid), and --resume goes on."""
    out_dir = tmp_path / "run"
    flags = {
        "train_data": tiny_data / "train",
        "test_data": tiny_data / "test",
        "out_dir": out_dir,
        "tracking_uri": mlflow_store,
        "experiment": "sigterm-test",
        "model_size": "tiny",
        "crop_size": 32,
        "batch_size": 2,
        "num_epochs": 3,
        "max_steps_per_epoch": STEPS,
        "device": "cpu",
        "num_workers": 0,
        "log_model": "false",
    }
    argv = [f"--{key}={value}" for key, value in flags.items()]
    run = Run([sys.executable, HOOKS, "--step_delay", "0.3", "--", *argv])
    runs.append(run)
    in_epoch_1 = re.compile(rf"epoch 1:\s+\d+%.*?\|\s*[1-{STEPS - 1}]/{STEPS}")
    run.wait_for(lambda: in_epoch_1.search(run.err), "a step of epoch 1")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 143, run.err
    assert (
        run.err.strip()
        .splitlines()[-1]
        .startswith("python -m deblur_lib.train: terminated (SIGTERM): MLflow run marked KILLED")
    )
    last = _load_all(out_dir)["last.pt"]
    assert last["epoch"] == 0 and last["stop_reason"] is None  # resumable, not finished
    mlflow_run = MlflowClient(tracking_uri=mlflow_store).get_run(last["run_id"])
    assert mlflow_run.info.status == "KILLED"
    assert mlflow_run.data.tags["stop_reason"] == "terminated"
    assert "last.pt holds epoch 0" in mlflow_run.data.tags["stop_message"]


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


# --- resume with other settings, into another folder, of a finished run ----------------------
def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file's size and mtime, every folder's name (validation probes folders: their
    mtime changes, their contents do not)."""
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, 0)
        for p in root.rglob("*")
    }


@pytest.fixture
def small(tiny_data, mlflow_store, tmp_path) -> TrainConfig:
    """One step per epoch, one epoch: the smallest run that trains, validates and checkpoints
    (the session's MLflow store: creating one costs seconds)."""
    return TrainConfig(
        train_data=str(tiny_data / "train"),
        test_data=str(tiny_data / "test"),
        out_dir=str(tmp_path / "run"),
        tracking_uri=mlflow_store,
        experiment="resume-settings",
        model_size="tiny",
        crop_size=32,
        batch_size=2,
        num_epochs=1,
        max_steps_per_epoch=1,
        learning_rate=1e-3,
        device="cpu",
        num_workers=0,
        log_model=False,
    )


def _cli(cfg: TrainConfig, **overrides) -> list[str]:
    values = {**cfg.to_dict(), **overrides}
    return [f"--{k}={v}" for k, v in values.items() if v is not None]


def _run(cfg: TrainConfig, run_id: str):
    return MlflowClient(tracking_uri=cfg.tracking_uri).get_run(run_id)


def _steps(cfg: TrainConfig, run_id: str, key: str = "train_loss") -> list[int]:
    history = MlflowClient(tracking_uri=cfg.tracking_uri).get_metric_history(run_id, key)
    return sorted(m.step for m in history)


def test_every_flag_has_a_resume_policy():
    assert set(RESUME_POLICY) == {f.name for f in TrainConfig.__dataclass_fields__.values()}
    assert set(RESUME_POLICY.values()) == {"same", "apply", "free"}


@pytest.mark.parametrize(
    ("name", "old", "now", "change"),
    [
        ("compile", False, "false", None),
        ("compile", False, "auto", ("false", "auto")),
        ("channels_last", True, "true", None),
        ("channels_last", True, "auto", ("true", "auto")),
    ],
)
def test_a_checkpoint_from_before_a_switch_resumes_without_a_false_change(name, old, now, change):
    """Checkpoints written before ``auto`` hold compile: False, channels_last: True (bools)."""
    saved = TrainConfig().to_dict() | {name: old}
    cfg = TrainConfig(**{name: now})
    assert resume_changes(saved, cfg, epochs_done=1, where="last.pt").get(name) == change


@pytest.mark.parametrize("scheduler", ["plateau", "cosine"])
def test_resume_applies_lr_and_patience_and_tags_the_change(small, scheduler, caplog):
    """Before: --learning_rate 0.5 --patience 7 on resume were ignored (the restored optimizer
    and scheduler kept 1e-3 and 20) while last.pt's config claimed them."""
    cfg = TrainConfig(**{**small.to_dict(), "scheduler": scheduler})
    first = fit(cfg)
    argv = _cli(cfg, resume="auto", num_epochs=2, learning_rate=0.5, patience=7)
    with caplog.at_level(logging.INFO, logger="deblur_lib.train"):
        assert main(argv) == 0
    last = load_checkpoint(Path(cfg.out_dir, "last.pt"))
    assert last["config"]["learning_rate"] == 0.5 and last["config"]["patience"] == 7
    lr = last["history"][1]["lr"]
    if scheduler == "plateau":
        assert lr == 0.5 and last["scheduler"]["patience"] == 7
    else:  # the rest of the cosine schedule, on the new base lr (step 2 of 2: the end)
        assert last["scheduler"]["base_lrs"] == [0.5]
        assert lr == pytest.approx(0.5 * cosine_warmup_factor(2, 0, 2))
    tags = _run(cfg, first.run_id).data.tags
    assert tags["resume_changed.learning_rate"] == "0.001 -> 0.5"
    assert tags["resume_changed.patience"] == "20 -> 7"
    assert tags["resume_changed.num_epochs"] == "1 -> 2"
    assert "--learning_rate changed on resume: 0.001 -> 0.5 (applied)" in caplog.text


REFUSED = {"batch_size": 4, "seed": 1, "alpha": 0.5, "max_steps_per_epoch": 2, "num_epochs": 1}


def test_resume_refuses_a_change_that_makes_another_experiment(small, capsys):
    """Each refusal: exit 2, one line naming the flag, nothing written, the run untouched."""
    first = fit(TrainConfig(**{**small.to_dict(), "num_epochs": 2}))
    before = _snapshot(Path(small.out_dir).parent)
    for flag, value in REFUSED.items():
        assert main(_cli(small, resume="auto", **{"num_epochs": 3, flag: value})) == EXIT_USAGE
        line = capsys.readouterr().err.strip().splitlines()[-1]
        if flag == "num_epochs":
            assert "2 epochs are done already; pass --num_epochs 2 or more" in line
        else:
            assert f"it was trained with --{flag} {getattr(small, flag)}, not {value}" in line
        assert _snapshot(Path(small.out_dir).parent) == before
    assert _run(small, first.run_id).info.status == "FINISHED"


def test_resume_file_into_another_out_dir_never_logs_a_step_twice(small, monkeypatch, caplog):
    """Before: epoch 1 was logged again into the original run ("checkpointed but not logged
    before the crash: logged now", which was false): two points at step 1."""
    first = fit(TrainConfig(**{**small.to_dict(), "num_epochs": 2}))
    elsewhere = str(Path(small.out_dir).parent / "elsewhere")
    resume = str(first.last_checkpoint)
    with caplog.at_level(logging.INFO, logger="deblur_lib.train"):
        second = fit(TrainConfig(**{**small.to_dict(), "num_epochs": 3, "out_dir": elsewhere,
                                    "resume": resume}))  # fmt: skip
    assert second.run_id == first.run_id and second.best_checkpoint.parent.name == "elsewhere"
    assert _steps(small, first.run_id) == [0, 1, 2]
    assert "checkpointed but" not in caplog.text
    assert _run(small, first.run_id).data.tags["resume_changed.out_dir"].endswith("elsewhere")
    # the tracking store cannot say: metrics.jsonl beside the checkpoint does
    monkeypatch.setattr(Tracker, "logged_steps", lambda self: None)
    third = str(Path(small.out_dir).parent / "third")
    fit(TrainConfig(**{**small.to_dict(), "num_epochs": 4, "out_dir": third,
                       "resume": str(Path(elsewhere, "last.pt"))}))  # fmt: skip
    assert _steps(small, first.run_id) == [0, 1, 2, 3]


def test_resume_auto_of_a_finished_run_is_a_no_op(small, caplog):
    """Before: it logged the model again (a second registry version from one run)."""
    name = "resumed-once"
    cfg = TrainConfig(**{**small.to_dict(), "log_model": True, "registered_model_name": name})
    first = fit(cfg)
    assert load_checkpoint(first.last_checkpoint)["stop_reason"] == "completed"
    before = _snapshot(Path(cfg.out_dir).parent)
    with caplog.at_level(logging.INFO, logger="deblur_lib.train"):
        assert main(_cli(cfg, resume="auto")) == 0
    assert "the run finished all 1 epochs" in caplog.text and "nothing to do" in caplog.text
    assert _snapshot(Path(cfg.out_dir).parent) == before  # no checkpoint, metric or store write
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    assert len(client.search_model_versions(f"name='{name}'")) == 1


def test_resume_drops_a_torn_metrics_line_and_refuses_other_damage(small, capsys, caplog):
    """Before: JSONDecodeError traceback, and the finished run flipped back to RUNNING."""
    first = fit(small)
    jsonl = Path(small.out_dir, "metrics.jsonl")
    whole = jsonl.read_text()
    jsonl.write_text("{not json}\n" + whole)  # damage that is not a crash's torn line
    before = _snapshot(Path(small.out_dir).parent)
    assert main(_cli(small, resume="auto", num_epochs=2)) == EXIT_USAGE
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "metrics.jsonl: line 1 of 2 is damaged" in line
    assert _snapshot(Path(small.out_dir).parent) == before
    assert _run(small, first.run_id).info.status == "FINISHED"

    jsonl.write_text(whole + '{"step": 1, "ti')  # what a crash mid-write leaves
    with caplog.at_level(logging.WARNING, logger="deblur_lib.train"):
        assert main(_cli(small, resume="auto", num_epochs=2)) == 0
    assert "dropped a torn last line" in caplog.text
    assert _jsonl_steps(Path(small.out_dir)) == [0, 1]
