"""Deterministic fault injection, to reproduce the NaN and metric failures on demand.

Grammar (several specs joined by ``;``)::

    KIND@step=N[,count=M][,rank=R]       training faults, N = 0-based global step;
                                         fires at steps N .. N+M-1 (count defaults to 1),
                                         on every rank or only on DDP rank R
    KIND@epoch=E[,batches=K|all]         validation faults, E = the epoch number the
                                         caller passes; fires on validation batches
                                         0 .. K-1 (batches defaults to 1) or on all

Examples: ``nan_output@step=40``, ``nan_grad@step=10,count=8,rank=1``,
``val_metric_error@epoch=2,batches=all;nan_loss@step=5``.

What each kind writes (model space; the caller's tensor is never modified, a clone is
returned, except for ``nan_grad``):

=====================  ==========================================================
``nan_input``          blur[0, :, 0, 0] = NaN (one pixel, all channels, first sample)
``inf_input``          blur[0, :, 0, 0] = +inf
``const_input``        blur[0] = 0.0: the first sample becomes a constant frame
                       (zero std, the "divide by std" NaN source)
``nan_target``         sharp[0, :, 0, 0] = NaN
``inf_target``         sharp[0, :, 0, 0] = +inf
``nan_output``         out[0, :, 0, 0] = NaN (the clone stays in the autograd graph)
``inf_output``         out[0, :, 0, 0] = +inf
``nan_loss``           loss * NaN: the loss and every gradient from it are NaN
                       (as when MS-SSIM returns NaN)
``nan_grad``           in place: element 0 of the first parameter's ``.grad`` that
                       exists = NaN (call after backward)
``val_nan_output``     out[0, :, 0, 0] = NaN, on a validation batch
``val_inf_output``     out[0, :, 0, 0] = +inf, on a validation batch
``val_metric_error``   ``val_metric`` raises :class:`InjectedMetricError`, a
                       ``ValueError`` with skimage's "win_size exceeds image extent"
=====================  ==========================================================

Aliases: ``constant_frame`` = ``const_input``, ``metric_error`` = ``val_metric_error``.

The injector decides from the step/epoch/batch ints alone (never from tensor values, so
no host sync) and is a pure function of them: replaying a step (after a rollback that
restores the step counter) fires its fault again.

The training loop carries no injection calls: :func:`instrument` wraps what it calls (the
training forward, the training loader, the loss, the evaluation model and the metric
function) and hooks the first parameter's gradient; without specs it returns them unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

TRAIN_KINDS = (
    "nan_input",
    "inf_input",
    "nan_target",
    "inf_target",
    "const_input",
    "nan_output",
    "inf_output",
    "nan_loss",
    "nan_grad",
)
VAL_KINDS = ("val_nan_output", "val_inf_output", "val_metric_error")
ALIASES = {"constant_frame": "const_input", "metric_error": "val_metric_error"}
GRAMMAR = (
    "fault spec grammar: KIND@step=N[,count=M][,rank=R] for training kinds "
    f"({', '.join(TRAIN_KINDS)}) or KIND@epoch=E[,batches=K|all] for validation kinds "
    f"({', '.join(VAL_KINDS)}); join several with ';', "
    "e.g. 'nan_output@step=40;val_metric_error@epoch=2,batches=all'"
)
_BATCH_KINDS = ("nan_input", "inf_input", "nan_target", "inf_target", "const_input")
_TRAIN_KEYS = {"step": 0, "count": 1, "rank": 0}  # key -> minimum value
_VAL_KEYS = {"epoch": 0, "batches": 1}


class InjectedMetricError(ValueError):
    """Raised by :meth:`FaultInjector.val_metric`, like skimage's SSIM on a too-small image."""


