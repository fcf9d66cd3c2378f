"""Device-side finite checks, a sync-free step skip, and a locator for the first NaN.

Everything except :class:`NanDetector` and :meth:`StepGuard.read` runs without a
host-device sync: flags are 0-d bool tensors on the device, counters are device
tensors, and the training loop reads them once per logging interval.

Skipping an optimizer step without a sync (:func:`masked_step`)
---------------------------------------------------------------
``if not ok: continue`` needs the flag on the host (a sync every step). The step is
instead executed with the decision kept on the device, as ``torch.amp.GradScaler``
does:

* **Fused optimizers** (``AdamW(fused=True)``, also ``Adam``/``SGD``/``Adagrad``;
  supported on CPU and CUDA in torch >= 2.4): GradScaler's protocol. The optimizer
  reads a float32 ``optimizer.found_inf`` tensor; the fused kernel returns early
  when it is 1.0 and the step counter is incremented and then decremented by
  ``found_inf``. Parameters, ``exp_avg``, ``exp_avg_sq`` and ``step`` stay bitwise
  unchanged, weight decay included, at no extra memory. This is the default path.
* **Other optimizers** (fallback): snapshot and select. Parameters and every
  tensor in the optimizer state are copied, the step runs, and each tensor is set
  to ``torch.where(found_inf, snapshot, new)``; state created by this step (the
  first step) is reset to zeros, which is Adam's initial state. Costs one copy of
  the parameters and the state. Zeroing the gradients instead is *not* a skip
  for Adam: the moments decay, ``step`` advances and weight decay still applies.
  It is sync-free only when the state lives on the flag's device: on CUDA that
  means ``capturable=True`` (non-capturable Adam keeps ``step`` on the CPU and
  reads it with ``.item()``); otherwise the flag is copied to the CPU (a sync).

``torch.lerp`` cannot do the select: ``p + w * (snap - p)`` is NaN when ``p`` is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

_COUNTERS = ("steps", "skipped_total", "consecutive_bad", "max_consecutive_bad")


def all_finite(*tensors: Tensor) -> Tensor:
    """0-d bool tensor (on the first tensor's device): every element of every tensor is finite.

    Any shape and dtype (integer tensors are always finite, empty tensors count as finite).
    No host sync.
    """
    if not tensors:
        raise ValueError("all_finite() needs at least one tensor")
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"all_finite(): argument {i} is {type(t).__name__}, not a Tensor")
    device = tensors[0].device
    ok = torch.isfinite(tensors[0]).all()
    for t in tensors[1:]:
        ok = torch.logical_and(ok, torch.isfinite(t).all().to(device, non_blocking=True))
    return ok


def _grads(parameters: Iterable[Tensor] | Tensor) -> list[Tensor]:
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    return [p.grad for p in parameters if p.grad is not None]


def grads_finite(parameters: Iterable[Tensor] | Tensor) -> Tensor:
    """0-d bool tensor: every existing ``.grad`` of ``parameters`` is finite (params without
    a grad are ignored; no grads at all gives True on the CPU). No host sync.

    Uses the max-abs norm per tensor (``torch._foreach_norm(grads, inf)``), which is NaN when
    a tensor holds a NaN and inf when it holds an inf, and never overflows (an L2 norm of
    large finite values can).
    """
    grads = _grads(parameters)
    if not grads:
        return torch.ones((), dtype=torch.bool)
    device = grads[0].device
    norms = torch._foreach_norm(grads, math.inf)
    stacked = torch.stack([n.to(device, non_blocking=True) for n in norms])
    return torch.isfinite(stacked).all()


def grad_norm_and_finite(
    parameters: Iterable[Tensor] | Tensor, max_norm: float | None
) -> tuple[Tensor, Tensor]:
    """Total L2 gradient norm (0-d float tensor, before clipping) and a 0-d bool "finite" flag.

    Clips in place like ``torch.nn.utils.clip_grad_norm_(parameters, max_norm)`` when
    ``max_norm`` is a positive number; ``None`` or ``0`` only measures. No host sync
    (``error_if_nonfinite=False``). A non-finite norm (a NaN/inf grad, or an L2 overflow of
    huge finite grads) gives ``finite == False``; the clipped grads are then NaN or 0, so the
    step must be skipped (:func:`masked_step`).
    """
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    if max_norm is not None and not (max_norm >= 0 and math.isfinite(max_norm)):
        raise ValueError(f"max_norm must be a finite number >= 0 or None, got {max_norm!r}")
    if max_norm:
        total = nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=False)
    else:
        grads = _grads(params)
        if not grads:
            total = torch.zeros(())
        else:
            device = grads[0].device
            norms = [n.to(device, non_blocking=True) for n in torch._foreach_norm(grads)]
            total = torch.linalg.vector_norm(torch.stack(norms))
    return total, torch.isfinite(total)


def all_ranks_ok(ok: Tensor) -> Tensor:
    """AND of a 0-d bool flag over all DDP ranks (all-reduce MIN; async on the device, no host
    sync). Without an initialized process group, returns ``ok`` unchanged."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return ok
    flag = ok.to(torch.int32)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return flag.to(torch.bool)


def _state_tensors(optimizer: torch.optim.Optimizer) -> dict[tuple[int, str], Tensor]:
    out = {}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                out[(id(p), key)] = value
    return out


def masked_step(optimizer: torch.optim.Optimizer, found_inf: Tensor) -> None:
    """``optimizer.step()`` that is a no-op where ``found_inf`` (0-d tensor, nonzero/True =
    skip) says so, decided on the device: no host sync. See the module docstring.

    A skipped step leaves parameters and optimizer state (moments, step count) unchanged;
    a taken step is exactly ``optimizer.step()``.
    """
    if not isinstance(found_inf, Tensor) or found_inf.dim() != 0:
        shape = tuple(found_inf.shape) if isinstance(found_inf, Tensor) else type(found_inf)
        raise TypeError(f"found_inf must be a 0-d tensor, got {shape}")
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        had = hasattr(optimizer, "found_inf")
        previous = getattr(optimizer, "found_inf", None)
        optimizer.found_inf = found_inf.to(torch.float32)
        try:
            optimizer.step()
        finally:
            if had:
                optimizer.found_inf = previous
            else:
                del optimizer.found_inf
        return
    skip = found_inf.to(torch.bool)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    param_snaps = [p.detach().clone() for p in params]
    state_snaps = {k: v.clone() for k, v in _state_tensors(optimizer).items()}
    optimizer.step()
    with torch.no_grad():
        for p, snap in zip(params, param_snaps, strict=True):
            p.copy_(torch.where(skip.to(p.device, non_blocking=True), snap, p))
        for key, value in _state_tensors(optimizer).items():
            snap = state_snaps.get(key)
            if snap is None:
                snap = torch.zeros_like(value)
            value.copy_(torch.where(skip.to(value.device), snap, value))


class StepGuard:
    """Device-side counters of skipped (non-finite) optimizer steps.

    ``steps``: steps seen; ``skipped_total``: steps skipped; ``consecutive_bad``: current run
    of skipped steps (0 after a good one); ``max_consecutive_bad``: longest run since creation,
    :meth:`reset_streak` or :meth:`reset_max` (what a periodic check must judge: a run that
    ended between two reads is gone from ``consecutive_bad``). All are 0-d int64 tensors on
    ``device`` (moved to the flag's device on the first :meth:`update`).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        for name in _COUNTERS:
            setattr(self, name, torch.zeros((), dtype=torch.int64, device=device))

    @property
    def device(self) -> torch.device:
        return self.steps.device

    def to(self, device: torch.device | str) -> StepGuard:
        for name in _COUNTERS:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def update(self, ok: Tensor) -> None:
        """Count one step; ``ok`` is a 0-d bool tensor (False = the step was skipped). No sync."""
        if not isinstance(ok, Tensor) or ok.dim() != 0 or ok.dtype != torch.bool:
            got = f"{ok.dtype} {tuple(ok.shape)}" if isinstance(ok, Tensor) else type(ok).__name__
            raise TypeError(f"StepGuard.update(ok): ok must be a 0-d bool tensor, got {got}")
        if ok.device != self.device:
            self.to(ok.device)
        bad = torch.logical_not(ok).to(torch.int64)
        self.steps.add_(1)
        self.skipped_total.add_(bad)
        self.consecutive_bad.add_(bad).mul_(bad)
        torch.maximum(self.max_consecutive_bad, self.consecutive_bad, out=self.max_consecutive_bad)

    def reset_streak(self) -> None:
        """Zero ``consecutive_bad`` and ``max_consecutive_bad`` (e.g. after a rollback)."""
        self.consecutive_bad.zero_()
        self.max_consecutive_bad.zero_()

    def reset_max(self) -> None:
        """Start a new observation window: ``max_consecutive_bad`` becomes the current run's
        length, so a run that goes on past the window's end still counts in the next one. Call
        after each :meth:`read` that judges the longest run; no sync."""
        self.max_consecutive_bad.copy_(self.consecutive_bad)

    def read(self) -> dict[str, int]:
        """The counters as ints. One host sync: call at the logging interval only."""
        values = torch.stack([getattr(self, name) for name in _COUNTERS]).tolist()
        return dict(zip(_COUNTERS, values, strict=True))

    def state_dict(self) -> dict[str, int]:
        return self.read()

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        missing = [name for name in _COUNTERS if name not in state]
        if missing:
            raise ValueError(f"StepGuard state is missing {missing}; got keys {sorted(state)}")
        for name in _COUNTERS:
            getattr(self, name).fill_(int(state[name]))


def _iter_tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _iter_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _iter_tensors(value)


def _finite(obj: Any) -> bool:
    """Host bool (syncs): every floating tensor inside ``obj`` is finite."""
    tensors = [t for t in _iter_tensors(obj) if t.is_floating_point() or t.is_complex()]
    return all(bool(torch.isfinite(t.detach()).all()) for t in tensors)


def first_nonfinite_grad(model: nn.Module) -> str | None:
    """Name of the first parameter (``named_parameters`` order) whose grad is not finite,
    or None. Diagnostic only (syncs)."""
    for name, p in model.named_parameters():
        if p.grad is not None and not _finite(p.grad):
            return name
    return None


class NanDetector:
    """Context manager that names the first module whose forward output is not finite.

    Registers a forward hook on every module (``named_modules``, root included as
    ``"<root>"``) and a pre-hook on the root for the model's input. Hooks fire when a module's
    forward returns, so the first hit in execution order is the innermost, earliest module.
    Outputs may be tensors or nested tuple/list/dict of tensors. Diagnostic only: every hook
    syncs. Hooks are removed on exit::

        with NanDetector(model) as det:
            model(blur)
        print(det.report())
    """

    ROOT = "<root>"

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"NanDetector needs an nn.Module, got {type(model).__name__}")
        self.model = model
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.reset()

    def reset(self) -> None:
        """Forget what was found (to check another forward with the same hooks)."""
        self.first_nonfinite: str | None = None
        self.inputs_finite: bool | None = None
        self.params_finite: bool | None = None
        self.model_input_finite: bool | None = None

    def __enter__(self) -> NanDetector:
        self._handles.append(self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        for name, module in self.model.named_modules():
            hook = self._make_hook(name or self.ROOT)
            self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.model_input_finite is None:
            self.model_input_finite = _finite((args, kwargs))

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self.first_nonfinite is not None or _finite(output):
                return
            self.first_nonfinite = name
            self.inputs_finite = _finite((args, kwargs))
            self.params_finite = _finite(list(module.parameters(recurse=False)))

        return hook

    def report(self) -> str:
        """One line saying where the first non-finite value appeared."""
        if self.model_input_finite is False:
            where = f" (first non-finite output: `{self.first_nonfinite}`)"
            return "input to the model was already non-finite" + (
                where if self.first_nonfinite else ""
            )
        if self.first_nonfinite is None:
            if self.model_input_finite is None:
                return "no forward pass was observed"
            return "all module outputs were finite"
        msg = f"first non-finite output at `{self.first_nonfinite}`"
        if self.params_finite is False:
            return msg + " (its parameters are non-finite)"
        if self.inputs_finite:
            return msg + " (inputs were finite)"
        return (
            msg + " (its inputs were already non-finite: produced by a functional op in the "
            "parent's forward)"
        )
