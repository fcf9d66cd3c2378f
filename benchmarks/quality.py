"""Benchmark: test-set PSNR/SSIM after a fixed training budget vs classical deconvolution.
Issue 6, item 5.

    python benchmarks/quality.py                  # CPU: the demo's settings (~10-15 min)
    python benchmarks/quality.py --device cuda    # GPU: params/gpu.yaml (<= 20 min on an H100)

Settings: the defaults of the ``parameters`` cell of ``notebooks/05_train.ipynb`` (what
``make demo`` runs: the README's demo budget), overridden on ``--device cuda`` by
``params/gpu.yaml`` (``_common.gpu_params``: ``GPU_FALLBACK`` when that file is missing), or by
``--params FILE`` when given (e.g. ``--params params/cpu.yaml``, the hour-long CPU run), then
by ``--set KEY=VALUE`` (e.g. ``--set alpha=0.84 --set beta=0.16``: the seed's loss weights).
The files are papermill parameter files: notebook parameter names (``n_train``,
``image_size``, ``steps_per_epoch``, ...) or ``TrainConfig`` field names.

The dataset is ``synthesize(n_train, n_test, image_size, seed)`` under ``data/bench_quality/``
(git-ignored, reused). Training is ``deblur_lib.train.fit`` (guards on; MLflow to a temporary
sqlite store, checkpoints to a temporary folder). Then every test image is restored by the best
checkpoint, by scikit-image Wiener and Richardson-Lucy given the TRUE kernel (parameters
grid-searched on ``n_tune`` training pairs, ``deblur_lib.classical``), and left blurred; PSNR
and SSIM per image with ``deblur_lib.metrics`` (the notebooks' ``evaluate_methods``).
Target (GPU budget): model >= blurred + 6 dB and >= Richardson-Lucy + 1 dB.
"""

from __future__ import annotations

import ast
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _common  # first: puts the repo on sys.path when run as a script
import torch
import yaml

from deblur_lib.data import synthesize
from deblur_lib.notebook import classical
from deblur_lib.train.config import TrainConfig

NOTEBOOK = _common.REPO / "notebooks" / "05_train.ipynb"
DATA = _common.REPO / "data" / "bench_quality"
# without notebooks/05_train.ipynb: the small preset, a few epochs (~10 min on 2 idle cores)
CPU_FALLBACK = {
    "n_train": 240,
    "n_test": 16,
    "image_size": 256,
    "model_size": "small",
    "num_epochs": 12,
    "batch_size": 8,
    "crop_size": 128,
    "learning_rate": 2e-3,
    "scheduler": "cosine",
    "warmup_steps": 30,
    "alpha": 0.16,
    "beta": 0.84,
}
# notebook parameter name -> (TrainConfig field, value that means "None")
RENAMED = {"steps_per_epoch": ("max_steps_per_epoch", 0)}
NONE_VALUES = {"model_width": 0, "num_workers": -1, "steps_per_epoch": 0}
DATA_KEYS = ("n_train", "n_test", "image_size", "n_tune")


def notebook_defaults(path: Path = NOTEBOOK) -> dict[str, Any]:
    """Name -> default of the notebook's ``parameters`` cell (literal assignments only)."""
    cells = json.loads(path.read_text())["cells"]
    source = next(
        "".join(c["source"]) for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])
    )
    out = {}
    for node in ast.parse(source).body:
        target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
        if isinstance(target, ast.Name) and getattr(node, "value", None) is not None:
            out[target.id] = ast.literal_eval(node.value)
    return out


def resolve_params(device: str, params_file: Path | None) -> tuple[dict[str, Any], list[str]]:
    """The settings and where each layer came from (see the module docstring)."""
    sources, settings = [], {"n_tune": 6}
    if NOTEBOOK.is_file():
        settings.update(notebook_defaults())
        sources.append(str(NOTEBOOK.relative_to(_common.REPO)) + " parameters cell")
    else:
        settings.update(CPU_FALLBACK)
        sources.append("benchmarks/quality.py CPU_FALLBACK (notebooks/05_train.ipynb not found)")
    if params_file is not None:
        if not params_file.is_file():
            raise FileNotFoundError(f"--params {params_file}: no such file")
        settings.update(yaml.safe_load(params_file.read_text()) or {})
        sources.append(str(params_file))
    elif device == "cuda":
        gpu, source = _common.gpu_params()
        settings.update(gpu)
        sources.append(source)
    settings["device"] = device
    return settings, sources


def train_config(settings: dict[str, Any], data_dir: Path, out_dir: Path) -> TrainConfig:
    fields = set(TrainConfig.__dataclass_fields__)
    kwargs: dict[str, Any] = {}
    for name, value in settings.items():
        if name in NONE_VALUES and value == NONE_VALUES[name]:
            value = None
        field = RENAMED.get(name, (name,))[0]
        if field in fields:
            kwargs[field] = value
    kwargs.update(
        train_data=str(data_dir / "train"),
        test_data=str(data_dir / "test"),
        out_dir=str(out_dir / "run"),
        tracking_uri=f"sqlite:///{out_dir / 'mlflow.db'}",
        experiment="bench-quality",
        registered_model_name=None,
    )
    return TrainConfig(**kwargs)


