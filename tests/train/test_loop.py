"""fit() and the CLI on CPU with the tiny model and synthetic 64 px data.

Each case asserts what the MLflow store holds (a tmp sqlite shared by the module), what is on
disk, and the stop reason: a normal finish, the seed's failure reproduced with guards off, the
same fault absorbed with guards on, rollback then stop, invalid validations, resume, usage errors.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from deblur_lib.data import synthesize
from deblur_lib.models import build_model
from deblur_lib.train import STOP_REASONS, fit
from deblur_lib.train.__main__ import main
from deblur_lib.train.build import (
    COMPILE_MIN_STEPS,
    build_loaders,
    configure_backends,
    use_bf16,
    use_channels_last,
    use_compile,
)
from deblur_lib.train.config import TrainConfig
from deblur_lib.train.distributed import DistContext
from deblur_lib.train.loop import Trainer
from deblur_lib.weights import load_checkpoint

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def data(tiny_data) -> Path:
    return tiny_data  # the session's 64 px dataset (tests/conftest.py)


@pytest.fixture(scope="module")
def data176(tmp_path_factory) -> Path:
    """The stock pytorch_msssim of the guards-off loop asserts on images of 160 px or less."""
    root = tmp_path_factory.mktemp("data176")
    synthesize(root, n_train=4, n_test=2, size=176, seed=0, progress=False)
    return root


@pytest.fixture(scope="module")
def tracking_uri(mlflow_store) -> str:
    return mlflow_store  # one sqlite store per session: creating its tables takes seconds


@pytest.fixture
def cfg(data, tracking_uri, tmp_path) -> TrainConfig:
    return TrainConfig(
        train_data=str(data / "train"),
        test_data=str(data / "test"),
        out_dir=str(tmp_path / "out"),
        tracking_uri=tracking_uri,
        experiment="test-train",
        model_size="tiny",
        crop_size=48,
        batch_size=4,
        num_epochs=1,
        learning_rate=1e-3,
        device="cpu",
        num_workers=0,
        log_every=1,
    )


def _metrics(cfg: TrainConfig, run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    keys = client.get_run(run_id).data.metrics
    return {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in keys}


def _tags(cfg: TrainConfig, run_id: str) -> dict[str, str]:
    return MlflowClient(tracking_uri=cfg.tracking_uri).get_run(run_id).data.tags


def _all_finite(history: dict[str, list[tuple[int, float]]]) -> bool:
    return all(math.isfinite(v) for values in history.values() for _, v in values)


def _weights_finite(path: Path) -> bool:
    state = load_checkpoint(path)["model"]
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_normal_finish_logs_checkpoints_and_registers(cfg):
    cfg = replace(cfg, num_epochs=2, registered_model_name="deblur-test")
    result = fit(cfg)
    assert result.ok and result.stop_reason == "completed"
    assert result.epochs_completed == 2 and result.global_step == 4 and result.skipped_steps == 0
    assert result.best_checkpoint.is_file() and result.last_checkpoint.is_file()
    assert math.isfinite(result.best_psnr) and result.best_epoch in (0, 1)
    history = _metrics(cfg, result.run_id)
    for key in (
        "train_loss",
        "val_loss",
        "val_psnr",
        "val_ssim",
        "lr",
        "grad_norm",
        "skipped_steps",
        "msssim_fallbacks",
        "val_valid_batches",
        "val_total_batches",
    ):
        assert [s for s, _ in history[key]] == [0, 1], key
    assert _all_finite(history)
    assert _tags(cfg, result.run_id)["stop_reason"] == "completed"
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    assert client.search_model_versions("name='deblur-test'")
    figures = {a.path for a in client.list_artifacts(result.run_id, "figures")}
    assert figures == {"figures/curves.png", "figures/triplets.png"}  # curves + triplets PNGs
    for name in ("curves.png", "triplets.png"):
        png = Path(client.download_artifacts(result.run_id, f"figures/{name}", cfg.out_dir))
        assert png.read_bytes()[:4] == b"\x89PNG"
    ck = load_checkpoint(result.last_checkpoint)
    assert (
        ck["epoch"] == 1 and ck["run_id"] == result.run_id and ck["config"]["model_size"] == "tiny"
    )
    assert (Path(cfg.out_dir) / "metrics.jsonl").is_file()


@pytest.mark.slow  # 176 px images: the stock MS-SSIM of the original loop needs > 160 px
def test_guards_off_reproduces_the_nan_failure(cfg, data176):
    """The seed's loop: one NaN batch -> NaN weights, NaN metrics logged, scheduler fed NaN."""
    cfg = replace(
        cfg,
        guards="off",
        inject_fault="nan_input@step=0",
        num_epochs=2,
        train_data=str(data176 / "train"),
        test_data=str(data176 / "test"),
        crop_size=168,
        patience=0,
    )
    result = fit(cfg)
    assert result.stop_reason == "completed"  # the original never noticed
    assert not all(torch.isfinite(p).all() for p in result.model.parameters())
    history = _metrics(cfg, result.run_id)
    assert any(math.isnan(v) for _, v in history["val_psnr"])
    assert any(math.isnan(v) for _, v in history["train_loss"])
    assert result.best_checkpoint is None  # NaN is never "best"
    assert _weights_finite(result.last_checkpoint)  # but no NaN checkpoint is ever written
    lrs = [v for _, v in history["lr"]]
    assert lrs[-1] < lrs[0]  # ReduceLROnPlateau counted the NaN epoch as bad and cut the LR


