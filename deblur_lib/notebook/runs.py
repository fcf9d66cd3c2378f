"""Reading training runs back from MLflow, and the failure's symptoms in them.

The notebooks never trust what ``fit`` returned about its own metrics: they read what the
tracking store holds (:func:`run_history`), since that is what a user sees in the MLflow UI
and what the original failure was diagnosed from. :func:`run_symptoms` and :func:`lr_cuts`
summarise a history into the seed's symptoms: PSNR/SSIM logged as 0.0 or NaN, and learning
rate cuts, each with its cause (the scheduler fed a valid PSNR, an invalid one, or a rollback).

A history is ``{metric key: (steps, values)}``, numpy int64/float64 arrays sorted by step (the
epoch for per-epoch metrics). MLflow stores NaN as NaN and clamps +-inf to +-1.8e308; both
count as non-finite here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from mlflow.tracking import MlflowClient

from deblur_lib.train.figures import SEED_GRAPHS, History

RUN_KEYS = (
    *SEED_GRAPHS,
    "train_loss",
    "skipped_steps",
    "rollbacks",
    "val_valid_batches",
    "val_total_batches",
)
_CLAMPED_INF = 1e300


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return np.array([], dtype=np.int64), np.array([], dtype=np.float64)


def nonfinite(values: np.ndarray) -> np.ndarray:
    """Mask of NaN, +-inf and MLflow's clamped +-1.8e308 values."""
    return ~np.isfinite(values) | (np.abs(values) >= _CLAMPED_INF)


