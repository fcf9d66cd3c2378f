"""Checkpoints: atomic writes (the mid-write test hook), unreadable files, finite weights only,
the digest (a flipped bit in a tensor, edited fields, format 1 files without one)."""

from __future__ import annotations

import io
import logging
import os
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

from deblur_lib.guards import StepGuard
from deblur_lib.models import build_model
from deblur_lib.train.build import build_scheduler
from deblur_lib.train.checkpoint import (
    Progress,
    remove_stale_temp_files,
    rng_state,
    set_rng_state,
    training_state,
)
from deblur_lib.train.config import TrainConfig
from deblur_lib.weights import (
    CHECKPOINT_FORMAT,
    NotACheckpointError,
    load_checkpoint,
    save_checkpoint,
    state_digest,
)


def _state(value: float = 1.0) -> dict:
    return {"model": {"w": torch.full((4,), value)}, "epoch": 3}


def test_save_and_load_roundtrip(tmp_path, caplog):
    path = save_checkpoint(tmp_path / "sub" / "last.pt", _state())
    with caplog.at_level(logging.WARNING, logger="deblur_lib"):
        state = load_checkpoint(path)
    assert (
        state["epoch"] == 3 and state["format"] == CHECKPOINT_FORMAT == 2 and "digest" not in state
    )
    assert torch.equal(state["model"]["w"], torch.ones(4))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left
    raw = torch.load(path, weights_only=True)  # the digest is a plain str field
    assert raw["digest"] == state_digest(state) and len(raw["digest"]) == 64
    assert caplog.records == []  # verified: no "unverified" warning


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
    with pytest.raises(NotACheckpointError, match="no 'model' entry"):
        load_checkpoint(tmp_path / "other.pt")


def test_killed_mid_write_leaves_the_previous_checkpoint_and_a_stale_temp(tmp_path):
    """A write slowed by tests/hooks.py pauses half-way; SIGKILL there keeps last.pt intact,
    and remove_stale_temp_files cleans what the dead process left."""
    path = save_checkpoint(tmp_path / "last.pt", _state(1.0))
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import hooks; hooks.slow_writes(60); "
        "from deblur_lib.weights import save_checkpoint; "
        f"save_checkpoint({str(path)!r}, {{'model': {{'w': torch.full((4,), 2.0)}}}})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parents[1])])
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rng_state_restores_from_a_checkpoint_mapped_to_cuda(tmp_path):
    """``--resume`` on a GPU loads with map_location=cuda: the RNG tensors arrive on the GPU."""
    path = save_checkpoint(tmp_path / "rng.pt", {"model": {}, "rng": rng_state()})
    expected = (torch.rand(1), torch.rand(1, device="cuda"))
    rng = load_checkpoint(path, map_location="cuda")["rng"]
    assert rng["torch"].is_cuda and rng["numpy"]["keys"].is_cuda
    set_rng_state(rng)
    assert torch.equal(torch.rand(1), expected[0])
    assert torch.equal(torch.rand(1, device="cuda"), expected[1])


# --- the digest ------------------------------------------------------------------------------
def _digest_state() -> dict:
    """Tensors of distinct byte sizes, so each one's zip member is found by its size."""
    gen = torch.Generator().manual_seed(0)
    return {
        "model": {"w": torch.randn(1000, generator=gen), "b": torch.randn(10, generator=gen)},
        "optimizer": {"state": {0: {"exp_avg": torch.randn(300, generator=gen)}}},
        "epoch": 3,
        "config": {"model_size": "tiny", "learning_rate": 1e-3},
        "history": [{"epoch": 0, "val_psnr": 20.5}],
    }