def test_guards_on_skip_the_same_fault(cfg):
    cfg = replace(cfg, inject_fault="nan_input@step=1", num_epochs=2)
    result = fit(cfg)
    assert result.ok and result.skipped_steps == 1 and result.rollbacks == 0
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    history = _metrics(cfg, result.run_id)
    assert _all_finite(history)
    assert [v for _, v in history["skipped_steps"]] == [1, 1]
    assert _weights_finite(result.last_checkpoint) and _weights_finite(result.best_checkpoint)


def test_progress_bar_says_skipped_while_no_step_was_taken(cfg, monkeypatch):
    """Two steps, both skipped: the bar shows ``loss=skipped``, never a loss of 0."""
    from deblur_lib.train import loop

    postfixes = []

    class Bar(loop.tqdm):
        def set_postfix(self, **kwargs):
            postfixes.append(kwargs)
            super().set_postfix(**kwargs)

    monkeypatch.setattr(loop, "tqdm", Bar)
    fault = "nan_loss@step=0,count=2"
    cfg = replace(cfg, inject_fault=fault, max_steps_per_epoch=2, log_model=False)
    fit(cfg)
    assert [p["loss"] for p in postfixes] == ["skipped", "skipped"]
    assert [p["skipped"] for p in postfixes] == [1, 2]


def test_consecutive_faults_roll_back_then_stop_naming_the_module(cfg, caplog):
    cfg = replace(
        cfg,
        inject_fault="nan_input@step=0,count=100",
        max_bad_steps=1,
        max_rollbacks=1,
        num_epochs=3,
    )
    with caplog.at_level(logging.INFO, logger="deblur_lib.train"):
        result = fit(cfg)
    assert result.stop_reason == "rollbacks_exhausted" and not result.ok
    assert result.rollbacks == 1 and "rollback 1/1" in caplog.text
    modules = {name for name, _ in build_model("tiny").named_modules() if name}
    assert any(f"`{name}`" in result.message for name in modules), result.message
    assert "non-finite" in result.message and result.message.splitlines()[-1] in caplog.text
    assert _tags(cfg, result.run_id)["stop_reason"] == "rollbacks_exhausted"
    assert _all_finite(_metrics(cfg, result.run_id))


