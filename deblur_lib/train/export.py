"""Ship a trained checkpoint: weights-only file, model card, curves (``make pretrain``'s last step).

    python -m deblur_lib.train.export runs/finetune/last.pt --test_data data/pretrain/test \\
        [--name deblur-guard-small] [--out deblur_lib/pretrained]

writes, for ``NAME``:

* ``NAME.pt``: the model's state dict alone (``torch.save``; read back with
  ``torch.load(weights_only=True)``, never unpickled; ``DeblurNet.from_pretrained(NAME)``);
* ``NAME.json``: the model card, machine-readable, and the weights' config at once
  (``models.load_from_files`` reads it): architecture, SHA-256 of ``NAME.pt``, training crop,
  the training configuration and where it ran (git commit, machine, torch, wall time, steps),
  the data generator (version, seed, degradation parameters), and the test split's mean
  PSNR/SSIM of the model and of the blurred input, measured here with ``predict.deblur``;
* ``NAME.history.json``: the run's per-epoch records (what notebook 06 plots); for a second
  stage (``--init_from`` a checkpoint) its first stage's records first, then its own with the
  epochs numbered on, each with ``stage`` 1 or 2;
* ``NAME.md``: the same card for people.

Refuses (exit 2, one line) a checkpoint that is not finite or verified, a missing test split,
and a weights file over ``MAX_BYTES`` (what the repository may hold).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deblur_lib.data import PairedImageFolder
from deblur_lib.degrade import DEFAULT_PARAMS
from deblur_lib.metrics import denormalize, psnr, ssim
from deblur_lib.models import PRETRAINED_DIR, DeblurNet, save_weights
from deblur_lib.predict import deblur
from deblur_lib.synth import GENERATOR_VERSION, NATURAL_SHARE
from deblur_lib.train.config import degradation
from deblur_lib.weights import WeightsError, load_checkpoint, load_model

MAX_BYTES = 2 * 2**20  # the one large file the repository holds: at most 2 MiB
PROG = "python -m deblur_lib.train.export"


def test_scores(model: DeblurNet, test_data: str | Path) -> dict[str, Any]:
    """Mean and per-image PSNR (dB) / SSIM of ``model`` and of the blurred input on every pair
    of ``test_data`` (full images, ``predict.deblur``; metric space [0, 1]), and
    ``sharp_in_psnr``: PSNR of the model's output for the *sharp* image against that image,
    how much it alters a photo that needs no deblurring (identity: 100 dB, the cap)."""
    pairs = PairedImageFolder(test_data)
    rows = []
    for i, name in enumerate(pairs.names):
        blur, sharp = (t[None] for t in pairs[i])
        restored = deblur(model, blur)
        target = denormalize(sharp)
        rows.append(
            {
                "name": name,
                "psnr": float(psnr(denormalize(restored), target)[0]),
                "ssim": float(ssim(denormalize(restored), target)[0]),
                "blurred_psnr": float(psnr(denormalize(blur), target)[0]),
                "blurred_ssim": float(ssim(denormalize(blur), target)[0]),
                "sharp_in_psnr": float(psnr(denormalize(deblur(model, sharp)), target)[0]),
            }
        )
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "name"}
    return {"n_images": len(rows), **mean, "gain_db": mean["psnr"] - mean["blurred_psnr"],
            "per_image": rows}  # fmt: skip


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).resolve().parent,
        )  # fmt: skip
    except OSError:
        return None
    return out.stdout.strip() or None


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def export(
    checkpoint: Path, test_data: Path, name: str, out: Path, trained_at: str | None = None
) -> dict[str, Any]:
    """Write NAME.pt / .json / .history.json / .md to ``out`` (see the module docstring);
    returns the card. ValueError naming the problem for a bad checkpoint or test split."""
    state = load_checkpoint(checkpoint)
    model, info = load_model(str(checkpoint))
    cfg, history = state["config"], state["history"]
    scores = test_scores(model, test_data)
    training = {
        "checkpoint": str(checkpoint),
        "epoch": state["epoch"],
        "steps": state["step"],
        "images_seen": state["step"] * cfg["batch_size"],
        "wall_s": _wall_s(history),
        "skipped_steps": history[-1]["skipped_steps"] if history else 0,
        "rollbacks": state["rollbacks"],
        "best_val_psnr_db": state["best_psnr"],
        "config": {k: v for k, v in cfg.items() if k not in ("tracking_uri",)},
        "git_commit": trained_at or _git_commit(),  # the code that trained (default: HEAD)
        "exported_at_commit": _git_commit(),
        "machine": _machine(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    shipped_history = history
    if cfg.get("init_from"):  # a second stage: what the first one was
        training["init_from"], first = _first_stage(str(cfg["init_from"]))
        shipped_history = [dict(r, stage=1) for r in first] + [
            dict(r, stage=2, epoch=r["epoch"] + len(first)) for r in history
        ]
    kernel_min = _kernel_min(cfg)
    generator = {
        "train_data": cfg["train_data"],
        "version": GENERATOR_VERSION,
        "seed": cfg["seed"],
        "natural_share": cfg.get("natural_share", NATURAL_SHARE),  # older runs: the default
        "kernel_min": kernel_min,
        "degradation": degradation(kernel_min).to_dict(),
    }
    manifest = test_data.parent / "manifest.json"  # synthesize()'s settings of the split
    settings = json.loads(manifest.read_text())["settings"] if manifest.is_file() else None
    test = {"split": str(test_data), "split_settings": settings}
    test |= {k: v for k, v in scores.items() if k != "per_image"}
    card = {
        "name": name,
        "description": (
            f"DeblurNet '{cfg['model_size']}' trained by deblur-guard's guarded loop on "
            "generated camera-shake pairs; blind (no kernel needed)"
        ),
        "training": training,
        "generator": generator,
        "test": test,
    }
    out.mkdir(parents=True, exist_ok=True)
    weights_path, config_path = save_weights(
        model, out / "tmp_export", train_crop_size=cfg["crop_size"], preset=cfg["model_size"],
        extra=card,
    )  # fmt: skip
    if weights_path.stat().st_size > MAX_BYTES:
        size = weights_path.stat().st_size
        weights_path.unlink()
        config_path.unlink()
        raise ValueError(f"{weights_path.name} is {size} bytes, over the {MAX_BYTES} allowed")
    weights_path.replace(out / f"{name}.pt")
    config_path.replace(out / f"{name}.json")
    (out / "tmp_export").rmdir()
    (out / f"{name}.history.json").write_text(json.dumps(shipped_history, indent=1) + "\n")
    card = json.loads((out / f"{name}.json").read_text())
    (out / f"{name}.md").write_text(model_card_markdown(card, scores["per_image"]))
    return card


def _wall_s(history: list[dict[str, Any]]) -> float:
    """Seconds a run's epochs took (training and validation), from its per-epoch records."""
    return round(sum(h.get("epoch_s", 0.0) for h in history), 1)


