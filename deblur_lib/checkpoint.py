"""Checkpoints that are never half-written and never hold non-finite weights.

A checkpoint is a plain dict loadable with ``torch.load(..., weights_only=True)``:
``model``, ``optimizer``, ``scheduler``, ``step_guard`` state dicts, ``rng`` (python, numpy,
torch, cuda), ``config`` (``TrainConfig.to_dict()``) and the fields of ``Progress``: ``epoch``
(last completed, -1 before the first), ``step`` (global), ``run_id`` (MLflow), ``best_psnr``,
``best_epoch``, ``rollbacks``, ``invalid_epochs``, ``history`` (one record per epoch).

Test hook: ``DEBLUR_CKPT_WRITE_DELAY_S=SECONDS`` makes ``save_checkpoint`` write half of the
file, flush it, and sleep that long before writing the rest (and replacing the target), so
a test can kill the process in the middle of a checkpoint write. Unset in normal use.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

FORMAT = 1
WRITE_DELAY_ENV = "DEBLUR_CKPT_WRITE_DELAY_S"  # test hook, see the module docstring
# What torch.load raises on a truncated or garbage file (zip reader, then the legacy unpickler)
_UNREADABLE = (
    RuntimeError, EOFError, OSError, pickle.UnpicklingError, KeyError, IndexError, ValueError
)  # fmt: skip


@dataclass
class Progress:
    """The loop's bookkeeping, saved in every checkpoint. ``epoch``: last completed (-1 before
    the first); ``step``: global optimizer steps taken or skipped; ``run_id``: MLflow run."""

    epoch: int = -1
    step: int = 0
    rollbacks: int = 0
    invalid_epochs: int = 0
    best_psnr: float = -math.inf
    best_epoch: int | None = None
    run_id: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def training_state(model, optimizer, scheduler, guard, progress: Progress, config: dict) -> dict:
    """Everything needed to resume: state dicts, RNG states, progress and the config."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step_guard": guard.state_dict(),
        "rng": rng_state(),
        "config": config,
        **dataclasses.asdict(progress),
    }


def restore_training_state(state: dict, model, optimizer, scheduler, guard) -> Progress:
    """Load ``state`` (from ``training_state``) into the objects; returns its ``Progress``."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    guard.load_state_dict(state["step_guard"])
    set_rng_state(state["rng"])
    names = [f.name for f in dataclasses.fields(Progress)]
    return Progress(**{name: state[name] for name in names})


def weights_finite(model: nn.Module) -> bool:
    """True when every parameter and buffer is finite. Syncs: call at epoch boundaries only."""
    tensors = [t.detach() for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if not tensors:
        return True
    # note: CPU-GPU sync point (one per call)
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def save_checkpoint(path: str | os.PathLike, state: dict, model: nn.Module | None = None) -> Path:
    """Write ``state`` to ``path`` atomically (temp file in the same folder + ``os.replace``).

    A crash mid-write leaves the previous file intact. With ``model`` given, refuses (ValueError)
    to write when its weights are not finite, so a checkpoint on disk always holds finite weights.
    """
    path = Path(path)
    if model is not None and not weights_finite(model):
        raise ValueError(f"refusing to write {path}: the model's weights are not finite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            delay = float(os.environ.get(WRITE_DELAY_ENV) or 0)
            if delay > 0:
                _write_slowly(fh, {"format": FORMAT, **state}, delay)
            else:
                torch.save({"format": FORMAT, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_slowly(fh, state: dict, delay: float) -> None:
    """The ``DEBLUR_CKPT_WRITE_DELAY_S`` test hook: half the bytes, a pause, the rest."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    fh.write(data[: len(data) // 2])
    fh.flush()
    os.fsync(fh.fileno())
    time.sleep(delay)
    fh.write(data[len(data) // 2 :])


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete half-written ``.NAME.PID.tmp`` files that ``save_checkpoint`` left behind when its
    process was killed (PID not alive on this machine); returns what was removed."""
    removed = []
    for tmp in Path(folder).glob(".*.pt.*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by ``save_checkpoint`` (``weights_only=True``: no pickled code).

    Raises ValueError naming the file when it is not such a checkpoint.
    """
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except _UNREADABLE as exc:
        raise ValueError(f"{path}: not a readable checkpoint ({exc})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path}: not a deblur-guard checkpoint (no 'model' entry)")
    return state


def rng_state() -> dict:
    """Every RNG's state, as weights_only-loadable types (tensors, ints, tuples)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` captured (CUDA states only when the device count matches)."""
    random.setstate(state["python"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
