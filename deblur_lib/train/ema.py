"""An exponential moving average (EMA) of the model's weights, kept without a host sync.

BasicSR and NAFNet validate and ship an EMA of the weights (``net_g_ema``): it smooths the
last steps' noise, usually worth a few tenths of a dB. ``--ema D`` keeps one with decay D
(warmed up as ``min(D, (1 + n) / (10 + n))`` after n updates, so early averages do not drag
the random initialisation along). Every optimizer step updates it on the device with the
step's 0-d ``ok`` flag as a factor, so a step the guard skipped leaves it exactly unchanged
and no Python branch reads the flag. Validation, ``best.pt``, the registered model and the
returned model are the average; checkpoints hold it beside the raw weights, which training
continues from.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn


class WeightAverage:
    """EMA of ``model``'s parameters (buffers copied), in ``self.model`` (eval mode, no grad)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay!r}")
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, ok: Tensor) -> None:
        """One step: ``ema += w * (param - ema)``, ``w = (1 - decay) * ok`` (0-d tensor on the
        parameters' device; False: unchanged). No host sync."""
        self.updates += 1  # host-side count: every step, skipped or not
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        weight = ok.to(torch.float32) * (1.0 - decay)
        averaged = list(self.model.parameters())
        diff = torch._foreach_sub([p.detach() for p in model.parameters()], averaged)
        torch._foreach_mul_(diff, weight)
        torch._foreach_add_(averaged, diff)
        for mine, theirs in zip(self.model.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
