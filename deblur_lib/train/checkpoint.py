"""Training checkpoints: everything a run needs to continue, and the run folder around them.

A training checkpoint is a ``deblur_lib.weights`` file (atomic, weights-only, digest-checked)
holding ``model``, ``optimizer``, ``scheduler``, ``step_guard`` state dicts, ``rng`` (python,
numpy, torch, cuda), ``config`` (``TrainConfig.to_dict()``) and the fields of ``Progress``:
``epoch`` (last completed, -1 before the first), ``step`` (global), ``run_id`` (MLflow),
``best_psnr``, ``best_epoch``, ``rollbacks``, ``invalid_epochs``, ``history`` (one record per
epoch), ``stop_reason`` (set in ``last.pt`` when the run ends); with ``--ema``, ``ema`` (the
weight average: ``model`` state dict and ``updates``). Also here: what a run leaves in
``out_dir`` (``RUN_FILES``), moving an earlier run's files out of a fresh run's way, and
removing temp files that a killed write left behind.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "figures")  # what a run writes in out_dir
log = logging.getLogger(__name__)


@dataclass
class Progress:
    """The loop's bookkeeping, saved in every checkpoint. ``epoch``: last completed (-1 before
    the first); ``step``: global optimizer steps taken or skipped; ``run_id``: MLflow run;
    ``stop_reason``: how the run ended (written into ``last.pt`` at the end; None while it
    runs, or after a crash)."""

    epoch: int = -1
    step: int = 0
    rollbacks: int = 0
    invalid_epochs: int = 0
    best_psnr: float = -math.inf
    best_epoch: int | None = None
    run_id: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    stop_reason: str | None = None


def training_state(
    model, optimizer, scheduler, guard, progress: Progress, config: dict, ema=None
) -> dict:
    """Everything needed to resume: state dicts, RNG states, progress and the config (and the
    weight average's state under ``ema`` when there is one)."""
    extra = {"ema": ema.state_dict()} if ema is not None else {}
    return extra | {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step_guard": guard.state_dict(),
        "rng": rng_state(),
        "config": config,
        **dataclasses.asdict(progress),
    }


def restore_training_state(state: dict, model, optimizer, scheduler, guard, ema=None) -> Progress:
    """Load ``state`` (from ``training_state``) into the objects; returns its ``Progress``."""
    model.load_state_dict(state["model"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    guard.load_state_dict(state["step_guard"])
    set_rng_state(state["rng"])
    names = [f.name for f in dataclasses.fields(Progress)]
    return Progress(**{name: state[name] for name in names if name in state})  # older: defaults


def archive_previous_run(out_dir: str | Path) -> Path | None:
    """Move an earlier run's files out of the way of a fresh run in the same ``out_dir``.

    A new run (no ``--resume``) would otherwise overwrite the earlier ``last.pt``/``best.pt``
    and append to its ``metrics.jsonl``. They go to ``out_dir/previous/<UTC time>/``; returns
    that folder, or None when there was nothing to move.
    """
    found = [Path(out_dir, name) for name in RUN_FILES if Path(out_dir, name).exists()]
    if not found:
        return None
    dest = Path(out_dir, "previous", time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    while dest.exists():  # two fresh runs within one second
        dest = dest.with_name(dest.name + "+")
    dest.mkdir(parents=True)
    for path in found:
        path.rename(dest / path.name)
    return dest


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
    """Restore what ``rng_state`` captured (CUDA states only when the device count matches).
    The state's tensors may sit on any device (a checkpoint loaded with ``map_location``)."""
    random.setstate(state["python"])
    n = state["numpy"]
    keys = n["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
