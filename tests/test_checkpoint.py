"""Checkpoints: atomic writes (the mid-write test hook), unreadable files, finite weights only."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from deblur_lib.checkpoint import (
    WRITE_DELAY_ENV,
    load_checkpoint,
    remove_stale_temp_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _state(value: float = 1.0) -> dict:
    return {"model": {"w": torch.full((4,), value)}, "epoch": 3}


def test_save_and_load_roundtrip(tmp_path):
    path = save_checkpoint(tmp_path / "sub" / "last.pt", _state())
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and state["format"] == 1
    assert torch.equal(state["model"]["w"], torch.ones(4))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left


def test_refuses_non_finite_weights_and_keeps_the_old_file(tmp_path):
    path = save_checkpoint(tmp_path / "last.pt", _state(1.0))
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        save_checkpoint(path, _state(2.0), model)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(4))


def _good_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.ones(64)}}, buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    "data",
    [b"", b"junk" * 100, b"\x80\x02" + b"x" * 50, "half", "head", os.urandom(2000)],
    ids=["empty", "text", "pickle-ish", "half", "first-10-bytes", "random"],
)
def test_unreadable_files_raise_value_error_naming_the_file(tmp_path, data):
    good = _good_bytes()
    data = {"half": good[: len(good) // 2], "head": good[:10]}.get(data, data)
    path = tmp_path / "bad.pt"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="bad.pt: not a readable checkpoint"):
        load_checkpoint(path)


def test_not_a_deblur_checkpoint(tmp_path):
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no 'model' entry"):
        load_checkpoint(tmp_path / "other.pt")


def test_killed_mid_write_leaves_the_previous_checkpoint_and_a_stale_temp(tmp_path):
    """The DEBLUR_CKPT_WRITE_DELAY_S hook pauses half-way; SIGKILL there keeps last.pt intact,
    and remove_stale_temp_files cleans what the dead process left."""
    path = save_checkpoint(tmp_path / "last.pt", _state(1.0))
    code = (
        "import torch; from deblur_lib.checkpoint import save_checkpoint; "
        f"save_checkpoint({str(path)!r}, {{'model': {{'w': torch.full((4,), 2.0)}}}})"
    )
    env = {**os.environ, WRITE_DELAY_ENV: "60"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    tmp = tmp_path / f".last.pt.{proc.pid}.tmp"
    deadline = time.monotonic() + 120
    while not (tmp.is_file() and tmp.stat().st_size > 0):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    assert remove_stale_temp_files(tmp_path) == []  # its writer is alive: not stale
    proc.kill()
    proc.wait(30)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(4))
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp)
    assert remove_stale_temp_files(tmp_path) == [tmp] and not tmp.exists()


def test_rng_state_roundtrip_is_weights_only_loadable(tmp_path):
    import random

    import numpy as np

    path = save_checkpoint(tmp_path / "rng.pt", {"model": {}, "rng": rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1))
    set_rng_state(load_checkpoint(path)["rng"])
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])