def test_invalid_validations_skip_the_scheduler_and_stop(cfg):
    spec = "val_metric_error@epoch=0,batches=all;val_metric_error@epoch=1,batches=all"
    cfg = replace(cfg, inject_fault=spec, max_invalid_epochs=2, num_epochs=4)
    result = fit(cfg)
    assert result.stop_reason == "invalid_epochs" and result.epochs_completed == 2
    assert result.best_checkpoint is None and not Path(cfg.out_dir, "best.pt").exists()
    assert "Evaluated 0/1 batches successfully (skipped: metric_error=1)" in result.message
    scheduler = load_checkpoint(result.last_checkpoint)["scheduler"]
    assert scheduler["num_bad_epochs"] == 0 and scheduler["last_epoch"] == 0  # never stepped
    history = _metrics(cfg, result.run_id)
    assert "val_psnr" not in history and "val_loss" not in history
    assert [v for _, v in history["val_valid_batches"]] == [0, 0]
    assert _all_finite(history)


def test_partial_validation_is_logged_apart_and_never_drives_lr_or_best(cfg, caplog):
    """Epoch 0: one of two validation batches has a NaN output, so its PSNR averages half the
    images (before: logged as val_psnr, fed to the scheduler, best.pt from it). Epoch 1: full."""
    cfg = replace(cfg, batch_size=2, num_epochs=2, max_steps_per_epoch=1, log_model=False)
    with caplog.at_level(logging.WARNING, logger="deblur_lib.train"):
        result = fit(replace(cfg, inject_fault="val_nan_output@epoch=0"))
    assert result.ok and result.best_epoch == 1
    history = _metrics(cfg, result.run_id)
    assert [s for s, _ in history["val_psnr"]] == [1]
    assert [s for s, _ in history["val_psnr_partial"]] == [0]
    assert [s for s, _ in history["val_ssim_partial"]] == [0]
    assert [s for s, _ in history["val_loss_partial"]] == [0]
    assert [v for _, v in history["val_valid_images"]] == [2, 4]
    assert [v for _, v in history["val_total_images"]] == [4, 4]
    assert "partial (2/4 images valid; logged as val_*_partial, counted as invalid)" in caplog.text
    assert "(--max_invalid_epochs 3)" in caplog.text
    scheduler = load_checkpoint(result.last_checkpoint)["scheduler"]
    assert scheduler["last_epoch"] == 1  # stepped once: epoch 1's full validation
    assert load_checkpoint(result.best_checkpoint)["epoch"] == 1


def test_a_run_without_a_valid_validation_exits_3_and_registers_nothing(cfg, caplog):
    argv = _argv(
        cfg,
        inject_fault="val_nan_output@epoch=0,batches=all",
        max_invalid_epochs=2,
        max_steps_per_epoch=1,
        registered_model_name="never-registered",
    )
    with caplog.at_level(logging.INFO, logger="deblur_lib.train"):
        assert main(argv) == 3
    assert "Training stopped (no_valid_validation)" in caplog.text
    assert "no model was logged or registered as 'never-registered'" in caplog.text
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    assert client.search_model_versions("name='never-registered'") == []


def test_resume_auto_continues_the_same_run(cfg):
    first = fit(cfg)  # epoch 0
    second = fit(replace(cfg, num_epochs=2, resume="auto"))
    assert second.run_id == first.run_id and second.epochs_completed == 2
    assert [h["epoch"] for h in second.history] == [0, 1]
    history = _metrics(cfg, second.run_id)
    assert [s for s, _ in history["train_loss"]] == [0, 1]  # no duplicated epoch steps
    assert second.global_step == 2 * first.global_step
    argv = _argv(cfg, resume="auto", model_size="small", num_epochs=3)
    assert main(argv) == 2  # another architecture cannot load this checkpoint


