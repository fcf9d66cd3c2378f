"""deblur-guard: image-deblurring training that never fails silently.

The core, importable with only torch, numpy, pillow and pytorch-msssim installed: guarded
losses (``losses``), batched metrics (``metrics``), device-side guards (``guards``), guarded
evaluation (``evaluate``), the model (``models``), paired data (``data``, ``synth``) and
weights on disk (``weights``). The training harness is ``deblur_lib.train`` (``[train]``
extra); what only the notebooks use is ``deblur_lib.notebook`` (``[notebooks]`` extra).
Layers import one way: notebook -> train -> core.
"""

from deblur_lib.data import DatasetError, PairedImageFolder, load_image, make_loader, synthesize
from deblur_lib.degrade import DegradeParams
from deblur_lib.evaluate import EvalReport, evaluate
from deblur_lib.guards import NanDetector, StepGuard
from deblur_lib.losses import CharbonnierLoss, CombinedLoss, MSSSIMLoss
from deblur_lib.metrics import PSNR_CAP_DB, MetricError, calculate_metrics, denormalize, psnr, ssim
from deblur_lib.models import MODEL_PRESETS, DeblurNet, build_model, count_parameters
from deblur_lib.synth import SyntheticPairs

__version__ = "0.2.0"
__all__ = [
    "MODEL_PRESETS",
    "PSNR_CAP_DB",
    "CharbonnierLoss",
    "CombinedLoss",
    "DatasetError",
    "DeblurNet",
    "DegradeParams",
    "EvalReport",
    "MSSSIMLoss",
    "MetricError",
    "NanDetector",
    "PairedImageFolder",
    "StepGuard",
    "SyntheticPairs",
    "build_model",
    "calculate_metrics",
    "count_parameters",
    "denormalize",
    "evaluate",
    "load_image",
    "make_loader",
    "psnr",
    "ssim",
    "synthesize",
]