def _flip_storage_byte(path: Path, nbytes: int) -> None:
    """Flip one bit in the middle of the tensor storage of ``nbytes`` bytes (zip member
    ``archive/data/N``) and rewrite that member's CRC-32 in the zip (local header, data
    descriptor, central directory), so that the zip is consistent and only the checkpoint's
    digest can notice."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        (info,) = [i for i in zf.infolist() if "/data/" in i.filename and i.file_size == nbytes]
        entry = zf.start_dir  # the central directory: one record per member, in order
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
    at = info.header_offset + 30 + name_len + extra_len  # stored (uncompressed) data
    raw[at + nbytes // 2] ^= 0x10
    crc = struct.pack("<I", zlib.crc32(raw[at : at + nbytes]))
    if raw[info.header_offset + 14 : info.header_offset + 18] != bytes(4):
        raw[info.header_offset + 14 : info.header_offset + 18] = crc
    if info.flag_bits & 0x08:  # a data descriptor follows the data: [signature] crc sizes
        dd = at + nbytes + (4 if raw[at + nbytes : at + nbytes + 4] == b"PK\x07\x08" else 0)
        raw[dd : dd + 4] = crc
    while True:
        assert raw[entry : entry + 4] == b"PK\x01\x02"
        n, m, k = struct.unpack_from("<HHH", raw, entry + 28)  # name, extra, comment lengths
        if raw[entry + 46 : entry + 46 + n] == info.filename.encode():
            raw[entry + 16 : entry + 20] = crc
            break
        entry += 46 + n + m + k
    path.write_bytes(raw)
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None  # the zip's own CRCs hold: the corruption is invisible to it


def _tensors(state: dict) -> list[torch.Tensor]:
    return [state["model"]["w"], state["model"]["b"], state["optimizer"]["state"][0]["exp_avg"]]


@pytest.mark.parametrize("nbytes", [4000, 40, 1200], ids=["weight", "bias", "optimizer-state"])
def test_a_flipped_bit_in_a_tensor_is_refused(tmp_path, nbytes):
    path = save_checkpoint(tmp_path / "last.pt", _digest_state())
    _flip_storage_byte(path, nbytes)
    raw = torch.load(path, weights_only=True)  # torch itself loads it without a complaint
    pairs = zip(_tensors(raw), _tensors(_digest_state()), strict=True)
    changed = [not torch.equal(a, b) for a, b in pairs]
    assert changed == [nbytes == 4000, nbytes == 40, nbytes == 1200]
    with pytest.raises(ValueError, match=r"last\.pt: not a readable checkpoint \(digest mismatch"):
        load_checkpoint(path)


def test_the_mismatch_message_names_both_digests(tmp_path):
    path = save_checkpoint(tmp_path / "last.pt", _digest_state())
    stored = torch.load(path, weights_only=True)["digest"]
    _flip_storage_byte(path, 4000)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    raw = torch.load(path, weights_only=True)
    computed = state_digest({k: v for k, v in raw.items() if k != "digest"})
    assert computed != stored
    assert f"stored {stored}, computed {computed}" in str(info.value)


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s.update(epoch=4),
        lambda s: s["config"].update(model_size="small"),
        lambda s: s["history"][0].update(val_psnr=20.25),
        lambda s: s["history"].append({}),
        lambda s: s.update(extra=None),
        lambda s: s.pop("history"),
        lambda s: s["optimizer"]["state"].update({1: s["optimizer"]["state"].pop(0)}),
        lambda s: s["model"]["w"].mul_(-1),
        lambda s: s["model"].update(w=s["model"]["w"].double()),
        lambda s: s["model"].update(w=s["model"]["w"].reshape(10, 100)),
    ],
    ids=["int", "str", "float", "list", "new-key", "dropped-key", "dict-key", "tensor-values",
         "tensor-dtype", "tensor-shape"],
)  # fmt: skip
def test_an_edited_field_is_refused(tmp_path, edit):
    """Re-saved with torch.save after an edit, keeping the old digest: every field counts."""
    path = save_checkpoint(tmp_path / "last.pt", _digest_state())
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    with pytest.raises(ValueError, match="digest mismatch"):
        load_checkpoint(path)


def test_format_1_without_digest_loads_with_one_warning(tmp_path, caplog):
    path = tmp_path / "old.pt"
    torch.save({"format": 1, **_digest_state()}, path)  # what save_checkpoint wrote before
    with caplog.at_level(logging.WARNING, logger="deblur_lib"):
        state = load_checkpoint(path)
    assert torch.equal(state["model"]["w"], _digest_state()["model"]["w"])
    assert state["epoch"] == 3 and state["format"] == 1
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert caplog.records[0].getMessage() == (
        f"{path}: format 1 checkpoint without a digest: loaded unverified"
    )


def test_resaving_a_format_1_state_adds_the_digest(tmp_path, caplog):
    torch.save({"format": 1, **_digest_state()}, tmp_path / "old.pt")
    path = save_checkpoint(tmp_path / "new.pt", load_checkpoint(tmp_path / "old.pt"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deblur_lib"):
        assert load_checkpoint(path)["format"] == 2
    assert caplog.records == []


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"format": 2}, "format 2 but no digest"),
        ({"format": 2, "digest": "0" * 64}, "digest mismatch"),
        ({"format": 2, "digest": None}, "format 2 but no digest"),
        ({"format": 3, "digest": "0" * 64}, "checkpoint format 3; this deblur_lib reads 1 to 2"),
        ({"format": "2"}, "checkpoint format '2'"),
    ],
    ids=["no-digest", "wrong-digest", "digest-none", "newer-format", "format-not-int"],
)
def test_a_format_2_file_must_carry_its_digest(tmp_path, fields, match):
    path = tmp_path / "bad.pt"
    torch.save({**_digest_state(), **fields}, path)
    with pytest.raises(ValueError, match=match):
        load_checkpoint(path)


@pytest.mark.parametrize("scheduler", ["cosine", "plateau"])
def test_a_full_training_state_verifies(tmp_path, scheduler):
    """The real payload (state dicts with bools, None, tuples, inf; RNG states; config;
    progress with NaN) round-trips through the digest, and re-hashes the same after loading."""
    model = build_model("tiny")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(1, 3, 16, 16)).square().mean().backward()
    optimizer.step()
    cfg = TrainConfig(scheduler=scheduler, warmup_steps=2 if scheduler == "cosine" else 0)
    sched = build_scheduler(optimizer, cfg, steps_per_epoch=3)  # what the trainer saves
    sched.step(*([20.0] if scheduler == "plateau" else []))
    progress = Progress(epoch=0, step=1, history=[{"epoch": 0, "val_psnr": float("nan")}])
    state = training_state(model, optimizer, sched, StepGuard(), progress, cfg.to_dict())
    path = save_checkpoint(tmp_path / "last.pt", state, model)
    loaded = load_checkpoint(path)
    assert state_digest(loaded) == torch.load(path, weights_only=True)["digest"]
    assert torch.equal(
        loaded["optimizer"]["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )


def test_digest_ignores_dict_order_and_storage_layout():
    a = {"x": torch.arange(6.0).reshape(2, 3), "y": 1}
    b = {"y": 1, "x": torch.arange(6.0).reshape(2, 3).t().contiguous().t()}  # column-major
    wide = torch.zeros(2, 5)
    wide[:, 1:4] = torch.arange(6.0).reshape(2, 3)
    c = {"y": 1, "x": wide[:, 1:4]}  # a strided view into a larger storage
    assert not b["x"].is_contiguous() and not c["x"].is_contiguous()
    assert state_digest(a) == state_digest(b) == state_digest(c)
    assert state_digest(a) != state_digest({"x": a["x"], "y": 1.0})  # 1 and 1.0 differ
    assert state_digest({"y": [1, 2]}) != state_digest({"y": (1, 2)})
    assert state_digest({"y": ["ab"]}) != state_digest({"y": ["a", "b"]})


def test_digest_refuses_types_it_cannot_encode(tmp_path):
    with pytest.raises(TypeError, match="cannot encode a set"):
        save_checkpoint(tmp_path / "last.pt", {"model": {}, "tags": {"a", "b"}})
    assert not (tmp_path / "last.pt").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_digest_of_cuda_tensors_matches_cpu(tmp_path):
    state = _digest_state()
    cuda = {**state, "model": {k: v.cuda() for k, v in state["model"].items()}}
    assert state_digest(cuda) == state_digest(state)
    path = save_checkpoint(tmp_path / "last.pt", cuda)
    loaded = load_checkpoint(path, map_location="cuda")
    assert loaded["model"]["w"].is_cuda