def test_a_fresh_run_in_a_used_out_dir_moves_the_earlier_run_aside(cfg):
    """Without --resume, the earlier run's checkpoints and metrics.jsonl are kept, not
    overwritten or appended to."""
    cfg = replace(cfg, log_model=False)
    first = fit(cfg)
    second = fit(cfg)
    assert second.run_id != first.run_id
    (old,) = Path(cfg.out_dir, "previous").iterdir()
    assert load_checkpoint(old / "last.pt")["run_id"] == first.run_id
    assert (old / "best.pt").is_file() and (old / "figures").is_dir()
    for jsonl in (old / "metrics.jsonl", Path(cfg.out_dir, "metrics.jsonl")):
        assert [json.loads(line)["step"] for line in jsonl.read_text().splitlines()] == [0]
    assert load_checkpoint(second.last_checkpoint)["run_id"] == second.run_id


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing in the loop handles it."""


def test_resume_logs_an_epoch_checkpointed_but_not_logged(cfg, monkeypatch):
    """A crash between writing epoch 1's checkpoint and logging it: the resumed run logs
    epoch 1 from the checkpoint's history, so MLflow and metrics.jsonl miss nothing."""
    from deblur_lib.train.tracking import Tracker

    real = Tracker.log_metrics

    def killed_at_step_1(self, metrics, step, **kwargs):
        if step == 1:
            raise Killed
        return real(self, metrics, step, **kwargs)

    monkeypatch.setattr(Tracker, "log_metrics", killed_at_step_1)
    with pytest.raises(Killed):
        fit(replace(cfg, num_epochs=3))
    monkeypatch.undo()
    assert load_checkpoint(Path(cfg.out_dir, "last.pt"))["epoch"] == 1
    result = fit(replace(cfg, num_epochs=3, resume="auto"))
    assert [s for s, _ in _metrics(cfg, result.run_id)["train_loss"]] == [0, 1, 2]
    lines = Path(cfg.out_dir, "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch_size", "0"], "--batch_size must be an integer >= 1"),
        (["--learning_rate", "0"], "--learning_rate must be > 0"),
        (["--device", "tpu"], "invalid choice"),
        (["--crop_size", "128"], "larger than the smallest training image (64 px)"),
        (["--train_data", "MISSING"], "no such folder"),
        (["--inject_fault", "nan_input@steps=3"], "--inject_fault"),
        (["--num_epochs", "two"], "invalid int value"),
    ],
)
def test_cli_usage_errors_exit_2_and_create_nothing(cfg, tmp_path, capsys, flags, message):
    argv = _argv(cfg) + flags
    if "MISSING" in flags:
        argv[argv.index("MISSING")] = str(tmp_path / "missing")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "usage:" in err
    assert not Path(cfg.out_dir).exists()