@dataclass(frozen=True)
class FaultSpec:
    """One parsed spec. Training: ``step``/``count``/``rank``; validation: ``epoch``/``batches``
    (``batches=None`` means all batches)."""

    kind: str
    step: int | None = None
    count: int = 1
    rank: int | None = None
    epoch: int | None = None
    batches: int | None = 1

    @property
    def is_train(self) -> bool:
        return self.kind in TRAIN_KINDS

    def fires_at_step(self, step: int, rank: int) -> bool:
        return (
            self.is_train
            and self.step <= step < self.step + self.count
            and (self.rank is None or self.rank == rank)
        )

    def fires_at_batch(self, epoch: int, i: int) -> bool:
        return (
            not self.is_train
            and epoch == self.epoch
            and (self.batches is None or 0 <= i < self.batches)
        )

    def __str__(self) -> str:
        if self.is_train:
            extra = f",count={self.count}" if self.count != 1 else ""
            extra += f",rank={self.rank}" if self.rank is not None else ""
            return f"{self.kind}@step={self.step}{extra}"
        batches = "all" if self.batches is None else str(self.batches)
        extra = f",batches={batches}" if self.batches != 1 else ""
        return f"{self.kind}@epoch={self.epoch}{extra}"


def _error(spec: str, why: str) -> ValueError:
    return ValueError(f"bad fault spec {spec!r}: {why}. {GRAMMAR}")


def _parse_one(text: str) -> FaultSpec:
    if "@" not in text:
        raise _error(text, "missing '@' between the kind and its schedule")
    raw_kind, _, schedule = text.partition("@")
    kind = ALIASES.get(raw_kind.strip().lower(), raw_kind.strip().lower())
    if kind not in TRAIN_KINDS + VAL_KINDS:
        raise _error(text, f"unknown kind {raw_kind.strip()!r}")
    allowed = _TRAIN_KEYS if kind in TRAIN_KINDS else _VAL_KEYS
    required = "step" if kind in TRAIN_KINDS else "epoch"
    values: dict[str, int | None] = {}
    for item in schedule.split(","):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not key or not value:
            raise _error(text, f"expected key=value, got {item.strip()!r}")
        key = key.lower()
        if key not in allowed:
            if key in _TRAIN_KEYS or key in _VAL_KEYS:
                other = "validation" if kind in TRAIN_KINDS else "training"
                why = f"{key}= belongs to {other} kinds; {kind!r} takes {'/'.join(allowed)}="
                if kind in TRAIN_KINDS and f"val_{kind}" in VAL_KINDS:
                    why += f" (for validation use val_{kind}@epoch=E)"
                raise _error(text, why)
            raise _error(text, f"unknown key {key!r}; {kind!r} takes {'/'.join(allowed)}=")
        if key in values:
            raise _error(text, f"{key}= given twice")
        if key == "batches" and value.lower() == "all":
            values[key] = None
            continue
        try:
            number = int(value)
        except ValueError:
            raise _error(text, f"{key}={value!r} is not an integer") from None
        if number < allowed[key]:
            raise _error(text, f"{key} must be >= {allowed[key]}, got {number}")
        values[key] = number
    if required not in values:
        raise _error(text, f"{kind!r} needs {required}=")
    return FaultSpec(kind=kind, **values)


def parse_faults(spec: str | None) -> list[FaultSpec]:
    """Parse ``spec`` (see the module docstring); ``None`` or blank gives ``[]``.

    Raises ValueError naming the bad part, the valid kinds and an example.
    """
    if spec is None:
        return []
    if not isinstance(spec, str):
        raise TypeError(f"fault spec must be a str or None, got {type(spec).__name__}")
    return [_parse_one(part.strip()) for part in spec.split(";") if part.strip()]


def _check_batch(x: Tensor, what: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[0] == 0:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"fault injection needs a (N>=1, C, H, W) {what} tensor, got {shape}")


def _poison(x: Tensor, kind: str, what: str) -> Tensor:
    """Clone of ``x`` with x[0, :, 0, 0] = NaN (kinds with "nan") or +inf."""
    _check_batch(x, what)
    out = x.clone()
    out[0, :, 0, 0] = float("nan") if "nan" in kind else float("inf")
    return out


