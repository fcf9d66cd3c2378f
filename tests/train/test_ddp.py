"""DDP on CPU: ``torchrun --nproc_per_node 2 -m deblur_lib.train`` (gloo) against one process.

Both runs train on the same global batch (4), with a NaN injected at step 1: on every sample
batch of the single process (``nan_input@step=1``), on rank 1 only under torchrun
(``nan_input@step=1,rank=1``). The skip decision is all-reduced, so both runs skip exactly step
1 and must end with the same metrics; the two ranks must end with bit-identical weights and
both record the skip (tests/hooks.py ``--rank_report``: each rank writes the digest of its final
weights, its counters and history, see ``distributed.write_rank_report``).

Tolerance: relative 1e-4 on every logged float, in float32 (``amp="off"``: ``auto`` is bf16 on
a CPU with native bf16, whose rounding moved the mean gradient norm by 3e-4 relative). The
runs see the same samples with the same crops in the same global batches
(``data.GlobalBatchSampler`` + ``KeyedCrops``), so they differ only in the order of float32
sums (two half batches and a gradient all-reduce instead of one batch): last-bit differences
that Adam carries as ~1e-6 relative after a few steps. 1e-4 leaves margin for that and still
fails on any real difference (another batch, another crop, a step skipped on one rank only),
each of which moves the loss or PSNR by far more.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hooks import weights_digest
from mlflow.tracking import MlflowClient

from deblur_lib.models import build_model
from deblur_lib.train import fit
from deblur_lib.train.config import TrainConfig
from deblur_lib.weights import load_checkpoint

torch.set_num_threads(2)
REL_TOL = 1e-4
pytestmark = pytest.mark.slow


def _cfg(tiny_data: Path, out_dir: Path, store: str) -> TrainConfig:
    return TrainConfig(
        train_data=str(tiny_data / "train"),
        test_data=str(tiny_data / "test"),
        out_dir=str(out_dir),
        tracking_uri=store,
        experiment="ddp",
        model_size="tiny",
        crop_size=32,
        batch_size=4,
        num_epochs=2,
        learning_rate=1e-3,
        device="cpu",
        amp="off",  # fp32: the tolerance below is for float32 sums (bf16 rounds at ~4e-3)
        num_workers=0,
        log_every=1,
        log_model=False,
    )


def _argv(cfg: TrainConfig) -> list[str]:
    argv = []
    for key, value in cfg.to_dict().items():
        if value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def test_two_ranks_match_one_process_and_skip_the_same_step(tiny_data, mlflow_store, tmp_path):
    single = fit(
        replace(_cfg(tiny_data, tmp_path / "single", mlflow_store), inject_fault="nan_input@step=1")
    )
    assert single.ok and single.skipped_steps == 1

    cfg = replace(
        _cfg(tiny_data, tmp_path / "ddp", mlflow_store), inject_fault="nan_input@step=1,rank=1"
    )
    reports = tmp_path / "reports"
    torchrun = Path(sys.executable).with_name("torchrun")
    hooks = Path(__file__).resolve().parents[1] / "hooks.py"
    argv = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(hooks)]
    argv += ["--rank_report", str(reports), "--"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv + _argv(cfg), capture_output=True, text=True, env=env, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Training finished: 2 epochs" in proc.stderr

    rank0, rank1 = (json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["weights_sha256"] == rank1["weights_sha256"]  # the ranks never diverged
    assert rank0["skipped_steps"] == rank1["skipped_steps"] == 1  # both skipped step 1
    assert rank0["injected"] == {"nan_input": 0} and rank1["injected"] == {"nan_input": 1}
    per_process = ("epoch_s", "threads")  # each rank's own clock and thread count

    def shared(history):
        return [{k: v for k, v in rec.items() if k not in per_process} for rec in history]

    assert shared(rank0["history"]) == shared(rank1["history"])  # the rest is all-reduced

    # the same run as one process: same counters, same metrics within REL_TOL
    ddp_history = rank0["history"]
    assert len(ddp_history) == len(single.history) == 2
    for ours, theirs in zip(ddp_history, single.history, strict=True):
        for key in ("skipped_steps", "msssim_fallbacks", "rollbacks"):
            assert ours[key] == theirs[key], key
        for key in ("train_loss", "grad_norm", "val_loss", "val_psnr", "val_ssim", "lr"):
            assert math.isclose(ours[key], theirs[key], rel_tol=REL_TOL), (key, ours, theirs)
    assert ddp_history[0]["msssim_fallbacks"] == 1  # rank 1's sample, counted on rank 0 too
    # evaluation: every rank's batches are counted (2 ranks x 1 batch of 2 images)
    assert [h["val_total_batches"] for h in ddp_history] == [2, 2]

    # rank 0 alone logged (one MLflow run for the torchrun job) and wrote last.pt: the final
    # weights both ranks reported
    client = MlflowClient(tracking_uri=mlflow_store)
    exp = client.get_experiment_by_name("ddp")
    assert sorted(r.info.run_name for r in client.search_runs([exp.experiment_id])) == [
        "ddp",
        "single",
    ]
    model = build_model("tiny")
    model.load_state_dict(load_checkpoint(tmp_path / "ddp" / "last.pt")["model"])
    assert weights_digest(model) == rank0["weights_sha256"]
