"""Reading runs back from MLflow, and the failure's symptoms in a metric history."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deblur_lib.notebook import runs


def _history(**series: list[float | None]) -> runs.History:
    """key -> one value per epoch (None: not logged that epoch)."""
    out = {}
    for key, values in series.items():
        steps = [i for i, v in enumerate(values) if v is not None]
        out[key] = (np.array(steps, dtype=np.int64), np.array([values[i] for i in steps], float))
    return out


SEED_LIKE = _history(
    lr=[2e-3, 2e-3, 2e-3, 2e-3, 2e-4],
    val_psnr=[20.0, 21.0, 0.0, 0.0, 0.0],
    val_ssim=[0.5, 0.6, 0.0, 0.0, math.nan],
    val_loss=[0.2, 0.15, 0.14, 0.14, 0.14],
    rollbacks=[0, 0, 0, 0, 0],
)
GUARDED = _history(
    lr=[2e-3, 2e-3, 1e-3, 1e-3, 1e-4],
    val_psnr=[20.0, 21.0, None, 21.5, 21.4],
    val_ssim=[0.5, 0.6, None, 0.61, 0.6],
    val_loss=[0.2, 0.15, None, 0.13, 0.13],
    rollbacks=[0, 0, 1, 1, 1],
)


def test_lr_cuts_name_their_cause():
    (cut,) = runs.lr_cuts(SEED_LIKE)
    assert cut == {"epoch": 4, "from": 2e-3, "to": 2e-4, "cause": "scheduler: fed invalid 0"}
    causes = [c["cause"] for c in runs.lr_cuts(GUARDED)]
    assert causes == ["rollback", "scheduler: valid PSNR 21.50"]
    unlogged = _history(lr=[1e-3, 1e-3, 5e-4], val_psnr=[20.0, None, 21.0])
    assert runs.lr_cuts(unlogged)[0]["cause"] == "scheduler: fed an unlogged value"


def test_symptoms_and_verdicts():
    sym = runs.run_symptoms(SEED_LIKE)
    assert sym["val_psnr 0.0 at"] == [2, 3, 4]
    assert sym["val_ssim NaN/inf at"] == [4]
    assert sym["LR cuts on invalid values"] == 1
    assert runs.reproduces_failure(SEED_LIKE)[0]
    assert not runs.guarded_ok(SEED_LIKE)[0]
    assert runs.guarded_ok(GUARDED)[0]
    assert not runs.reproduces_failure(GUARDED)[0]


def test_mlflow_clamped_inf_counts_as_nonfinite():
    values = np.array([1.0, math.nan, 1.7976931348623157e308, -math.inf, 0.0])
    assert runs.nonfinite(values).tolist() == [False, True, True, True, False]
    assert runs.invalid_logged(_history(val_psnr=[20.0, 0.0, math.nan]))["val_psnr"] == 2


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("exp", artifact_location=(root / "mlruns").as_uri())
    run_ids = []
    for fault in ("a", "b"):
        run = client.create_run(exp, run_name="01_nan_path")
        client.log_param(run.info.run_id, "inject_fault", fault)
        for step, value in enumerate([20.0, math.nan, 0.0]):
            client.log_metric(run.info.run_id, "val_psnr", value, step=step)
        client.set_terminated(run.info.run_id, "FINISHED")
        run_ids.append(run.info.run_id)
    return uri, run_ids


def test_run_history_reads_nan_and_zero_back(store):
    uri, (first, _) = store
    history = runs.run_history(first, keys=("val_psnr", "lr"), tracking_uri=uri)
    steps, values = history["val_psnr"]
    assert steps.tolist() == [0, 1, 2]
    assert values[0] == 20.0 and math.isnan(values[1]) and values[2] == 0.0
    assert history["lr"][0].size == 0


def test_find_run_by_name_and_params(store):
    uri, (first, second) = store
    assert runs.find_run("exp", "01_nan_path", uri) == second  # newest
    assert runs.find_run("exp", "01_nan_path", uri, params={"inject_fault": "a"}) == first
    assert runs.find_run("exp", "01_nan_path", uri, params={"inject_fault": "c"}) is None
    assert runs.find_run("no-such-experiment", "x", uri) is None