def test_cli_unwritable_out_dir_exits_2(cfg, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(_argv(cfg, out_dir=str(blocker / "out"))) == 2
    assert "--out_dir" in capsys.readouterr().err


def test_cli_exit_codes_0_and_3(cfg):
    assert main(_argv(cfg, max_steps_per_epoch=1)) == 0
    argv = _argv(
        cfg,
        out_dir=cfg.out_dir + "2",
        inject_fault="val_nan_output@epoch=0,batches=all",
        max_invalid_epochs=1,
    )
    assert main(argv) == 3


def _argv(cfg: TrainConfig, **overrides) -> list[str]:
    values = {**cfg.to_dict(), **overrides}
    argv = []
    for key, value in values.items():
        if value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def test_stop_reasons_are_documented():
    assert set(STOP_REASONS) == {
        "completed",
        "rollbacks_exhausted",
        "invalid_epochs",
        "nonfinite_weights",
        "no_valid_validation",
    }
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert all(f"`{reason}`" in readme for reason in STOP_REASONS if reason != "completed")


@pytest.mark.parametrize("scheduler", ["plateau", "cosine"])
def test_training_steps_never_sync_with_the_device(cfg, monkeypatch, scheduler):
    """No .item()/bool()/.tolist() in a step, a NaN step included: the skip is decided on the
    device (fused AdamW's found_inf) and the counters are read only at the log interval."""
    from deblur_lib.train.distributed import DistContext
    from deblur_lib.train.loop import Trainer

    warmup = 2 if scheduler == "cosine" else 0
    cfg = replace(cfg, inject_fault="nan_input@step=1", scheduler=scheduler, warmup_steps=warmup)
    trainer = Trainer(cfg, DistContext(), torch.device("cpu"))
    batches = []  # what the loop iterates: the loader, with the fault of each step applied
    for batch in trainer.train_batches:
        batches.append(batch)
        trainer.progress.step += 1
        if len(batches) == 3:
            break
    trainer.progress.step = 0
    acc = torch.zeros(3, dtype=torch.float64)
    for attr in ("item", "__bool__", "tolist"):

        def refuse(self, *args, _attr=attr, **kwargs):
            raise AssertionError(f"Tensor.{_attr} called in a training step (a host sync)")

        monkeypatch.setattr(torch.Tensor, attr, refuse)
    for blur, sharp in batches:
        trainer._train_step(blur, sharp, acc)
        trainer.progress.step += 1
    monkeypatch.undo()
    assert trainer.guard.read()["skipped_total"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def _cosine_lrs(cfg: TrainConfig, steps_per_epoch: int, halvings: int = 0) -> list[float]:
    """The lr each epoch should end with: the warm-up/cosine factor after its last step."""
    from deblur_lib.train.build import cosine_warmup_factor

    total = cfg.num_epochs * steps_per_epoch
    return [
        cfg.learning_rate
        * 0.5**halvings
        * cosine_warmup_factor((e + 1) * steps_per_epoch, cfg.warmup_steps, total)
        for e in range(cfg.num_epochs)
    ]


def test_cosine_warmup_is_stepped_per_step_and_resumes_on_schedule(cfg):
    """8 training pairs / batch 4 = 2 steps per epoch: warm-up over 3 steps, then a cosine that
    reaches 0 after the last step; a run resumed after epoch 0 ends each epoch on the same lr."""
    cfg = replace(cfg, scheduler="cosine", warmup_steps=3, num_epochs=4, log_model=False)
    whole = fit(cfg)
    expected = _cosine_lrs(cfg, steps_per_epoch=2)
    assert expected[0] == pytest.approx(1e-3) and expected[-1] == pytest.approx(0.0)
    assert [h["lr"] for h in whole.history] == pytest.approx(expected)
    assert [v for _, v in _metrics(cfg, whole.run_id)["lr"]] == pytest.approx(expected)
    split = replace(cfg, out_dir=cfg.out_dir + "-split")
    fit(replace(split, num_epochs=1))  # the schedule still spans num_epochs=1 here ...
    resumed = fit(replace(split, resume="auto"))  # ... and 4 epochs after the resume
    assert resumed.epochs_completed == 4 and resumed.global_step == 8
    assert [h["lr"] for h in resumed.history][1:] == pytest.approx(expected[1:])


def test_cosine_rollback_halves_the_schedule(cfg, caplog):
    """A rollback halves the lr for the rest of the run, not only until the next step."""
    cfg = replace(
        cfg,
        scheduler="cosine",
        warmup_steps=1,
        num_epochs=4,
        inject_fault="nan_input@step=2,count=2",
        max_bad_steps=1,
        log_model=False,
    )
    with caplog.at_level(logging.WARNING, logger="deblur_lib.train"):
        result = fit(cfg)
    assert result.ok and result.rollbacks == 1 and "rollback 1/3" in caplog.text
    expected = _cosine_lrs(cfg, steps_per_epoch=2)
    lrs = [h["lr"] for h in result.history]
    assert lrs[0] == pytest.approx(expected[0])  # before the rollback (epoch 1)
    assert lrs[1:3] == pytest.approx([lr * 0.5 for lr in expected[1:3]])


def test_cli_warmup_needs_the_cosine_scheduler(cfg, capsys):
    assert main(_argv(cfg, warmup_steps=5)) == 2
    assert "--warmup_steps 5 applies to --scheduler cosine only" in capsys.readouterr().err
    assert not Path(cfg.out_dir).exists()


def test_compile_trains_the_same_weights_it_checkpoints(cfg):
    """--compile wraps only the training forward: checkpoints hold the plain model's keys
    and its trained weights."""
    cfg = replace(cfg, compile=True, max_steps_per_epoch=2, log_model=False)
    result = fit(cfg)
    assert result.ok and result.global_step == 2
    saved = load_checkpoint(result.last_checkpoint)["model"]
    assert set(saved) == set(build_model("tiny").state_dict())
    assert all(torch.equal(saved[k], v) for k, v in result.model.state_dict().items())
    assert saved["ending.weight"].abs().sum() > 0  # zero at init: the steps changed it


@pytest.mark.slow
def test_guards_hold_under_compile_skip_rollback_and_resume(cfg):
    """Under --compile (with --ema): a NaN step is skipped without a host sync in the
    compiled forward's place, persistent NaN steps roll back to last.pt with the lr halved,
    and --resume auto continues the run to the end with finite weights."""
    cfg = replace(
        cfg, compile=True, ema=0.9, num_epochs=3, max_steps_per_epoch=2, log_model=False,
        max_bad_steps=1, max_rollbacks=2, inject_fault="nan_loss@step=1;nan_output@step=2,count=2",
    )  # fmt: skip
    first = replace(cfg, num_epochs=2)
    result = fit(first)
    assert result.ok and result.skipped_steps == 3 and result.rollbacks == 1
    lrs = [h["lr"] for h in result.history]
    assert lrs[1] == pytest.approx(lrs[0] / 2)  # the rollback halved it
    resumed = fit(replace(cfg, resume="auto"))
    assert resumed.ok and resumed.epochs_completed == 3 and resumed.global_step == 6
    state = load_checkpoint(resumed.last_checkpoint)
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    # the rollback restored the average with the weights (epoch 0: 2 updates), then 3 more
    # steps before the resume and 2 after it (3 epochs of 2 steps, the rolled-back one lost)
    assert state["ema"]["updates"] == 5


# --- what fit trains with -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cpu", "expected"), [("avx2", False), ("avx512", False), ("avx512_bf16", True), ("amx", True)]
)
def test_amp_auto_is_bf16_only_on_a_cpu_with_bf16_instructions(cpu_is, cpu, expected):
    cpu_is(cpu)
    assert use_bf16("auto", torch.device("cpu")) is expected
    assert use_bf16("bf16", torch.device("cpu")) and not use_bf16("off", torch.device("cpu"))


LONG = COMPILE_MIN_STEPS


@pytest.mark.parametrize(
    ("setting", "device", "cpu", "bf16", "layout", "steps", "expected"),
    [
        ("true", "cpu", "avx2", False, "auto", 1, True),  # as given
        ("false", "cpu", "avx512_bf16", True, "auto", 10**6, False),
        ("auto", "cpu", "avx512_bf16", True, "auto", LONG, True),  # bf16 + CL: 1.23-1.26x
        ("auto", "cpu", "avx512_bf16", True, "true", LONG, True),
        ("auto", "cpu", "avx512_bf16", True, "false", LONG, False),  # bf16 NCHW: not measured
        ("auto", "cpu", "avx512_bf16", True, "auto", LONG - 1, False),  # too short to earn it
        ("auto", "cpu", "amx", True, "auto", LONG, True),
        ("auto", "cpu", "avx512", True, "auto", LONG, False),  # forced bf16 without the ISA
        ("auto", "cpu", "avx512", False, "auto", LONG, False),  # fp32: the step 1.11x, not the loop
        ("auto", "cpu", "avx512_bf16", False, "auto", 10**6, False),  # --amp off there: the same
        ("auto", "cpu", "avx512", False, "false", 10**6, False),
        ("true", "cpu", "avx512", False, "true", 1, True),  # as given
        ("auto", "cpu", "avx2", False, "auto", 10**6, False),  # AVX2: 0.87-0.94x compiled
        ("auto", "cuda", "avx512_bf16", True, "auto", 10**6, False),  # not measured on a GPU
    ],
)
def test_compile_auto_only_where_measured_faster_and_long_enough(
    cpu_is, setting, device, cpu, bf16, layout, steps, expected
):
    cpu_is(cpu)
    assert use_compile(setting, torch.device(device), bf16, layout, steps) is expected


@pytest.mark.parametrize(
    ("setting", "cpu", "bf16", "compiled", "expected"),
    [
        ("auto", "avx512", False, True, False),  # compiled fp32 on AVX512: NCHW
        ("auto", "avx512_bf16", False, True, False),
        ("auto", "avx512", False, False, True),  # eager: channels_last (1.43-1.56x)
        ("auto", "avx512_bf16", True, True, True),  # compiled bf16: channels_last
        ("auto", "avx2", False, True, True),  # --compile true on AVX2: CL was the faster there
        ("true", "avx512", False, True, True),  # as given
        ("false", "avx2", False, False, False),
    ],
)
def test_channels_last_auto_is_on_but_for_a_compiled_fp32_step_on_avx512(
    cpu_is, setting, cpu, bf16, compiled, expected
):
    cpu_is(cpu)
    assert use_channels_last(setting, torch.device("cpu"), bf16, compiled) is expected


def test_the_default_layout_follows_the_compile_decision(cfg, cpu_is):
    """A long fp32 run on an AVX512 CPU stays eager in channels_last; ``--compile true`` there
    runs the step in NCHW (the model and the batches in the layout chosen); validation gets
    channels_last input in both, and NCHW only when asked for."""
    cpu_is("avx512")
    long_cfg = replace(cfg, amp="off", num_epochs=COMPILE_MIN_STEPS)  # >= 1 step an epoch
    for compile_setting, compiled in (("auto", False), ("true", True)):
        run_cfg = replace(long_cfg, compile=compile_setting)
        trainer = Trainer(run_cfg, DistContext(), torch.device("cpu"))
        assert trainer.compiled is compiled and trainer.channels_last is not compiled
        assert trainer.eval_channels_last  # validation runs eager: channels_last either way
        weight = next(p for p in trainer.model.parameters() if p.dim() == 4 and p.shape[1] > 1)
        assert weight.is_contiguous(memory_format=torch.channels_last) is not compiled
    nchw = Trainer(replace(long_cfg, channels_last="false"), DistContext(), torch.device("cpu"))
    assert not nchw.channels_last and not nchw.eval_channels_last


@pytest.mark.parametrize("compiled", [False, True])
def test_a_compiled_run_asks_its_thread_policy_for_two_checks_in_a_row(cfg, compiled):
    """The compiled step recompiles at each new thread count: one busy interval must not
    cost that (ThreadPolicy's settle; its behaviour: tests/train/test_threads.py)."""
    trainer = Trainer(
        replace(cfg, compile=str(compiled).lower()), DistContext(), torch.device("cpu")
    )
    assert trainer.compiled is compiled and trainer.threads.settle == (2 if compiled else 1)


def test_the_run_says_which_speed_settings_it_chose(cfg, caplog):
    caplog.set_level(logging.INFO, logger="deblur_lib.train")
    result = fit(replace(cfg, max_steps_per_epoch=1, log_model=False, amp="off"))
    assert result.ok
    line = (
        "speed: bf16 off (--amp off), channels_last on (--channels_last auto), compile off "
        "(--compile auto)"
    )
    assert line in caplog.text
    run = MlflowClient(cfg.tracking_uri).get_run(result.run_id)
    assert run.data.tags["speed"] == line.removeprefix("speed: ")


def test_build_loaders_reports_a_range_problem(tiny_data, tmp_path):
    dark = tmp_path / "dark"
    for side in ("blur", "sharp"):
        (dark / side).mkdir(parents=True)
        Image.new("RGB", (40, 40), (3, 3, 3)).save(dark / side / "a.png")
    cfg = TrainConfig(train_data=str(tiny_data / "train"), test_data=str(dark), crop_size=32)
    loaders = build_loaders(cfg, DistContext(), torch.device("cpu"))
    assert len(loaders.range_warnings) == 1 and "--test_data" in loaders.range_warnings[0]
    assert loaders.example.shape == loaders.example_sharp.shape == (1, 3, 40, 40)


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_generated_training_pairs_follow_natural_share(tiny_data, share):
    cfg = TrainConfig(
        train_data="synthetic", test_data=str(tiny_data / "test"), crop_size=32, epoch_size=8,
        natural_share=share,
    )  # fmt: skip
    cfg.validate()
    loaders = build_loaders(cfg, DistContext(), torch.device("cpu"))
    dataset = loaders.train.dataset.dataset  # FreshKeys around the SyntheticPairs
    assert dataset.natural_share == share
    sources = {dataset.pair(i).source for i in range(8)}
    assert (sources == {"dead_leaves"}) == (share == 0.0)


@pytest.mark.parametrize("share", [-0.1, 1.5, "half", True])
def test_natural_share_outside_0_1_is_a_usage_error(tiny_data, share):
    cfg = TrainConfig(train_data="synthetic", test_data=str(tiny_data / "test"), crop_size=32,
                      natural_share=share)  # fmt: skip
    with pytest.raises(ValueError, match="--natural_share must be a number in"):
        cfg.validate()


@pytest.mark.parametrize("kernel_min", [3, 7])
def test_generated_training_blur_follows_kernel_min(tiny_data, kernel_min):
    cfg = TrainConfig(
        train_data="synthetic", test_data=str(tiny_data / "test"), crop_size=64, epoch_size=8,
        kernel_min=kernel_min,
    )  # fmt: skip
    cfg.validate()
    dataset = build_loaders(cfg, DistContext(), torch.device("cpu")).train.dataset.dataset
    assert dataset.params.kernel_size == (kernel_min, 31)
    sides = {dataset.pair(i).kernel.shape[0] for i in range(40)}
    assert min(sides) >= kernel_min and max(sides) <= 31  # 64 px crops cap the side at 31
    assert (min(sides) < 7) == (kernel_min < 7)  # 40 draws: P(no side 3 or 5) = (13/15)^40


@pytest.mark.parametrize(
    ("kernel_min", "match"),
    [
        (1, r"--kernel_min must be an odd int in \[3, 31\] \(got 1\)"),
        (33, r"--kernel_min must be an odd int in \[3, 31\] \(got 33\)"),
        (5.0, r"--kernel_min must be an odd int in \[3, 31\] \(got 5.0\)"),
        (4, r"--kernel_min must be odd: PSFs have a centre pixel \(got 4\)"),
    ],
)
def test_kernel_min_out_of_range_is_a_usage_error(tiny_data, kernel_min, match):
    cfg = TrainConfig(train_data="synthetic", test_data=str(tiny_data / "test"), crop_size=32,
                      kernel_min=kernel_min)  # fmt: skip
    with pytest.raises(ValueError, match=match):
        cfg.validate()


def test_configure_backends_touches_nothing_off_cuda():
    flags = ("benchmark", "allow_tf32")
    before = [getattr(torch.backends.cudnn, f) for f in flags]
    before.append(torch.backends.cuda.matmul.allow_tf32)
    configure_backends(torch.device("cpu"))
    after = [getattr(torch.backends.cudnn, f) for f in flags]
    after.append(torch.backends.cuda.matmul.allow_tf32)
    assert after == before
