"""The MLflow pyfunc of a model ``Tracker.log_model`` registers (models-from-code).

MLflow copies this file into the logged model and executes it when someone calls
``mlflow.pyfunc.load_model``; the package never imports it (it needs mlflow). It rebuilds the
net from the model's ``config`` and ``weights`` artifacts with
``deblur_lib.weights.load_from_files`` (SHA-256 checked, ``torch.load(weights_only=True)``),
so loading through MLflow does not unpickle either.

``predict``: a model-space float32 array (N, 3, H, W) in [-1, 1] -> the restored array, same
shape, clamped to [-1, 1] (``deblur_lib.predict.deblur``).
"""

from __future__ import annotations

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel

from deblur_lib.models import load_from_files
from deblur_lib.predict import deblur


class DeblurPyfunc(PythonModel):
    # MLflow's type-hint validation cannot express (N, 3, H, W) arrays (it warns at every
    # load); the explicit tensor signature that Tracker.log_model logs is what serving checks
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        self.model, self.info = load_from_files(
            context.artifacts["weights"], context.artifacts["config"], kind="registry"
        )

    def predict(self, context, model_input, params=None):
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        return deblur(self.model, x).numpy()


mlflow.models.set_model(DeblurPyfunc())