class FaultInjector:
    """Applies parsed fault specs at their scheduled steps/batches; host-side, no sync.

    ``specs``: a spec string, a list of :class:`FaultSpec`, or None. ``rank``: this process's
    DDP rank (for ``rank=R`` specs). ``.injected[kind]`` counts how many times each scheduled
    kind fired (host ints, one per call that modified something).
    """

    def __init__(self, specs: str | Iterable[FaultSpec] | None = None, rank: int = 0) -> None:
        self.specs = parse_faults(specs) if specs is None or isinstance(specs, str) else list(specs)
        for s in self.specs:
            if not isinstance(s, FaultSpec):
                raise TypeError(f"specs must be FaultSpec objects, got {type(s).__name__}")
        self.rank = rank
        self.injected: dict[str, int] = {s.kind: 0 for s in self.specs}

    def __bool__(self) -> bool:
        return bool(self.specs)

    def _fired(self, kinds: tuple[str, ...], step: int) -> list[str]:
        hits = [s.kind for s in self.specs if s.kind in kinds and s.fires_at_step(step, self.rank)]
        for kind in hits:
            self.injected[kind] += 1
        return hits

    def _fired_val(self, kind: str, epoch: int, i: int) -> bool:
        hit = any(s.kind == kind and s.fires_at_batch(epoch, i) for s in self.specs)
        if hit:
            self.injected[kind] += 1
        return hit

    def batch(self, step: int, blur: Tensor, sharp: Tensor) -> tuple[Tensor, Tensor]:
        """Input/target faults on a (N, 3, H, W) model-space batch; returns (blur, sharp)."""
        for kind in self._fired(_BATCH_KINDS, step):
            if kind == "const_input":
                _check_batch(blur, "blur")
                blur = blur.clone()
                blur[0] = 0.0
            elif kind.endswith("_input"):
                blur = _poison(blur, kind, "blur")
            else:
                sharp = _poison(sharp, kind, "sharp")
        return blur, sharp

    def output(self, step: int, out: Tensor) -> Tensor:
        """``nan_output`` / ``inf_output`` on the (N, 3, H, W) model output."""
        for kind in self._fired(("nan_output", "inf_output"), step):
            out = _poison(out, kind, "output")
        return out

    def loss(self, step: int, loss: Tensor) -> Tensor:
        """``nan_loss``: returns ``loss * NaN`` (graph kept, so the gradients are NaN too)."""
        if self._fired(("nan_loss",), step):
            loss = loss * float("nan")
        return loss

    def grads(self, step: int, model: nn.Module) -> bool:
        """``nan_grad``: NaN into element 0 of the first existing ``.grad``, in place.
        Returns whether it fired."""
        if not any(s.kind == "nan_grad" and s.fires_at_step(step, self.rank) for s in self.specs):
            return False
        param = next((p for p in model.parameters() if p.grad is not None), None)
        if param is None:
            raise ValueError(
                f"nan_grad at step {step}: no parameter has a .grad (call after backward)"
            )
        self._fired(("nan_grad",), step)
        with torch.no_grad():
            param.grad[(0,) * param.grad.dim()] = float("nan")  # any layout (channels_last)
        return True

    def val_output(self, epoch: int, i: int, out: Tensor) -> Tensor:
        """``val_nan_output`` / ``val_inf_output`` on validation batch ``i`` of ``epoch``."""
        for kind in ("val_nan_output", "val_inf_output"):
            if self._fired_val(kind, epoch, i):
                out = _poison(out, kind, "output")
        return out

    def val_metric(self, epoch: int, i: int) -> None:
        """Raise :class:`InjectedMetricError` when ``val_metric_error`` is scheduled here."""
        if self._fired_val("val_metric_error", epoch, i):
            raise InjectedMetricError(
                "win_size exceeds image extent. Either ensure that your images are at least "
                "7x7; or pass win_size explicitly in the function call "
                f"(injected fault val_metric_error at epoch {epoch}, batch {i})"
            )

    def describe(self) -> str:
        """One line for logs: each spec and how often its kind fired so far."""
        if not self.specs:
            return "faults: none"
        parts = [f"{s} (fired {self.injected[s.kind]}x)" for s in self.specs]
        return f"faults (rank {self.rank}): " + "; ".join(parts)


