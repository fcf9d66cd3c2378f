"""Bad command lines: every flag's invalid values exit with code 2 and one line naming the flag.

Each case runs ``main(argv)`` in a temporary working directory and snapshots every file there
(and in the dataset) before and after: a usage error creates and overwrites nothing, MLflow
store included. One case runs the real ``python -m deblur_lib.train`` to check the exit code.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from deblur_lib.train.__main__ import _read_config, build_parser, main
from deblur_lib.train.config import TrainConfig

PROG = "python -m deblur_lib.train: error: "


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    files = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            stat = path.stat()
            files[str(path)] = (stat.st_size, stat.st_mtime_ns) if path.is_file() else (-1, 0)
    return files


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _argv(tiny_data: Path, workdir: Path, **overrides) -> list[str]:
    values = {
        "train_data": tiny_data / "train",
        "test_data": tiny_data / "test",
        "out_dir": workdir / "out",
        "tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}",
        "model_size": "tiny",
        "crop_size": 32,
        "batch_size": 2,
        "num_epochs": 1,
        "device": "cpu",
        **overrides,
    }
    argv = []
    for key, value in values.items():
        if value is not None:
            argv.append(f"--{key}={value}")  # "=": argparse reads "-1e-4" as an option
    return argv


def _empty(workdir: Path) -> Path:
    (workdir / "empty").mkdir()
    return workdir / "empty"


def _blur_only(workdir: Path) -> Path:
    for side in ("blur", "sharp"):
        (workdir / "nopairs" / side).mkdir(parents=True)
    return workdir / "nopairs"


def _tiny_images(workdir: Path) -> Path:
    for side in ("blur", "sharp"):
        (workdir / "small" / side).mkdir(parents=True)
        Image.new("RGB", (8, 8), (100, 50, 25)).save(workdir / "small" / side / "a.png")
    return workdir / "small"


def _a_file(workdir: Path) -> Path:
    (workdir / "file").write_text("not a folder")
    return workdir / "file"


def _not_utf8(workdir: Path) -> str:
    """A folder whose name is not UTF-8 (Latin-1 'café'); before, it passed validation and
    crashed inside MLflow when the params were logged, leaving the run RUNNING."""
    folder = os.fsdecode(os.fsencode(workdir) + b"/caf\xe9")
    os.mkdir(folder)
    return folder


def _not_a_checkpoint(workdir: Path) -> Path:
    (workdir / "junk.pt").write_bytes(b"junk" * 100)
    return workdir / "junk.pt"


def _unwritable(workdir: Path) -> Path:
    if os.geteuid() == 0:  # root writes anywhere that is not a read-only place like procfs
        return Path("/proc/self/deblur_out")
    locked = workdir / "locked"
    locked.mkdir(mode=0o555)
    return locked / "out"


# flag -> bad value (or a callable making one in the workdir) -> text the error line must hold
CASES = [
    ("batch_size", "0", "--batch_size must be an integer >= 1"),
    ("batch_size", "-4", "--batch_size must be an integer >= 1"),
    ("batch_size", "two", "argument --batch_size: invalid int value"),
    ("num_epochs", "0", "--num_epochs must be an integer >= 1"),
    ("learning_rate", "0", "--learning_rate must be > 0"),
    ("learning_rate", "-1e-4", "--learning_rate must be > 0"),
    ("learning_rate", "nan", "--learning_rate must be > 0"),
    ("patience", "-1", "--patience must be an integer >= 0"),
    ("crop_size", "0", "--crop_size must be an integer >= 8"),
    ("crop_size", "128", "--crop_size 128 is larger than the smallest training image (64 px)"),
    ("model_size", "huge", "argument --model_size: invalid choice"),
    ("model_width", "0", "--model_width must be an integer >= 4"),
    ("device", "tpu", "argument --device: invalid choice"),
    ("amp", "fp16", "argument --amp: invalid choice"),
    ("channels_last", "maybe", "argument --channels_last: invalid choice: 'maybe'"),
    ("compile", "maybe", "argument --compile: invalid choice: 'maybe'"),
    ("seed", "-1", "--seed must be an integer >= 0"),
    ("num_workers", "-1", "--num_workers must be an integer >= 0"),
    ("alpha", "-0.5", "--alpha must be a finite number >= 0"),
    ("beta", "inf", "--beta must be a finite number >= 0"),
    ("grad_clip", "-1", "--grad_clip must be a finite number >= 0"),
    ("max_bad_steps", "-1", "--max_bad_steps must be an integer >= 0"),
    ("max_rollbacks", "-1", "--max_rollbacks must be an integer >= 0"),
    ("max_invalid_epochs", "0", "--max_invalid_epochs must be an integer >= 1"),
    ("val_every", "0", "--val_every must be an integer >= 1"),
    ("log_every", "0", "--log_every must be an integer >= 1"),
    ("max_steps_per_epoch", "0", "--max_steps_per_epoch must be an integer >= 1"),
    ("tracking_retry_s", "-1", "--tracking_retry_s must be a finite number >= 0"),
    ("guards", "maybe", "argument --guards: invalid choice"),
    ("scheduler", "step", "argument --scheduler: invalid choice"),
    ("experiment", "", "--experiment must not be empty"),
    ("inject_fault", "nan_input@steps=3", "--inject_fault: bad fault spec"),
    ("inject_fault", "bogus@step=1", "unknown kind 'bogus'"),
    ("inject_fault", "nan_input@step=-1", "step must be >= 0"),
    ("train_data", lambda w: w / "missing", "--train_data"),
    ("test_data", lambda w: w / "missing", "no such folder"),
    ("train_data", _empty, "no blur/ and sharp/ folders"),
    ("test_data", _blur_only, "empty folder (no PNG/JPEG images)"),
    ("test_data", _tiny_images, "SSIM needs validation images of at least 11 px"),
    ("out_dir", _a_file, "is a file; pass a folder"),
    ("out_dir", lambda w: _a_file(w) / "out", "is a file, not a folder"),
    ("out_dir", _unwritable, "is not writable"),
    ("out_dir", "/sys/deblur_out", "/sys is not writable"),  # os.access says yes to root
    ("out_dir", "", "--out_dir must not be empty"),
    ("tracking_uri", "bogus://x", "MLflow has no tracking store for the scheme 'bogus'"),
    ("tracking_uri", lambda w: f"sqlite:///{_unwritable(w)}/m.db", "is not writable"),
    ("seed", "99999999999999999999", "--seed must be an integer <= 4294967295"),
    ("num_workers", "100000", "--num_workers 100000 is more than the"),
    ("train_data", _not_utf8, "is not valid UTF-8"),
    ("resume", lambda w: w / "nope.pt", "--resume"),
    ("resume", _not_a_checkpoint, "not a readable checkpoint"),
    ("registered_model_name", "net", "--registered_model_name needs --log_model true"),
]


@pytest.mark.parametrize(
    "flag, value, message", CASES, ids=[f"{c[0]}={getattr(c[1], '__name__', c[1])}" for c in CASES]
)
def test_bad_flag_exits_2_with_one_line_and_creates_nothing(
    flag, value, message, tiny_data, workdir, capsys
):
    value = value(workdir) if callable(value) else value
    extra = {"log_model": "false"} if flag == "registered_model_name" else {}
    argv = _argv(tiny_data, workdir, **{flag: value, **extra})
    before = _snapshot(workdir, tiny_data)
    assert main(argv) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # after argparse's usage line
    assert line.startswith(PROG) and message in line, err
    assert f"--{flag}" in line, line
    assert _snapshot(workdir, tiny_data) == before  # nothing created, nothing overwritten


def test_batch_size_must_split_over_ddp_processes(tiny_data, workdir, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    before = _snapshot(workdir)
    assert main(_argv(tiny_data, workdir, batch_size=3)) == 2
    assert "--batch_size 3 is the global batch" in capsys.readouterr().err
    assert _snapshot(workdir) == before


def test_resume_with_another_architecture(tiny_data, workdir, capsys):
    from deblur_lib.train import fit

    cfg = TrainConfig(**{**_config(tiny_data, workdir), "max_steps_per_epoch": 1})
    fit(cfg)
    before = _snapshot(workdir)
    argv = _argv(tiny_data, workdir, resume="auto", model_size="small", **ONE_STEP)
    assert main(argv) == 2
    assert "trained with --model_size tiny, not small" in capsys.readouterr().err
    assert _snapshot(workdir) == before  # last.pt, metrics.jsonl and the store untouched


def test_resume_with_another_or_an_older_scheduler(tiny_data, workdir, capsys):
    """A scheduler's state only fits its own kind; a per-epoch CosineAnnealingLR state (before
    the per-step cosine) cannot continue either. Both exit 2 before anything is written."""
    import torch

    from deblur_lib.train import fit
    from deblur_lib.weights import load_checkpoint, save_checkpoint

    cfg = TrainConfig(**{**_config(tiny_data, workdir), "max_steps_per_epoch": 1})
    fit(cfg)  # --scheduler plateau, the default
    before = _snapshot(workdir)
    assert main(_argv(tiny_data, workdir, resume="auto", scheduler="cosine", **ONE_STEP)) == 2
    assert "trained with --scheduler plateau, not cosine" in capsys.readouterr().err
    assert _snapshot(workdir) == before

    last = Path(cfg.out_dir, "last.pt")
    state = load_checkpoint(last)
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    state["scheduler"] = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3).state_dict()
    state["config"]["scheduler"] = "cosine"
    save_checkpoint(last, state)
    before = _snapshot(workdir)
    assert main(_argv(tiny_data, workdir, resume="auto", scheduler="cosine", **ONE_STEP)) == 2
    assert "cosine schedule stepped per epoch" in capsys.readouterr().err
    assert _snapshot(workdir) == before


@pytest.mark.parametrize("workers", [0, 1])
def test_undecodable_file_found_while_training_exits_2_naming_it(
    tiny_data, workdir, capsys, workers
):
    """One short line, also from a DataLoader worker (before: torch's re-raise made it the
    worker's 2,500-character flattened traceback); the MLflow run FAILED, the file named."""
    from mlflow.tracking import MlflowClient

    data = workdir / "data"
    shutil.copytree(tiny_data / "train", data / "train")
    bad = data / "train" / "sharp" / "0005.png"
    bad.write_bytes(bad.read_bytes()[:400])  # the header is fine, the pixels are cut
    argv = _argv(
        tiny_data, workdir, train_data=data / "train", log_model="false", num_workers=workers
    )
    assert main(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(PROG) and "truncated image" in line and str(bad) in line
    assert "Traceback" not in line and len(line) < 300 + len(str(bad)), line
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("deblur-guard").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["stop_reason"] == "data_error"
    assert str(bad) in run.data.tags["stop_message"]


def _png_header(path: Path, w: int, h: int) -> None:
    """A PNG that claims w x h px (what a header check reads) with next to no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunks = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


def test_huge_validation_image_is_refused_before_training(tiny_data, workdir, capsys, monkeypatch):
    """Before: an 8000x8000 test pair passed the checks, and the first validation, after a whole
    epoch, died of an allocation error. Now: exit 2 naming the file and the limit (half of the
    device's memory, here pinned to 4 GiB so that the test does not depend on the machine)."""
    from deblur_lib.train import config

    monkeypatch.setattr(config, "device_memory_mb", lambda device: (4096.0, "RAM"))
    test = workdir / "test"
    shutil.copytree(tiny_data / "test", test)
    for side in ("blur", "sharp"):
        _png_header(test / side / "huge.png", 8000, 8000)
    before = _snapshot(workdir)
    assert main(_argv(tiny_data, workdir, test_data=test)) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{test / 'sharp' / 'huge.png'} is 8000x8000 px" in line
    assert "over the limit of 2.0 GiB (50% of the 4.0 GiB of RAM)" in line
    assert _snapshot(workdir) == before


def test_test_data_equal_to_training_data_is_refused(tiny_data, workdir, capsys):
    """Before: accepted without a word (28 dB of memorisation reported as validation). The same
    folder, and a copy of the training files, are refused unless --allow_test_in_train."""
    copy = workdir / "copy"
    shutil.copytree(tiny_data / "train", copy, ignore=shutil.ignore_patterns("kernels"))
    before = _snapshot(workdir)
    for test in (tiny_data / "train", copy):
        assert main(_argv(tiny_data, workdir, test_data=test)) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"--test_data {test}: 8 of 8 test pairs are training pairs" in line
        assert "--allow_test_in_train true" in line
    assert _snapshot(workdir) == before


def test_the_real_command_exits_2(tiny_data, workdir):
    argv = [sys.executable, "-m", "deblur_lib.train", *_argv(tiny_data, workdir, batch_size=0)]
    before = _snapshot(workdir)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        PROG + "--batch_size must be an integer >= 1 (got 0)"
    )
    assert _snapshot(workdir) == before


ONE_STEP = {"max_steps_per_epoch": 1}  # as the run being resumed (RESUME_POLICY: same)


def _config(tiny_data: Path, workdir: Path) -> dict:
    return {
        "train_data": str(tiny_data / "train"),
        "test_data": str(tiny_data / "test"),
        "out_dir": str(workdir / "out"),
        "tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}",
        "model_size": "tiny",
        "crop_size": 32,
        "batch_size": 2,
        "num_epochs": 1,
        "device": "cpu",
        "log_model": False,
    }


# --- --config FILE --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pretrain", "finetune", "gpu"])
def test_shipped_params_files_read_as_configs(name, capsys):
    path = Path(__file__).resolve().parents[2] / "params" / f"{name}.yaml"
    values = _read_config(build_parser(), path)  # a wrong field or type exits 2
    assert values["model_size"] in ("small", "base") and capsys.readouterr().err == ""
    if name != "gpu":  # the CPU recipe is fp32, as the shipped weights were trained
        assert values["amp"] == "off"


@pytest.mark.parametrize("name", ["compile", "channels_last"])
@pytest.mark.parametrize(
    ("flags", "yaml_text", "expected"),
    [
        ([], "", "auto"),
        (["--NAME"], "", "true"),
        (["--NAME", "OFF"], "", "false"),
        (["--NAME", "auto"], "NAME: false\n", "auto"),  # the flag overrides the file
        ([], "NAME: true\n", "true"),  # an unquoted YAML bool
        ([], "NAME: no\n", "false"),
    ],
)
def test_switches_read_auto_and_every_boolean_spelling(workdir, name, flags, yaml_text, expected):
    parser = build_parser()
    if yaml_text:
        (workdir / "c.yaml").write_text(yaml_text.replace("NAME", name))
        parser.set_defaults(**_read_config(parser, workdir / "c.yaml"))
    args = parser.parse_args([f.replace("NAME", name) for f in flags])
    assert getattr(args, name) == expected


def test_switches_given_as_bools_in_code_or_an_old_checkpoint_read_as_the_word():
    assert TrainConfig(compile=True).compile == "true"
    assert TrainConfig(compile=False, channels_last=False).compile == "false"
    assert TrainConfig(channels_last=True).channels_last == "true"
    assert TrainConfig(channels_last=False).channels_last == "false"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("amp: off\n", "amp: False is not a str (YAML reads on/off/yes/no unquoted as booleans"),
        ("no_such_field: 1\n", "unknown field 'no_such_field'"),
        ("batch_size: eight\n", "batch_size: 'eight' is not a int"),
        ("- a list\n", "expected a mapping of TrainConfig fields"),
    ],
)
def test_bad_config_files_are_usage_errors(workdir, text, message, capsys):
    (workdir / "bad.yaml").write_text(text)
    before = _snapshot(workdir)
    assert main(["--config", "bad.yaml"]) == 2
    err = capsys.readouterr().err
    assert f"{PROG}--config bad.yaml: " in err and message in err, err
    assert _snapshot(workdir) == before
