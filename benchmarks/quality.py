"""Benchmark: test-set PSNR/SSIM of a training recipe vs the blurred input and classical
deconvolution given the true kernel. Issue 12, items 3 and 6.

    python benchmarks/quality.py --params params/pretrain.yaml --set num_epochs=2 --name short
    python benchmarks/quality.py                  # the whole make pretrain recipe (~1 h CPU)
    python benchmarks/quality.py --device cuda    # params/gpu.yaml: the GPU budget

``--params`` is a training YAML (``TrainConfig`` fields: what ``python -m deblur_lib.train
--config`` reads); ``--set KEY=VALUE`` overrides a field (VALUE read as YAML). Training is
``deblur_lib.train.fit`` (guards on; MLflow to a temporary sqlite store, checkpoints to a
temporary folder, unless ``--keep DIR``). Its ``test_data`` must be a split written by
``synthesize`` (``kernels/`` beside the pairs): by default ``data/pretrain/test``, written
here with ``make pretrain``'s command when it is missing.
every test image is restored by the run's LAST checkpoint (its averaged weights with --ema: what
``make pretrain`` hands on; the best epoch is picked on the test split, so it is only recorded)
and by scikit-image Wiener and
Richardson-Lucy given the TRUE kernel, in sRGB and in linear light (parameters grid-searched
on ``--n_tune`` pairs of the sibling ``train/`` split), and left blurred; PSNR and SSIM per
image with ``deblur_lib.metrics``. The classical scores of a split are cached beside it
(``classical.json``). The JSON records the command, the settings, the per-epoch history, the
timings and the machine; ``--name`` names the file (``results/quality_<name>.json``).
Goal (issue 12): model >= blurred + 4 dB and > the best classical method, on >= 50 test images.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _common  # first: puts the repo on sys.path when run as a script
import yaml

from deblur_lib.notebook import classical
from deblur_lib.synth import synthesize
from deblur_lib.train import fit
from deblur_lib.train.config import TrainConfig
from deblur_lib.weights import load_model

PARAMS = {
    "cpu": _common.REPO / "params" / "pretrain.yaml",
    "cuda": _common.REPO / "params" / "gpu.yaml",
}
# make pretrain's split: synthesize(n_train=16, n_test=60, 256 px, seed 0)
TEST_SPLIT = Path("data/pretrain")
GOAL_GAIN_DB = 4.0


def apply_overrides(settings: dict[str, Any], pairs: Sequence[str]) -> list[str]:
    """Apply ``KEY=VALUE`` pairs (VALUE read as YAML: ``0.16``, ``true``, ``cosine``) to
    ``settings`` in place; KEY must be a ``TrainConfig`` field."""
    applied = []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in TrainConfig.__dataclass_fields__:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE with KEY a TrainConfig field")
        settings[key] = yaml.safe_load(text)
        applied.append(f"{key}={settings[key]!r}")
    return applied


def classical_scores(test_dir: Path, n_tune: int) -> dict[str, Any]:
    """Tuned classical methods on ``test_dir``: cached in ``test_dir/../classical.json``."""
    cache = test_dir.parent / "classical.json"
    key = {
        "test_dir": str(test_dir.resolve()),
        "n_tune": n_tune,
        "methods": sorted(classical.METHODS),
    }
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached
    tune_set = classical.load_samples(test_dir.parent / "train", n_tune)
    tuned = {m: classical.tune(m, tune_set) for m in classical.METHODS}
    test = classical.load_samples(test_dir)
    methods = {"blurred": lambda s: s.blur}
    methods |= {m: classical.restorer(m, t.best) for m, t in tuned.items()}
    per_image, _ = classical.evaluate_methods(test, methods)
    out = {
        "key": key,
        "tuning": {
            m: {"param": t.param_name, "best": t.best, "train_psnr_db": t.scores}
            for m, t in tuned.items()
        },  # fmt: skip
        "scores": {m: _summary(per_image, m) for m in methods},
    }
    cache.write_text(json.dumps(out, indent=1))
    return out


def _summary(df, method: str) -> dict[str, Any]:
    rows = df[df.method == method]
    return {
        "psnr_db": float(rows.psnr.mean()),
        "ssim": float(rows.ssim.mean()),
        "psnr_db_per_image": [round(float(v), 3) for v in rows.psnr],
    }


def run(args) -> dict:
    params = args.params or PARAMS["cuda" if args.device.startswith("cuda") else "cpu"]
    settings = yaml.safe_load(params.read_text()) or {}
    settings.setdefault("test_data", str(TEST_SPLIT / "test"))
    applied = apply_overrides(settings, args.set)
    settings["device"] = args.device
    if args.threads:  # --threads N: the training's threads too (fit sets them)
        settings["threads"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
        out = Path(args.keep or tmp)
        if args.quick:  # smoke sizes, on a split of its own (kept with --keep)
            synthesize(out / "data", 2, 2, size=64, seed=0, progress=False)
            settings.update(model_size="tiny", num_epochs=1, batch_size=2, crop_size=32)
            settings.update(epoch_size=4, max_steps_per_epoch=2, test_data=f"{out}/data/test")
        test_dir = Path(settings["test_data"])
        if test_dir == TEST_SPLIT / "test" and not test_dir.is_dir():
            synthesize(TEST_SPLIT, n_train=16, n_test=60, size=256, seed=0)
        cfg = TrainConfig(
            **{
                **settings,
                "registered_model_name": None,
                "log_model": False,
                "out_dir": str(out / "run"),
                "tracking_uri": f"sqlite:///{out / 'mlflow.db'}",
                "experiment": "bench-quality",
            }
        )
        t0 = time.perf_counter()
        result = fit(cfg)
        train_s = time.perf_counter() - t0
        if result.last_checkpoint is None:
            raise SystemExit(f"the run wrote no last.pt ({result.stop_reason}): {result.message}")
        model, _ = load_model(str(result.last_checkpoint), map_location=args.device)
        model = model.float().eval()
        t0 = time.perf_counter()
        test = classical.load_samples(test_dir, 2 if args.quick else None)
        methods = {
            "blurred": lambda s: s.blur,
            "model": classical.model_restorer(model, args.device),
        }
        per_image, _ = classical.evaluate_methods(test, methods)
        eval_s = time.perf_counter() - t0
    scores = {m: _summary(per_image, m) for m in methods}
    if not args.no_classical and not args.quick:
        baselines = classical_scores(test_dir, args.n_tune)
        scores |= {m: v for m, v in baselines["scores"].items() if m != "blurred"}
    model_db, blurred_db = scores["model"]["psnr_db"], scores["blurred"]["psnr_db"]
    best_classical = max(
        ((m, v["psnr_db"]) for m, v in scores.items() if m not in ("model", "blurred")),
        key=lambda kv: kv[1],
        default=(None, float("nan")),
    )
    cfg_dict = {k: v for k, v in cfg.to_dict().items() if k not in ("tracking_uri", "out_dir")}
    return {
        "command": " ".join(["python benchmarks/quality.py", *sys.argv[1:]]),
        "params": str(params),
        "overrides": applied,
        "train_config": cfg_dict,
        "timing_s": {"fit": train_s, "eval": eval_s},
        "fit": {
            "stop_reason": result.stop_reason,
            "epochs_completed": result.epochs_completed,
            "global_step": result.global_step,
            "skipped_steps": result.skipped_steps,
            "rollbacks": result.rollbacks,
            "scored": "last.pt",  # results without this key scored the best epoch
            "best_epoch": result.best_epoch,
            "best_val_psnr_db": result.best_psnr,
            "train_images_per_s_incl_validation": result.global_step * cfg.batch_size / train_s,
            "history": result.history,
        },
        "test": {"n_images": len(test), "split": str(test_dir), **scores},
        "gains": {
            "model_minus_blurred_db": model_db - blurred_db,
            "best_classical": best_classical[0],
            "model_minus_best_classical_db": model_db - best_classical[1],
        },
        "goal": {
            "model_minus_blurred_min_db": GOAL_GAIN_DB,
            "beats_best_classical": True,
            "met": model_db - blurred_db >= GOAL_GAIN_DB and model_db > best_classical[1],
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = _common.parser(__doc__.splitlines()[0], "quality")
    ap.add_argument(
        "--params", type=Path, default=None,
        help="a training YAML (default: params/pretrain.yaml, params/gpu.yaml on CUDA)",
    )  # fmt: skip
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--name", default=None, help="results/quality_<name>.json")
    ap.add_argument("--keep", type=Path, default=None, help="keep checkpoints and MLflow here")
    ap.add_argument("--n_tune", type=int, default=8, help="train pairs to tune classical on")
    ap.add_argument("--no_classical", action="store_true", help="model and blurred only")
    args = _common.setup(ap, argv)
    if args.name and args.out == _common.RESULTS / "quality.json":
        args.out = _common.RESULTS / f"quality_{args.name}.json"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    _common.write(args, run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
