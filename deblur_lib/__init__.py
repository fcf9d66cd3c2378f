"""deblur-guard: image-deblurring training that never fails silently.

Public API (see ../shared/DESIGN.md). Names are re-exported lazily so that
``import deblur_lib`` stays cheap and a notebook imports only what it uses.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "data": ["PairedImageFolder", "DatasetError", "load_image", "make_loader", "synthesize"],
    "models": ["DeblurNet", "MODEL_PRESETS", "build_model", "count_parameters"],
    "losses": ["CharbonnierLoss", "MSSSIMLoss", "CombinedLoss"],
    "metrics": ["psnr", "ssim", "calculate_metrics", "denormalize", "MetricError", "PSNR_CAP_DB"],
    "evaluate": ["evaluate", "EvalReport"],
    "predict": ["deblur"],
    "weights": ["load_model", "WeightsError"],
    "train": ["TrainConfig", "TrainResult", "fit"],
    "tracking": ["Tracker"],
    "guards": ["NanDetector", "StepGuard"],
    "faults": ["FaultInjector", "parse_faults"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'deblur_lib' has no attribute {name!r}")
    return getattr(importlib.import_module(f"deblur_lib.{module}"), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