def _kernel_min(cfg: dict[str, Any]) -> int:
    """A run's ``--kernel_min`` (runs from before the flag: the default, 7)."""
    return cfg.get("kernel_min", DEFAULT_PARAMS.kernel_size[0])


def _first_stage(spec: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """What ``--init_from`` started from, and its per-epoch history: for a checkpoint file its
    steps, wall time and data settings (the first stage of a two-stage recipe), else the name
    alone and no history."""
    record: dict[str, Any] = {"source": spec}
    history: list[dict[str, Any]] = []
    if Path(spec).is_file():
        state = load_checkpoint(Path(spec))
        cfg, history = state["config"], state["history"]
        record |= {
            "steps": state["step"],
            "wall_s": _wall_s(history),
            "natural_share": cfg.get("natural_share", NATURAL_SHARE),
            "kernel_min": _kernel_min(cfg),
            "seed": cfg["seed"],
            "learning_rate": cfg["learning_rate"],
            "init_from": cfg.get("init_from"),
        }
    return record, history


def _sharp_row(test: dict[str, Any]) -> str:
    if "sharp_in_psnr" not in test:  # cards exported before it was measured
        return ""
    return (
        f"| sharp input | the model given the sharp images: {test['sharp_in_psnr']:.2f} dB "
        "against them (how much it alters a photo that needs no deblurring) |\n"
    )


def _init_row(t: dict[str, Any]) -> str:
    init = t.get("init_from")
    if not init:
        return ""
    if "steps" not in init:
        return f"| started from | `{init['source']}` |\n"
    return (
        f"| started from | `{init['source']}`: {init['steps']} steps of its own "
        f"({init['wall_s'] / 60:.1f} min, generator seed {init['seed']}, natural-photo share "
        f"{init['natural_share']}, lr {init['learning_rate']}); total wall time "
        f"{(init['wall_s'] + t['wall_s']) / 60:.1f} min |\n"
    )


def model_card_markdown(card: dict[str, Any], per_image: list[dict[str, Any]]) -> str:
    t, g, test = card["training"], card["generator"], card["test"]
    cfg = t["config"]
    best = sorted(per_image, key=lambda r: r["psnr"] - r["blurred_psnr"])
    return f"""# {card["name"]}

{card["description"]}.

| | |
|---|---|
| architecture | {card["architecture"]} |
| weights | `{card["name"]}.pt`, sha256 `{card["sha256"]}` (weights-only) |
| training data | {g["train_data"]}: generator version {g["version"]}, seed {g["seed"]}, \
natural-photo share {g["natural_share"]}, PSF sides {g["degradation"]["kernel_size"][0]}-\
{g["degradation"]["kernel_size"][1]} px |
| recipe | {t["steps"]} steps of batch {cfg["batch_size"]} ({t["images_seen"]} pairs, none \
seen twice), {cfg["crop_size"]} px crops, AdamW lr {cfg["learning_rate"]} {cfg["scheduler"]} \
(warm-up {cfg["warmup_steps"]}), loss {cfg["alpha"]} (1 - MS-SSIM) + {cfg["beta"]} Charbonnier\
{f", weights averaged (EMA {cfg['ema']})" if cfg.get("ema") else ""} |
{_init_row(t)}| guards | {t["skipped_steps"]} skipped steps, {t["rollbacks"]} rollbacks |
| wall time | {t["wall_s"] / 60:.1f} min on {t["machine"]["cpu"]} ({t["machine"]["cores"]} \
cores), torch {t["machine"]["torch"]}, {t["date"]} |
| code | git {t["git_commit"]} |
| test split | {test["split"]}: {test["n_images"]} natural photos never used in training |
| test PSNR / SSIM | model {test["psnr"]:.2f} dB / {test["ssim"]:.3f}; blurred input \
{test["blurred_psnr"]:.2f} dB / {test["blurred_ssim"]:.3f} (gain {test["gain_db"]:+.2f} dB) |
| worst / best image gain | {best[0]["psnr"] - best[0]["blurred_psnr"]:+.2f} dB \
({best[0]["name"]}) / {best[-1]["psnr"] - best[-1]["blurred_psnr"]:+.2f} dB \
({best[-1]["name"]}) |
{_sharp_row(test)}
Degradation parameters (``deblur_lib.degrade.DegradeParams``): `{g["degradation"]}`.
Reproduce: `make pretrain` (README). Load: `DeblurNet.from_pretrained("{card["name"]}")`.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path, help="a training checkpoint (make pretrain: last.pt)")
    ap.add_argument("--test_data", type=Path, required=True, help="a synthesize() test split")
    ap.add_argument("--name", default="deblur-guard-small", help="the shipped name")
    ap.add_argument("--out", type=Path, default=PRETRAINED_DIR, help="where to write")
    ap.add_argument(
        "--trained_at", default=None, help="git commit the run trained at (default: HEAD)"
    )
    args = ap.parse_args(argv)
    try:
        card = export(args.checkpoint, args.test_data, args.name, args.out, args.trained_at)
    except (ValueError, WeightsError, OSError) as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    test = card["test"]
    print(
        f"{args.out / args.name}.pt: test PSNR {test['psnr']:.2f} dB vs blurred "
        f"{test['blurred_psnr']:.2f} dB ({test['gain_db']:+.2f}) on {test['n_images']} images"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