class _Wrapper:
    """Calls go through ``__call__``; every other attribute is the wrapped object's (so the
    loop can still call ``.train()``, read ``.stats`` or ``.training``)."""

    def __init__(self, inner: Any, injector: FaultInjector) -> None:
        self.inner, self.injector = inner, injector

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _TrainForward(_Wrapper):
    def __init__(self, inner: Any, injector: FaultInjector, step_of: Callable[[], int]) -> None:
        super().__init__(inner, injector)
        self.step_of = step_of

    def __call__(self, blur: Tensor) -> Tensor:
        return self.injector.output(self.step_of(), self.inner(blur))


class _TrainLoss(_TrainForward):
    def __call__(self, out: Tensor, sharp: Tensor) -> Tensor:
        return self.injector.loss(self.step_of(), self.inner(out, sharp))


class _TrainBatches(_TrainForward):
    """The training loader; each batch gets the input/target faults of the step it feeds."""

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for blur, sharp in self.inner:
            yield self.injector.batch(self.step_of(), blur, sharp)

    def __len__(self) -> int:
        return len(self.inner)


class _PerBatch(_Wrapper):
    """Counts its calls within one epoch: the i-th call is validation batch i."""

    def __init__(self, inner: Any, injector: FaultInjector, epoch_of: Callable[[], int]) -> None:
        super().__init__(inner, injector)
        self.epoch_of, self._epoch, self._calls = epoch_of, None, 0

    def _next_batch(self) -> tuple[int, int]:
        epoch = self.epoch_of()
        if epoch != self._epoch:
            self._epoch, self._calls = epoch, 0
        self._calls += 1
        return epoch, self._calls - 1


class _EvalForward(_PerBatch):
    def __call__(self, blur: Tensor) -> Tensor:
        epoch, i = self._next_batch()
        return self.injector.val_output(epoch, i, self.inner(blur))


class _EvalMetrics(_PerBatch):
    def __call__(self, pred: Tensor, target: Tensor) -> Any:
        epoch, i = self._next_batch()
        self.injector.val_metric(epoch, i)
        return self.inner(pred, target)


@dataclass
class Instrumented:
    """What the training loop calls: the given objects, wrapped where faults are scheduled."""

    net: Any
    train_loader: Any
    criterion: Any
    eval_model: Any
    metrics: Any


def instrument(
    injector: FaultInjector,
    *,
    step_of: Callable[[], int],
    epoch_of: Callable[[], int],
    net: Any,
    train_loader: Any,
    criterion: Any,
    eval_model: Any,
    metrics: Callable[..., Any],
    model: nn.Module,
) -> Instrumented:
    """Wrap what the loop calls so that ``injector``'s faults fire at their step and epoch.

    ``step_of()``: the global step about to run; ``epoch_of()``: the epoch in progress.
    Training kinds wrap ``net`` (outputs), ``train_loader`` (inputs, targets) and
    ``criterion`` (loss); ``nan_grad`` hooks ``model``'s first parameter (after its gradient
    is accumulated). Validation kinds wrap ``eval_model`` (outputs) and ``metrics`` (the
    metric function of the evaluation; raises); validation batch i is the i-th call in the
    epoch. Without specs everything is returned as given.
    """
    parts = Instrumented(net, train_loader, criterion, eval_model, metrics)
    if not injector:
        return parts
    kinds = {s.kind for s in injector.specs}
    if kinds & {"nan_output", "inf_output"}:
        parts.net = _TrainForward(net, injector, step_of)
    if kinds & set(_BATCH_KINDS):
        parts.train_loader = _TrainBatches(train_loader, injector, step_of)
    if "nan_loss" in kinds:
        parts.criterion = _TrainLoss(criterion, injector, step_of)
    if kinds & {"val_nan_output", "val_inf_output"}:
        parts.eval_model = _EvalForward(eval_model, injector, epoch_of)
    if "val_metric_error" in kinds:
        parts.metrics = _EvalMetrics(metrics, injector, epoch_of)
    if "nan_grad" in kinds:
        first = next(p for p in model.parameters() if p.requires_grad)

        def nan_grad(_: nn.Parameter) -> None:
            injector.grads(step_of(), model)

        first.register_post_accumulate_grad_hook(nan_grad)
    return parts
