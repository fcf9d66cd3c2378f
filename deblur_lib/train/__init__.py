"""The training harness: configuration, the loop, checkpoints, tracking and DDP.

``fit(TrainConfig(...))`` from Python, ``python -m deblur_lib.train --help`` from a shell.
Modules: ``config`` (TrainConfig and its checks), ``loop`` (fit: the one training loop),
``build`` (what fit trains with), ``threads`` (CPU threads on a shared machine), ``ema`` (the
weight average), ``export`` (ship a checkpoint with its model card),
``checkpoint`` (training state and the run folder), ``tracking`` (MLflow that never logs a
non-finite metric), ``distributed`` (torchrun/DDP plumbing), ``faults`` (deterministic fault
injection that wraps what the loop calls), ``legacy`` (the seed's original loss, metrics and
evaluation, for ``--guards off``), ``figures`` (the PNGs a finished run logs), ``__main__``
(the command line). Needs the ``[train]`` extra (MLflow, matplotlib, scikit-image, tqdm).
"""

from deblur_lib.train.config import TrainConfig
from deblur_lib.train.loop import STOP_REASONS, TrainResult, fit

__all__ = ["STOP_REASONS", "TrainConfig", "TrainResult", "fit"]
