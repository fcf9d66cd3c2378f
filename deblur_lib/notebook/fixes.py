"""The seed's fixes, checked on the same triggers as the failure (notebooks 02 and 03).

Fix 1 guarded MS-SSIM with a Charbonnier fallback, fix 2 skipped bad validation batches,
fix 3 checked metrics before logging/scheduling, fix 4 added a missing import. Each claim
function builds its situation on small seeded CPU tensors, measures, and returns a
``claims.Claim`` whose verdict is derived from the measurement. The evaluation helpers
(:func:`bad_validation_set`, :func:`per_batch_table`) build and inspect the "bad validation
set" of notebook 03. Tensors are model space (N, 3, H, W) in [-1, 1] unless noted.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import torch

from deblur_lib.data import PairedImageFolder
from deblur_lib.evaluate import evaluate
from deblur_lib.losses import CharbonnierLoss, CombinedLoss
from deblur_lib.metrics import denormalize, psnr
from deblur_lib.models import build_model
from deblur_lib.notebook.claims import Claim, _pair
from deblur_lib.train.legacy import (
    SeedCombinedLoss,
    SeedGuardedLoss,
    evaluate_seed_style,
    seed_calculate_metrics_missing_import,
)

FIXES_SECTION = "The seed's fixes"


@contextlib.contextmanager
def _quiet_logs(*names: str) -> Iterator[None]:
    """Raise the named loggers to ERROR for the block (their warnings are the evidence)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def small_crops(
    pair: tuple[torch.Tensor, torch.Tensor] | None = None,
    sizes: tuple[int, ...] = (64, 128, 160, 161),
) -> Claim:
    """Fix 1 on small crops: stock crashes, the seed's guard silently drops MS-SSIM, ours adapts."""

    ev: dict[str, object] = {}
    for size in sizes:
        if pair is None:
            x, y = (t * 2 - 1 for t in _pair(size, n=1))
        else:  # centre crops of a real (prediction, target) pair, model space (1, 3, H, W)
            top, left = ((d - size) // 2 for d in pair[0].shape[-2:])
            if top < 0 or left < 0:
                raise ValueError(f"crop {size} px does not fit the pair {tuple(pair[0].shape)}")
            x, y = (t[..., top : top + size, left : left + size] for t in pair)
        try:
            stock = f"{float(SeedCombinedLoss()(x, y)):.4f}"
        except AssertionError:  # pytorch-msssim's size check
            stock = "AssertionError"
        seed_loss = SeedGuardedLoss()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seed_value = seed_loss(x, y)
            ours_loss, pred = CombinedLoss(), x.clone().requires_grad_(True)
            ours = ours_loss(pred, y)
        ours.backward()
        ev[f"{size} px"] = {
            "stock (seed loss)": stock,
            "seed fix 1": f"{float(seed_value):.4f}"
            + (" (Charbonnier only)" if seed_loss.fallbacks else ""),
            "ours": f"{float(ours):.4f}",
            "ours MS-SSIM fallbacks": ours_loss.read_stats()["msssim_fallbacks"],
            "ours grad finite": bool(torch.isfinite(pred.grad).all()),
        }
    ok = all(v["ours grad finite"] and v["ours MS-SSIM fallbacks"] == 0 for v in ev.values())
    verdict = (
        "holds for our per-sample guard: finite MS-SSIM-based loss and gradients at every size "
        "(the scales adapt, no fallback needed); the seed's fix 1 as written silently trains "
        "on Charbonnier alone for every crop of 160 px or less"
        if ok
        else "does not hold: our loss fell back or produced a non-finite gradient"
    )
    return Claim(
        FIXES_SECTION,
        "Fix 1: guarding MS-SSIM keeps the loss usable on small crops",
        "small_crops",
        ev,
        verdict,
    )


def charbonnier_fallback_on_nan_prediction(
    seed: int = 0, pair: tuple[torch.Tensor, torch.Tensor] | None = None
) -> Claim:
    """Fix 1 on the NaN trigger: no loss can repair a NaN prediction; only skipping the step can."""

    torch.manual_seed(seed)
    model = build_model("tiny")
    if pair is None:
        sharp = _pair(161, n=2, seed=seed)[0] * 2 - 1
        blur = sharp.clone()
    else:  # (blur, sharp) model space (1, 3, H, W): two copies, the first one poisoned
        blur, sharp = (torch.cat([t, t]) for t in pair)
    blur[0, :, 0, 0] = math.nan  # the trigger of notebook 01: fault nan_input
    per_sample = CharbonnierLoss(reduction="none")
    losses = {
        "stock (seed) loss": SeedCombinedLoss(),
        "seed fix 1 (whole-batch fallback)": SeedGuardedLoss(),
        "ours (per-sample fallback)": CombinedLoss(),
        "Charbonnier alone": CharbonnierLoss(),
        "Charbonnier, NaN sample dropped": lambda p, t: per_sample(p, t)[1:].mean(),
    }
    ev: dict[str, object] = {}
    for name, loss_fn in losses.items():
        model.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = loss_fn(model(blur), sharp)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        ev[name] = {
            "loss": float(loss.detach()),
            "NaN grads": f"{float(grads.isnan().double().mean()):.0%}",
        }
    all_nan = all(v["NaN grads"] == "100%" for v in ev.values())
    verdict = (
        "holds: a NaN prediction makes every loss variant's gradient 100% NaN, even when the "
        "bad sample is dropped from the loss (0 * NaN = NaN in the conv weight gradients); "
        "only skipping the optimizer step protects the weights (notebook 04)"
        if all_nan
        else "does not hold: some loss kept the gradients finite"
    )
    return Claim(
        FIXES_SECTION,
        "Fix 1: a Charbonnier fallback rescues a NaN batch",
        "charbonnier_fallback_on_nan_prediction",
        ev,
        verdict,
    )


def metrics_missing_import(pred: torch.Tensor, target: torch.Tensor):
    """A metric function with fix 4's bug: it uses ``np``, which this module never imports
    (``NameError`` on every call), as the seed's metric code did."""
    return np.zeros(len(pred)), np.zeros(len(pred))  # noqa: F821 - the missing import, on purpose


def broad_except_hides_nameerror() -> Claim:
    """Fix 4 (add the missing import) is exactly the bug a broad ``except`` hides."""

    x, y = (t * 2 - 1 for t in _pair(32))
    with _quiet_logs("deblur_lib.train.legacy"):  # its warning is the swallowed NameError
        seed = seed_calculate_metrics_missing_import(x, y)
    try:
        evaluate(
            torch.nn.Identity(), [(x, y)], CharbonnierLoss(), "cpu", metrics=metrics_missing_import
        )
        ours = "no exception"
    except NameError as exc:  # the behaviour under test: it must propagate
        ours = f"NameError propagated: {exc}"
    ev = {"seed metrics with the missing import": tuple(seed), "evaluate()": ours}
    verdict = (
        "holds: with `except Exception` the missing import fix 4 is about never surfaced; it "
        "was reported as metrics (0.0, 0.0); evaluate() catches only MetricError/ValueError, "
        "so the NameError stops the run at once"
        if tuple(seed) == (0.0, 0.0) and ours.startswith("NameError")
        else "does not hold"
    )
    return Claim(
        FIXES_SECTION,
        "A broad `except Exception` hides fix 4's missing import",
        "broad_except_hides_nameerror",
        ev,
        verdict,
    )


def bad_validation_set(
    test_dir: str | Path, n_good: int = 3, batch_size: int = 2
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """Validation batches with the failures of the metric path, and a label for each.

    ``n_good`` full-size test pairs in batches of ``batch_size`` (the last one smaller, so
    per-batch and per-image averages differ), then a 6x6 px crop (under every SSIM window:
    scikit-image raises) and a pair with one NaN pixel in the input (NaN prediction).
    """

    ds = PairedImageFolder(test_dir)
    if len(ds) < n_good:
        raise ValueError(f"{test_dir} has {len(ds)} pairs, bad_validation_set needs {n_good}")
    pairs = [ds[i] for i in range(n_good)]
    batches, labels = [], []
    for i in range(0, n_good, batch_size):
        chunk = pairs[i : i + batch_size]
        batches.append(tuple(torch.stack(t) for t in zip(*chunk, strict=True)))
        labels.append(f"{len(chunk)} good image(s)")
    blur, sharp = pairs[0]
    batches.append((blur[None, :, :6, :6], sharp[None, :, :6, :6]))
    labels.append("6x6 px crop")
    nan_blur = blur.clone()
    nan_blur[:, 0, 0] = math.nan
    batches.append((nan_blur[None], sharp[None]))
    labels.append("NaN pixel in input")
    return batches, labels


def per_batch_table(model: torch.nn.Module, batches, labels: list[str]):
    """One row per batch: what the seed-style evaluation logged and what evaluate() did."""
    rows = []
    with _quiet_logs("deblur_lib.evaluate", "deblur_lib.train.legacy"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, batch in zip(labels, batches, strict=True):
            seed = evaluate_seed_style(model, [batch], SeedGuardedLoss(), "cpu")
            ours = evaluate(model, [batch], CombinedLoss(), "cpu")
            reason = next((k for k, v in ours.skipped.items() if v), "valid")
            rows.append(
                {
                    "batch": label,
                    "images": batch[0].shape[0],
                    "seed PSNR": float(seed.psnr),
                    "seed SSIM": float(seed.ssim),
                    "ours": reason,
                    "ours PSNR": ours.psnr,
                }
            )
    return pd.DataFrame(rows)


def per_image_average(model: torch.nn.Module, batches) -> Claim:
    """Per-batch averaging (the seed) weights a short last batch like a full one."""

    with torch.no_grad():
        per_image = torch.cat([psnr(denormalize(model(b)), denormalize(s)) for b, s in batches])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seed = evaluate_seed_style(model, batches, SeedGuardedLoss(), "cpu")
        ours = evaluate(model, batches, CombinedLoss(), "cpu")
    truth = float(per_image.mean())
    ev = {
        "batch sizes": [int(b.shape[0]) for b, _ in batches],
        "per-image PSNRs": [round(float(v), 3) for v in per_image],
        "true per-image mean": truth,
        "seed (per-batch mean)": float(seed.psnr),
        "evaluate() (per-image mean)": float(ours.psnr),
    }
    ok = abs(ours.psnr - truth) < 1e-3
    verdict = (
        f"holds only when averaged per image: evaluate() gives the true mean {truth:.3f} dB, "
        f"the seed's per-batch mean gives {seed.psnr:.3f} dB (off by "
        f"{seed.psnr - truth:+.3f} dB: every batch counts the same, whatever its size)"
        if ok
        else f"does not hold: evaluate() gave {ours.psnr:.3f} dB, the per-image mean is {truth:.3f}"
    )
    return Claim(
        FIXES_SECTION,
        "Fix 2: averaging the valid batches gives the validation score",
        "per_image_average",
        ev,
        verdict,
    )
