"""The fault matrix: every injected fault and every data fault, through ``fit`` (tiny model, CPU).

One ``fit`` per row on a shared 64 px dataset (or a variant of it with bad files). For every
row: no NaN/inf/0.0-sentinel metric in the MLflow store, every checkpoint on disk loads with
finite weights, the counters match what was injected, and the run either finishes or stops with
a message naming the cause; bad files give an error naming the file. The rows are printed as a
table at the end of the session (tests/conftest.py).

Data-range decision (the ``range_*`` rows): files always load into model space [-1, 1] (the
loader divides by the dtype's maximum and clamps), so a range confusion in the *files* shows up
as images that use only part of the range. ``data.data_range_problem`` checks the first
full-size pair of each set once per run: values outside [-1, 1] (tensors from elsewhere, e.g.
[0, 255]) raise ValueError; every pixel in the upper half (images normalised twice, or [0, 1]
data read as [-1, 1]) or a span under 1/16 of the range (8-bit values in a 16-bit file) give a
warning, and training goes on: such images are valid, only suspicious.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from deblur_lib.data import DatasetError, data_range_problem
from deblur_lib.evaluate import REASONS
from deblur_lib.train import fit
from deblur_lib.train.config import TrainConfig
from deblur_lib.train.faults import TRAIN_KINDS, VAL_KINDS
from deblur_lib.weights import load_checkpoint

torch.set_num_threads(2)
QUALITY = re.compile(r"(psnr|ssim)(_partial)?$")
EXPERIMENT = "fault-matrix"


@dataclass(frozen=True)
class Case:
    """One row. ``expect``: a stop reason, or an exception type name for bad input.
    ``skipped``/``fallbacks``/``val_skipped``: expected counters (None: not checked)."""

    name: str
    fault: str | None = None
    data: str = "base"
    overrides: dict = field(default_factory=dict)
    expect: str = "completed"
    skipped: int | None = 0
    fallbacks: int | None = 0
    val_skipped: dict = field(default_factory=dict)
    says: tuple[str, ...] = ()  # substrings of the stop message / error / warning
    rollbacks: int | None = 0
    tags: tuple[str, ...] = ()  # MLflow tags the run must have


# NaN at (0, 0) of sample 0 spreads over that sample only (no batch statistics): one skipped
# step and, when the prediction or target is non-finite, one per-sample MS-SSIM fallback.
FALLS_BACK = {"nan_input", "inf_input", "nan_target", "inf_target", "nan_output", "inf_output"}
TRAIN_ROWS = [
    Case(
        kind,
        f"{kind}@step=1",
        skipped=0 if kind == "const_input" else 1,
        fallbacks=int(kind in FALLS_BACK),
    )
    for kind in TRAIN_KINDS
]
# one bad batch of two at epoch 0: a partial validation (logged as val_*_partial, counted as
# invalid); epoch 1's full validation is the one that counts
VAL_ROWS = [
    Case(
        kind,
        f"{kind}@epoch=0",
        overrides={"num_epochs": 2, "max_steps_per_epoch": 1},
        val_skipped={"metric_error" if kind == "val_metric_error" else "nonfinite_output": 1},
    )
    for kind in VAL_KINDS
]
OTHER_ROWS = [
    Case(
        "persistent NaN input",
        "nan_input@step=0,count=100",
        overrides={"max_bad_steps": 1, "max_rollbacks": 1, "max_steps_per_epoch": 4},
        expect="rollbacks_exhausted",
        skipped=4,
        fallbacks=None,
        rollbacks=1,
        says=("consecutive non-finite steps", "input to the model"),
    ),
    Case(
        "all-bad validation",
        "val_nan_output@epoch=0,batches=all;val_nan_output@epoch=1,batches=all",
        overrides={"num_epochs": 3, "max_invalid_epochs": 2, "max_steps_per_epoch": 1},
        expect="invalid_epochs",
        val_skipped={"nonfinite_output": 4},
        says=("Evaluated 0/2 batches successfully (skipped: nonfinite_output=2)",),
    ),
    Case(  # 5 skips straddle the check at the end of epoch 0: 3 before it, 2 after
        "skip run across a guard read",
        "nan_loss@step=1,count=5",
        overrides={"num_epochs": 2, "max_steps_per_epoch": 4, "log_every": 10, "max_bad_steps": 3},
        skipped=5,
        fallbacks=None,
        rollbacks=1,
        says=("rollback 1/3: 5 consecutive non-finite steps",),
    ),
    Case(
        "no valid validation",
        "val_nan_output@epoch=0,batches=all",
        overrides={"max_invalid_epochs": 2, "registered_model_name": "never", "log_model": True},
        expect="no_valid_validation",
        val_skipped={"nonfinite_output": 2},
        says=("none of the 1 validation(s) was valid",),
    ),
    Case(
        "partial validation only",
        "val_nan_output@epoch=0",
        overrides={"max_invalid_epochs": 2},
        expect="no_valid_validation",
        val_skipped={"nonfinite_output": 1},
        says=("none of the 1 validation(s) was valid",),
    ),
    Case("constant frames (files)", data="constant"),
    Case("val images 32-160 px", data="val_sizes", val_skipped={}),
    Case("batch size 1", overrides={"batch_size": 1}),
    Case("gray files", data="gray"),
    Case("16-bit files (gray + RGB)", data="16bit"),
    Case("RGBA files", data="rgba"),
    Case("corrupt file", data="corrupt", expect="ValueError", says=("train/blur/0003.png",)),
    Case(
        "truncated train file",
        data="truncated",
        overrides={"max_steps_per_epoch": None},
        expect="DatasetError",
        says=("truncated image", "train/sharp/0002.png"),
    ),
    Case(
        "truncated train file, 1 worker",
        data="truncated",
        overrides={"max_steps_per_epoch": None, "num_workers": 1},
        expect="DatasetError",
        says=("truncated image", "train/sharp/0002.png"),
    ),
    Case(
        "truncated val file",
        data="truncated_val",
        expect="DatasetError",
        says=("truncated image", "test/blur/0001.png"),
    ),
    Case("unpaired file", data="unpaired", expect="ValueError", says=("train/blur/9999.png",)),
    Case("blur/sharp size mismatch", data="mismatch", expect="ValueError", says=("0001.png",)),
    Case("val images 8 px", data="val_8px", expect="ValueError", says=("at least 11 px",)),
    Case(
        "test data = train data, allowed",
        data="test_is_train",
        overrides={"allow_test_in_train": True},
        says=("4 of 4 test pairs are training pairs",),
        tags=("test_in_train",),
    ),
    Case("range: normalised twice", data="range_upper", says=("upper half",)),
    Case("range: 8-bit values in 16-bit", data="range_dark16", says=("spans only",)),
]
ROWS = TRAIN_ROWS + VAL_ROWS + OTHER_ROWS


# --- dataset variants -------------------------------------------------------------------------
def _png16(path: Path, arr: np.ndarray) -> None:
    """A 16-bit PNG (gray or RGB by channel count) written by hand (Pillow cannot)."""
    arr = arr if arr.ndim == 3 else arr[:, :, None]
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2}[c], 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _images(root: Path):
    return sorted(root.glob("*/*/*.png"))


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _mutate(root: Path, name: str) -> None:
    rng = np.random.default_rng(0)
    if name == "constant":
        for i, value in enumerate((0, 128, 255)):
            for side in ("blur", "sharp"):
                path = root / "train" / side / f"{i:04d}.png"
                Image.new("RGB", (64, 64), (value,) * 3).save(path)
    elif name == "val_sizes":
        for i, (h, w) in enumerate(((32, 32), (33, 47), (61, 160), (160, 97))):
            for side in ("blur", "sharp"):
                path = root / "test" / side / f"{i:04d}.png"
                Image.open(path).resize((w, h), Image.BICUBIC).save(path)
    elif name in ("gray", "rgba"):
        for path in _images(root):
            img = Image.open(path).convert("RGB")
            if name == "gray":
                img = img.convert("L")
            else:
                img = img.convert("RGBA")
                img.putalpha(Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)))
            img.save(path)
    elif name == "16bit":
        for k, path in enumerate(_images(root)):
            arr = _rgb(path).astype(np.uint16) * 257
            _png16(path, arr if k % 2 else arr.mean(2).astype(np.uint16))
    elif name == "corrupt":
        (root / "train" / "blur" / "0003.png").write_bytes(rng.bytes(3000))
    elif name == "truncated":
        path = root / "train" / "sharp" / "0002.png"
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 6 // 10])
    elif name == "truncated_val":
        path = root / "test" / "blur" / "0001.png"
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 6 // 10])
    elif name == "unpaired":
        shutil.copy(root / "train" / "blur" / "0000.png", root / "train" / "blur" / "9999.png")
    elif name == "mismatch":
        path = root / "train" / "sharp" / "0001.png"
        Image.open(path).resize((60, 64)).save(path)
    elif name == "val_8px":
        for path in sorted((root / "test").glob("*/*.png")):
            Image.open(path).resize((8, 8)).save(path)
    elif name == "test_is_train":  # the test split holds copies of four training pairs
        shutil.rmtree(root / "test")
        for side in ("blur", "sharp"):
            (root / "test" / side).mkdir(parents=True)
            for path in sorted((root / "train" / side).glob("*.png"))[:4]:
                shutil.copy(path, root / "test" / side / path.name)
    elif name == "range_upper":  # x -> 128 + x / 2: the image normalised a second time
        for path in _images(root):
            Image.fromarray((128 + _rgb(path) // 2).astype(np.uint8)).save(path)
    elif name == "range_dark16":  # 8-bit values (0..255) stored as 16-bit samples
        for path in _images(root):
            _png16(path, _rgb(path).mean(2).astype(np.uint16))
    elif name != "base":
        raise ValueError(f"unknown variant {name}")


@pytest.fixture(scope="module")
def variant(tiny_data, tmp_path_factory):
    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name == "base":
            return tiny_data
        if name not in made:
            root = tmp_path_factory.mktemp(f"data_{name}")
            for split in ("train", "test"):
                shutil.copytree(
                    tiny_data / split, root / split, ignore=shutil.ignore_patterns("kernels")
                )
            _mutate(root, name)
            made[name] = root
        return made[name]

    return make


# --- checks -----------------------------------------------------------------------------------
def _runs(client: MlflowClient, run_name: str):
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], f"attributes.run_name = '{run_name}'")


def _bad_metrics(client: MlflowClient, run_id: str) -> list[str]:
    """Every logged point that is non-finite (MLflow clamps inf to ~1.8e308) or a 0.0 PSNR/SSIM."""
    bad = []
    for key in client.get_run(run_id).data.metrics:
        for m in client.get_metric_history(run_id, key):
            if not math.isfinite(m.value) or abs(m.value) > 1e300:
                bad.append(f"{key}@{m.step}={m.value}")
            elif QUALITY.search(key) and m.value == 0.0:
                bad.append(f"{key}@{m.step}=0.0 (sentinel)")
    return bad


def _checkpoints_ok(out_dir: Path) -> int:
    """Load every .pt under ``out_dir``; assert finite weights and no leftover temp file."""
    paths = sorted(out_dir.rglob("*.pt"))
    for path in paths:
        state = load_checkpoint(path)["model"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), path
    assert not list(out_dir.glob(".*.tmp"))
    return len(paths)


def _sum(history: list[dict], key: str) -> int:
    return int(sum(rec.get(key, 0) for rec in history))


@pytest.mark.parametrize("case", ROWS, ids=[c.name for c in ROWS])
def test_fault_matrix(case: Case, variant, mlflow_store, tmp_path, caplog, fault_matrix):
    root = variant(case.data)
    out_dir = tmp_path / re.sub(r"\W+", "_", case.name)
    settings = {
        "train_data": str(root / "train"),
        "test_data": str(root / "test"),
        "out_dir": str(out_dir),
        "tracking_uri": mlflow_store,
        "experiment": EXPERIMENT,
        "model_size": "tiny",
        "crop_size": 32,
        "batch_size": 2,
        "num_epochs": 1,
        "learning_rate": 1e-3,
        "device": "cpu",
        "num_workers": 0,
        "log_every": 1,
        "max_steps_per_epoch": 3,
        "log_model": False,  # the matrix is about metrics and checkpoints; saves ~1 s a row
        "inject_fault": case.fault,
        **case.overrides,
    }
    cfg = TrainConfig(**settings)
    client = MlflowClient(tracking_uri=mlflow_store)
    row = {"fault": case.name, "spec / data": case.fault or f"data:{case.data}"}
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="deblur_lib"):
        if case.expect in ("completed",) or case.expect in _STOPS:
            result = fit(cfg)
            error = None
        else:
            with pytest.raises((ValueError, DatasetError)) as info:
                fit(cfg)
            result, error = None, info.value
    row["seconds"] = f"{time.perf_counter() - start:.1f}"

    runs = [result.run_id] if result else [r.info.run_id for r in _runs(client, out_dir.name)]
    bad = [b for run_id in runs for b in _bad_metrics(client, run_id)]
    assert not bad, f"invalid metrics in the MLflow store: {bad}"
    n_ckpt = _checkpoints_ok(out_dir) if out_dir.exists() else 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    if error is not None:
        assert type(error).__name__ == case.expect, repr(error)
        first = str(error).splitlines()[0]
        for text in case.says:
            assert text in first, first
        if case.expect == "ValueError":  # caught by validate(): nothing created, no run
            assert not out_dir.exists() and not runs
        else:  # found while training: the run is closed as FAILED, nothing else written
            assert [client.get_run(r).info.status for r in runs] == ["FAILED"]
        row["outcome"] = f"{type(error).__name__}: {_short(first)}"
    else:
        assert result.stop_reason == case.expect, result.message
        assert result.message.count("\n") == 0
        if case.expect != "completed":
            for text in case.says:
                assert text in result.message, result.message
        elif case.says:
            assert any(all(t in w for t in case.says) for w in warnings), warnings
        tags = client.get_run(result.run_id).data.tags
        assert tags["stop_reason"] == case.expect
        assert all(tag in tags for tag in case.tags), tags
        if case.skipped is not None:
            assert result.skipped_steps == case.skipped
        if case.fallbacks is not None:
            assert _sum(result.history, "msssim_fallbacks") == case.fallbacks
        if case.rollbacks is not None:
            assert result.rollbacks == case.rollbacks
        val = {r: _sum(result.history, f"val_skipped_{r}") for r in REASONS}
        assert val == {r: case.val_skipped.get(r, 0) for r in REASONS}
        assert all(torch.isfinite(p).all() for p in result.model.parameters())
        outcome = result.stop_reason
        if not result.ok:
            outcome = f"stopped: {_short(result.message.replace('Training stopped ', ''))}"
        elif case.says:
            outcome += f"; warned: {case.says[0]}"
        row |= {
            "outcome": outcome,
            "skipped": result.skipped_steps,
            "rollbacks": result.rollbacks,
            "fallbacks": _sum(result.history, "msssim_fallbacks"),
            "val skipped": ",".join(f"{k}={v}" for k, v in val.items() if v) or "-",
        }
    row["MLflow"] = f"{len(runs)} run, 0 invalid" if runs else "no run"
    row["ckpts"] = f"{n_ckpt} ok"
    fault_matrix.append(row)


_STOPS = ("rollbacks_exhausted", "invalid_epochs", "nonfinite_weights", "no_valid_validation")


def _short(text: str, limit: int = 100) -> str:
    """``text`` without temp-folder prefixes (``.../train/x.png`` -> ``train/x.png``), cut."""
    text = re.sub(r"/\S*?/(?=(train|test)(/|\b))", "", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def test_every_injectable_kind_has_a_row():
    names = {c.fault.split("@")[0] for c in ROWS if c.fault}
    assert set(TRAIN_KINDS) | set(VAL_KINDS) <= names


@pytest.mark.parametrize(
    "low, high, expected",
    [(-1.0, 1.0, None), (0.0, 1.0, "upper half"), (-1.0, -0.99, "spans only"), (0, 255, "raise")],
)
def test_data_range_problem(low, high, expected):
    x = torch.linspace(low, high, 3 * 16 * 16).reshape(3, 16, 16)
    if expected == "raise":
        with pytest.raises(ValueError, match=r"model space is \[-1, 1\]"):
            data_range_problem(x, x)
    elif expected is None:
        assert data_range_problem(x, x) is None
    else:
        assert expected in data_range_problem(x, x)