def run_history(run_id: str, keys: Sequence[str] = RUN_KEYS, tracking_uri: str | None = None):
    """Read each metric's full history from MLflow: key -> (steps, values), sorted by step.

    A key never logged maps to two empty arrays. Values are exactly what the store returns.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    out: History = {}
    for key in keys:
        points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        out[key] = (
            np.array([m.step for m in points], dtype=np.int64),
            np.array([m.value for m in points], dtype=np.float64),
        )
    return out


def find_run(
    experiment: str,
    run_name: str,
    tracking_uri: str | None = None,
    params: Mapping[str, object] | None = None,
) -> str | None:
    """Id of the newest FINISHED/FAILED run named ``run_name`` in ``experiment`` whose logged
    params equal ``params`` (compared as strings), or None."""
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    clauses = [f"attributes.run_name = '{run_name}'"]
    clauses += [f"params.{k} = '{v}'" for k, v in (params or {}).items()]
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=" and ".join(clauses),
        order_by=["attributes.start_time DESC"],
        max_results=5,
    )
    done = [r for r in runs if r.info.status in ("FINISHED", "FAILED")]
    return done[0].info.run_id if done else None


def _value_at(history: History, key: str, step: int) -> float | None:
    steps, values = history.get(key, _empty())
    hit = np.nonzero(steps == step)[0]
    return float(values[hit[-1]]) if hit.size else None


def lr_cuts(history: History) -> list[dict[str, object]]:
    """Every epoch whose logged LR is below the previous epoch's, with its cause.

    Causes: "rollback" (the ``rollbacks`` counter rose that epoch), "scheduler: valid PSNR x"
    (the previous epoch's logged val_psnr was a real value), "scheduler: fed invalid v" (it
    was NaN/inf/0.0) or "scheduler: fed an unlogged value".
    """
    steps, lrs = history.get("lr", _empty())
    cuts = []
    for prev, cur, lr0, lr1 in zip(steps[:-1], steps[1:], lrs[:-1], lrs[1:], strict=True):
        if not lr1 < lr0 * (1 - 1e-9):
            continue
        r0, r1 = _value_at(history, "rollbacks", prev), _value_at(history, "rollbacks", cur)
        psnr = _value_at(history, "val_psnr", int(prev))
        if r0 is not None and r1 is not None and r1 > r0:
            cause = "rollback"
        elif psnr is None:
            cause = "scheduler: fed an unlogged value"
        elif nonfinite(np.array([psnr]))[0] or psnr == 0.0:
            cause = f"scheduler: fed invalid {psnr:g}"
        else:
            cause = f"scheduler: valid PSNR {psnr:.2f}"
        cuts.append({"epoch": int(cur), "from": float(lr0), "to": float(lr1), "cause": cause})
    return cuts


def run_symptoms(history: History) -> dict[str, object]:
    """The seed's symptoms in one run: which epochs logged NaN/inf or 0.0 PSNR/SSIM/loss,
    every LR cut with its cause, and the guard counters at the end."""
    out: dict[str, object] = {}
    for key in ("val_psnr", "val_ssim", "val_loss"):
        steps, values = history.get(key, _empty())
        out[f"{key} epochs logged"] = len(values)
        out[f"{key} NaN/inf at"] = steps[nonfinite(values)].tolist()
        out[f"{key} 0.0 at"] = steps[values == 0.0].tolist()
    cuts = lr_cuts(history)
    out["LR cuts"] = [f"epoch {c['epoch']}: {c['cause']}" for c in cuts]
    out["LR cuts on invalid values"] = sum("invalid" in str(c["cause"]) for c in cuts)
    for key in ("skipped_steps", "rollbacks"):
        values = history.get(key, _empty())[1]
        out[key] = int(values[-1]) if values.size else 0
    return out


def invalid_logged(history: History, keys: Sequence[str] = ("val_psnr", "val_ssim", "val_loss")):
    """{key: number of logged values that are NaN/inf, or 0.0 for PSNR/SSIM}."""
    counts = {}
    for key in keys:
        values = history.get(key, _empty())[1]
        bad = nonfinite(values) | ((values == 0.0) if key != "val_loss" else False)
        counts[key] = int(np.sum(bad))
    return counts


def reproduces_failure(history: History) -> tuple[bool, str]:
    """Does this (guards off) run show the seed's symptoms? True when PSNR or SSIM was logged
    as NaN/inf or 0.0 AND the scheduler cut the LR after being fed such a value."""
    bad = invalid_logged(history, ("val_psnr", "val_ssim"))
    cuts = [c for c in lr_cuts(history) if "invalid" in str(c["cause"])]
    loss = history.get("val_loss", _empty())[1]
    cut_text = ", ".join(f"epoch {c['epoch']} {c['from']:.0e} -> {c['to']:.0e}" for c in cuts)
    why = (
        f"invalid PSNR/SSIM values logged: {bad}; LR cuts after an invalid value: "
        f"[{cut_text}]; val_loss non-finite in "
        f"{int(nonfinite(loss).sum())} of {loss.size} epochs"
    )
    return bool(sum(bad.values()) and cuts), why


def guarded_ok(history: History) -> tuple[bool, str]:
    """Did this (guards on) run stay clean? True when no logged PSNR/SSIM/loss is NaN/inf or
    0.0 and no LR cut followed an invalid or unlogged value (a rollback's halving is allowed)."""
    bad = invalid_logged(history)
    cuts = lr_cuts(history)
    wrong = [c for c in cuts if str(c["cause"]).startswith("scheduler: fed")]
    why = (
        f"invalid values logged: {bad}; LR cuts: "
        f"{[(c['epoch'], c['cause']) for c in cuts] or 'none'}"
    )
    return not sum(bad.values()) and not wrong, why


RUN_NAMES = {  # what the notebooks name their MLflow runs (the MLflow UI's list)
    "01_nan_path": "01 NaN path, guards off",
    "01_metric_path": "01 metric path, guards off",
    "04_nan_path": "04 NaN path, guards on",
    "04_metric_path": "04 metric path, guards on",
    "04_persistent_nan": "04 persistent NaN, guards on",
    "05_train": "05 demo training",
}


def tag_run(run_id: str, tracking_uri: str | None, notebook: str, verdict: str) -> None:
    """Tag an MLflow run with the notebook that made it and that notebook's verdict line about
    it (``notebook``, ``verdict``: searchable and shown in the MLflow UI)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    client.set_tag(run_id, "notebook", notebook)
    client.set_tag(run_id, "verdict", verdict[:5000])