def _summary(df, method: str) -> dict[str, Any]:
    rows = df[df.method == method]
    return {
        "psnr_db": float(rows.psnr.mean()),
        "ssim": float(rows.ssim.mean()),
        "psnr_db_per_image": [round(float(v), 3) for v in rows.psnr],
    }


def apply_overrides(settings: dict[str, Any], pairs: Sequence[str]) -> list[str]:
    """Apply ``KEY=VALUE`` pairs (VALUE read as YAML: ``0.16``, ``true``, ``cosine``) to
    ``settings`` in place; KEY must be a known setting or a ``TrainConfig`` field."""
    known = set(settings) | set(TrainConfig.__dataclass_fields__)
    applied = []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in known:
            raise ValueError(
                f"--set {pair!r}: expected KEY=VALUE with KEY a notebook parameter or "
                f"TrainConfig field, e.g. --set alpha=0.84"
            )
        settings[key] = yaml.safe_load(text)
        applied.append(f"{key}={settings[key]!r}")
    return applied


def run(args) -> dict:
    settings, sources = resolve_params(args.device, args.params)
    if args.set:
        sources.append("--set " + " ".join(apply_overrides(settings, args.set)))
    if args.quick:
        settings.update(n_train=4, n_test=2, image_size=64, model_size="tiny", num_epochs=1)
        settings.update(batch_size=2, crop_size=32, steps_per_epoch=2, n_tune=1)
    n_train, n_test, size = (int(settings[k]) for k in ("n_train", "n_test", "image_size"))
    seed = int(settings.get("seed", 0))
    data_dir = args.data_dir or DATA / f"n{n_train}_t{n_test}_s{size}_seed{seed}"
    t0 = time.perf_counter()
    synthesize(data_dir, n_train, n_test, size=size, seed=seed, progress=False)
    synth_s = time.perf_counter() - t0
    from deblur_lib.train import fit

    with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
        cfg = train_config(settings, data_dir, Path(tmp))
        t0 = time.perf_counter()
        result = fit(cfg)
        train_s = time.perf_counter() - t0
        model = result.model.float().to(torch.device(args.device)).eval()
        t0 = time.perf_counter()
        tuned = {
            m: classical.tune(m, classical.load_samples(data_dir / "train", settings["n_tune"]))
            for m in classical.METHODS
        }
        test = classical.load_samples(data_dir / "test")
        methods = {
            "blurred": lambda s: s.blur,
            "model": classical.model_restorer(model, args.device),
            **{m: classical.restorer(m, t.best) for m, t in tuned.items()},
        }
        per_image, _ = classical.evaluate_methods(test, methods)
        eval_s = time.perf_counter() - t0
    scores = {m: _summary(per_image, m) for m in methods}
    model_db = scores["model"]["psnr_db"]
    gains = {
        "model_minus_blurred_db": model_db - scores["blurred"]["psnr_db"],
        "model_minus_richardson_lucy_db": model_db - scores["richardson_lucy"]["psnr_db"],
        "model_minus_wiener_db": model_db - scores["wiener"]["psnr_db"],
    }
    cfg_dict = {k: v for k, v in cfg.to_dict().items() if k not in ("tracking_uri", "out_dir")}
    return {
        "settings_from": sources,
        "settings": settings,
        "train_config": cfg_dict,
        "data_dir": str(data_dir),
        "timing_s": {"synthesize": synth_s, "fit": train_s, "classical_and_eval": eval_s},
        "fit": {
            "stop_reason": result.stop_reason,
            "epochs_completed": result.epochs_completed,
            "global_step": result.global_step,
            "skipped_steps": result.skipped_steps,
            "rollbacks": result.rollbacks,
            "best_epoch": result.best_epoch,
            "best_val_psnr_db": result.best_psnr,
            "train_images_per_s_incl_validation": result.global_step * cfg.batch_size / train_s,
            "history": result.history,
        },
        "classical_tuning": {
            m: {"param": t.param_name, "best": t.best, "train_psnr_db": t.scores}
            for m, t in tuned.items()
        },
        "test": {"n_images": len(test), **scores},
        "gains": gains,
        "target": {
            "applies_to": "GPU budget (params/gpu.yaml); CPU figures are reported",
            "model_minus_blurred_min_db": 6.0,
            "model_minus_richardson_lucy_min_db": 1.0,
            "met": gains["model_minus_blurred_db"] >= 6.0
            and gains["model_minus_richardson_lucy_db"] >= 1.0,
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = _common.parser(__doc__.splitlines()[0], "quality")
    ap.add_argument("--params", type=Path, default=None, help="a papermill parameter YAML")
    ap.add_argument("--data_dir", type=Path, default=None, help="default data/bench_quality/...")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting"
    )
    args = _common.setup(ap, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    _common.write(args, run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
