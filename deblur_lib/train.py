"""The training loop: ``fit(cfg) -> TrainResult``, and ``python -m deblur_lib.train``.

One epoch, in nanoGPT's order: seed the epoch, then per step: forward (optional bf16
autocast), loss, backward, clip and measure the gradient norm, skip-or-step, zero grads, and
every ``log_every`` steps read the device-side guard counters (the loop's only sync point).
Then: evaluate, step the scheduler on a valid PSNR, checkpoint (atomic, finite weights only),
log the epoch to MLflow.

Guards on (default): a step whose loss or gradients are not finite is skipped on the device
(``guards.masked_step``; under DDP the flag is all-reduced first, so every rank skips the same
steps) and counted. More than ``max_bad_steps`` consecutive skips: roll back to ``last.pt``
with the LR halved; more than ``max_rollbacks`` rollbacks: stop, naming the first module whose
output was non-finite. ``max_invalid_epochs`` consecutive invalid validations: stop.
Guards off: the original loop (stock MS-SSIM loss, seed-style evaluation, metrics logged and
fed to the scheduler as they come) for the notebooks' "before" runs.

Every run ends with one line naming its ``stop_reason`` (see ``STOP_REASONS``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from deblur_lib import distributed
from deblur_lib.cli import TrainConfig, main

__all__ = ["STOP_REASONS", "TrainConfig", "TrainResult", "fit", "main"]


STOP_REASONS = {
    "completed": "every epoch ran",
    "rollbacks_exhausted": "non-finite steps kept coming after --max_rollbacks rollbacks",
    "invalid_epochs": "--max_invalid_epochs consecutive validations were invalid",
    "nonfinite_weights": "the weights became non-finite (guards on)",
}


@dataclass
class TrainResult:
    """What ``fit`` returns. ``best_psnr`` is NaN and ``best_epoch`` None without a valid epoch;
    ``history`` holds one dict per epoch (the logged record); ``model`` (the raw module, eval
    mode) holds the best checkpoint's weights when there is one, else the final weights."""

    stop_reason: str
    message: str
    epochs_completed: int
    global_step: int
    best_psnr: float
    best_epoch: int | None
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    run_id: str | None
    skipped_steps: int
    rollbacks: int
    history: list[dict[str, float]] = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.stop_reason == "completed"


def fit(cfg: TrainConfig) -> TrainResult:
    """Train as ``cfg`` says (see the module docstring); ValueError if ``cfg`` is invalid."""
    cfg.validate()
    ctx, device = distributed.setup(cfg.device)
    from deblur_lib.trainer import Trainer  # imports this module: import it late

    try:
        return Trainer(cfg, ctx, device).run()
    finally:
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
