"""deblur_lib.guards: finite flags, sync-free step skipping, StepGuard, NanDetector."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from torch import nn

from deblur_lib.guards import (
    NanDetector,
    StepGuard,
    all_finite,
    all_ranks_ok,
    first_nonfinite_grad,
    grad_norm_and_finite,
    grads_finite,
    masked_step,
)

BAD = [float("nan"), float("inf"), float("-inf")]


@contextlib.contextmanager
def no_host_sync():
    """Inside: every Python-level host read of a tensor raises."""

    def boom(self, *args, **kwargs):
        raise AssertionError("host sync: a tensor was read on the host")

    with pytest.MonkeyPatch.context() as mp:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            mp.setattr(torch.Tensor, name, boom)
        yield


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1))


def _backward(model: nn.Module, seed: int, bad: float | None = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 6, 6, generator=gen)
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    if bad is not None:
        next(model.parameters()).grad.view(-1)[1] = bad


# --- all_finite / grads_finite / grad_norm_and_finite -------------------------------------


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("position", [0, 1, 2])
def test_all_finite_detects_any_bad_tensor(bad, position):
    tensors = [torch.randn(2, 3, 4, 4) for _ in range(3)]
    assert all_finite(*tensors).dtype == torch.bool
    assert all_finite(*tensors).dim() == 0
    assert bool(all_finite(*tensors))
    tensors[position][1, 2, 3, 0] = bad
    assert not bool(all_finite(*tensors))


def test_all_finite_accepts_empty_and_integer_tensors():
    assert bool(all_finite(torch.empty(0), torch.arange(5), torch.tensor(1.0)))


def test_all_finite_rejects_no_arguments_and_non_tensors():
    with pytest.raises(ValueError, match="at least one"):
        all_finite()
    with pytest.raises(TypeError, match="argument 1 is float"):
        all_finite(torch.zeros(1), 1.0)


@pytest.mark.parametrize("bad", BAD)
def test_grads_finite(bad):
    model = _net()
    _backward(model, 0)
    assert bool(grads_finite(model.parameters()))
    _backward(model, 0, bad)
    assert not bool(grads_finite(model.parameters()))


def test_grads_finite_ignores_params_without_grad_and_huge_finite_grads():
    model = _net()
    assert bool(grads_finite(model.parameters()))  # no grads at all
    _backward(model, 0)
    model[2].bias.grad = None
    model[0].weight.grad.fill_(1e30)  # L2 norm would overflow to inf; max-abs does not
    assert bool(grads_finite(model.parameters()))


@pytest.mark.parametrize("max_norm", [None, 0.0, 1e-3, 10.0])
def test_grad_norm_and_finite_matches_clip_grad_norm(max_norm):
    model, ref = _net(), _net()
    _backward(model, 1)
    _backward(ref, 1)
    expected = nn.utils.clip_grad_norm_(ref.parameters(), max_norm or math.inf)
    total, finite = grad_norm_and_finite(model.parameters(), max_norm)
    torch.testing.assert_close(total, expected)
    assert bool(finite)
    grads = [p.grad for p in model.parameters()]
    if max_norm:  # clipped exactly as clip_grad_norm_ does
        for g, r in zip(grads, [p.grad for p in ref.parameters()], strict=True):
            torch.testing.assert_close(g, r)


@pytest.mark.parametrize("bad", BAD)
def test_grad_norm_and_finite_flags_bad_grads(bad):
    model = _net()
    _backward(model, 0, bad)
    total, finite = grad_norm_and_finite(model.parameters(), 1.0)
    assert not bool(finite)
    assert not math.isfinite(float(total))


@pytest.mark.parametrize("max_norm", [-1.0, math.nan, math.inf])
def test_grad_norm_and_finite_rejects_bad_max_norm(max_norm):
    with pytest.raises(ValueError, match="max_norm"):
        grad_norm_and_finite(_net().parameters(), max_norm)


def test_no_host_sync_helper_catches_reads():
    with no_host_sync(), pytest.raises(AssertionError, match="host sync"):
        bool(torch.tensor(True))
    with no_host_sync(), pytest.raises(AssertionError, match="host sync"):
        torch.tensor(1.0).item()


def test_flags_and_clipping_do_not_sync():
    model = _net()
    _backward(model, 0, float("nan"))
    x = torch.randn(2, 3)
    with no_host_sync():
        flags = [all_finite(x, x), grads_finite(model.parameters())]
        flags.append(grad_norm_and_finite(model.parameters(), 1.0)[1])
        flags.append(grad_norm_and_finite(model.parameters(), None)[1])
        flags.append(all_ranks_ok(torch.tensor(True)))
    assert [bool(f) for f in flags] == [True, False, False, False, True]


# --- masked_step ---------------------------------------------------------------------------

OPTIMIZERS = {
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw_loop": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=False),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
}


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[list, dict]:
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _assert_same(a: tuple[list, dict], b: tuple[list, dict]) -> None:
    for x, y in zip(a[0], b[0], strict=True):
        assert torch.equal(x, y)
    assert a[1]["state"].keys() == b[1]["state"].keys()
    for idx, state in a[1]["state"].items():
        for key, value in state.items():
            other = b[1]["state"][idx][key]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), (idx, key)


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("bad", [*BAD, None])
def test_skipped_step_leaves_params_and_state_unchanged(name, bad):
    model = _net()
    opt = OPTIMIZERS[name](model.parameters())
    for step in range(2):
        _backward(model, step)
        masked_step(opt, torch.tensor(False))
    before = _snapshot(model, opt)
    _backward(model, 5, bad)  # bad=None: finite grads, skipped anyway
    masked_step(opt, torch.tensor(True))
    _assert_same(before, _snapshot(model, opt))
    if name.startswith("adamw"):
        assert all(float(s["step"]) == 2 for s in opt.state_dict()["state"].values())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_skipped_first_step_leaves_initial_state(name):
    """A skip on the very first step must leave the state as a fresh optimizer would start."""
    model, ref = _net(), _net()
    opt, ref_opt = OPTIMIZERS[name](model.parameters()), OPTIMIZERS[name](ref.parameters())
    _backward(model, 0, float("nan"))
    masked_step(opt, torch.tensor(True))
    for step in range(1, 3):
        _backward(model, step)
        _backward(ref, step)
        masked_step(opt, torch.tensor(False))
        ref_opt.step()
    _assert_same(_snapshot(ref, ref_opt), _snapshot(model, opt))


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("flag", [torch.tensor(False), torch.tensor(0.0), torch.tensor(0)])
def test_taken_step_equals_plain_step(name, flag):
    model, ref = _net(), _net()
    opt, ref_opt = OPTIMIZERS[name](model.parameters()), OPTIMIZERS[name](ref.parameters())
    for step in range(3):
        _backward(model, step)
        _backward(ref, step)
        masked_step(opt, flag)
        ref_opt.step()
    _assert_same(_snapshot(ref, ref_opt), _snapshot(model, opt))
    assert not hasattr(opt, "found_inf")


def test_zeroing_grads_is_not_a_skip_for_adam():
    """Why masked_step exists: a zero gradient still moves AdamW (moments, step, decay)."""
    model = _net()
    opt = OPTIMIZERS["adamw_loop"](model.parameters())
    _backward(model, 0)
    opt.step()
    before = _snapshot(model, opt)
    _backward(model, 1)
    for p in model.parameters():
        p.grad.zero_()
    opt.step()
    with pytest.raises(AssertionError):
        _assert_same(before, _snapshot(model, opt))


@pytest.mark.parametrize("name", ["adamw_fused", "sgd_momentum"])
def test_guarded_step_does_not_sync(name):
    """Loss check, clipping, flag, skip and counters: no host read anywhere.

    (Non-fused, non-capturable Adam reads its CPU step counter with .item() inside torch
    itself, so the fallback is exercised here with SGD.)
    """
    model = _net()
    opt = OPTIMIZERS[name](model.parameters())
    guard = StepGuard()
    xs = [torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with no_host_sync():
        for x, bad in zip(xs, [None, float("nan"), None, float("inf")], strict=True):
            opt.zero_grad(set_to_none=True)
            loss = model(x).square().mean()
            loss.backward()
            if bad is not None:
                next(model.parameters()).grad.view(-1)[0] = bad
            _, finite = grad_norm_and_finite(model.parameters(), 1.0)
            ok = all_ranks_ok(torch.logical_and(all_finite(loss), finite))
            masked_step(opt, torch.logical_not(ok))
            guard.update(ok)
    assert guard.read() == {
        "steps": 4,
        "skipped_total": 2,
        "consecutive_bad": 1,
        "max_consecutive_bad": 1,
    }
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_masked_step_rejects_non_scalar_flag():
    model = _net()
    opt = OPTIMIZERS["adamw_fused"](model.parameters())
    with pytest.raises(TypeError, match=r"0-d tensor, got \(2,\)"):
        masked_step(opt, torch.zeros(2, dtype=torch.bool))
    with pytest.raises(TypeError, match="0-d tensor"):
        masked_step(opt, True)


def test_masked_step_keeps_a_preexisting_found_inf_attribute():
    model = _net()
    opt = OPTIMIZERS["adamw_fused"](model.parameters())
    sentinel = torch.tensor(0.0)
    opt.found_inf = sentinel
    _backward(model, 0)
    masked_step(opt, torch.tensor(True))
    assert opt.found_inf is sentinel


# --- StepGuard -------------------------------------------------------------------------------


def test_step_guard_counts():
    guard = StepGuard()
    pattern = [True, False, False, True, False, False, False, True]
    for ok in pattern:
        guard.update(torch.tensor(ok))
    assert guard.read() == {
        "steps": 8,
        "skipped_total": 5,
        "consecutive_bad": 0,
        "max_consecutive_bad": 3,
    }
    guard.update(torch.tensor(False))
    assert guard.read()["consecutive_bad"] == 1
    guard.reset_streak()
    assert guard.read() == {
        "steps": 9,
        "skipped_total": 6,
        "consecutive_bad": 0,
        "max_consecutive_bad": 0,
    }


def test_step_guard_reset_max_keeps_the_current_run():
    """A periodic check judges the longest run since the previous one: reset_max forgets the
    runs that ended, not the one still going."""
    guard = StepGuard()
    for ok in [False, False, False, True, False]:
        guard.update(torch.tensor(ok))
    assert guard.read()["max_consecutive_bad"] == 3  # ended before this read
    guard.reset_max()
    assert guard.read()["max_consecutive_bad"] == 1  # the run still going
    guard.update(torch.tensor(False))
    assert guard.read()["max_consecutive_bad"] == 2


def test_step_guard_state_dict_round_trip():
    guard = StepGuard()
    for ok in [False, False, True, False]:
        guard.update(torch.tensor(ok))
    other = StepGuard()
    other.load_state_dict(guard.state_dict())
    assert other.read() == guard.read()
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"steps": 1})


@pytest.mark.parametrize(
    "ok", [torch.tensor([True]), torch.tensor(1.0), True, torch.tensor([True, False])]
)
def test_step_guard_rejects_non_bool_scalar(ok):
    with pytest.raises(TypeError, match="0-d bool tensor"):
        StepGuard().update(ok)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_guard_moves_to_the_flag_device():
    guard = StepGuard()
    guard.update(torch.tensor(False, device="cuda"))
    assert guard.device.type == "cuda"
    assert guard.read()["skipped_total"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_masked_step_on_cuda():
    model = _net().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    x = torch.randn(2, 3, 6, 6, device="cuda")
    model(x).mean().backward()
    opt.step()
    before = _snapshot(model, opt)
    model(x).mean().backward()
    next(model.parameters()).grad.view(-1)[0] = float("nan")
    masked_step(opt, torch.logical_not(grads_finite(model.parameters())))
    _assert_same(before, _snapshot(model, opt))


# --- NanDetector -----------------------------------------------------------------------------


class _Div(nn.Module):
    """A block whose forward divides by the input's std (NaN for a constant frame)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        x = (x - x.mean()) / x.std()
        return self.conv(x)


def _stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), _Div(), nn.Conv2d(3, 3, 1))


def test_nan_detector_names_the_source_module():
    model = _stack()
    model[2].register_forward_hook(lambda m, i, o: o * float("nan"))
    with NanDetector(model) as det:
        model(torch.randn(1, 3, 8, 8))
    assert det.first_nonfinite == "2"
    assert det.report() == "first non-finite output at `2` (inputs were finite)"


def test_nan_detector_functional_op_in_parent():
    model = _stack()
    model[0].weight.data.zero_()
    model[0].bias.data.fill_(0.5)  # constant frame -> std 0 -> NaN before _Div.conv
    with NanDetector(model) as det:
        model(torch.randn(1, 3, 8, 8))
    assert det.first_nonfinite == "1.conv"
    assert "inputs were already non-finite" in det.report()


def test_nan_detector_non_finite_parameters():
    model = _stack()
    model[0].weight.data[0, 0, 0, 0] = float("inf")
    with NanDetector(model) as det:
        model(torch.randn(1, 3, 8, 8))
    assert det.first_nonfinite == "0"
    assert "parameters are non-finite" in det.report()


def test_nan_detector_model_input_and_clean_run_and_hook_removal():
    model = _stack()
    x = torch.randn(1, 3, 8, 8)
    with NanDetector(model) as det:
        model(x)
        assert det.report() == "all module outputs were finite"
        det.reset()
        x[0, 0, 0, 0] = float("nan")
        model(x)
    assert det.report().startswith("input to the model was already non-finite")
    assert all(not m._forward_hooks for m in model.modules())
    assert not model._forward_pre_hooks


def test_nan_detector_tuple_and_dict_outputs():
    class Multi(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            y = self.lin(x)
            return {"a": y, "b": (y, torch.log(y - 100))}

    model = Multi()
    with NanDetector(model) as det:
        model(torch.randn(3, 2))
    assert det.first_nonfinite == NanDetector.ROOT
    with pytest.raises(TypeError, match="nn.Module"):
        NanDetector(lambda x: x)


def test_first_nonfinite_grad():
    model = _net()
    _backward(model, 0)
    assert first_nonfinite_grad(model) is None
    model[2].weight.grad[0, 0, 0, 0] = float("nan")
    assert first_nonfinite_grad(model) == "2.weight"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_guarded_step_does_not_sync_on_cuda():
    """torch's own detector: any synchronizing CUDA call in the guarded step raises."""
    model = _net().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    guard = StepGuard("cuda")
    xs = [torch.randn(2, 3, 6, 6, device="cuda") for _ in range(4)]

    def step(x, bad):
        opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        if bad:
            next(model.parameters()).grad.view(-1)[0] = float("nan")
        _, finite = grad_norm_and_finite(model.parameters(), 1.0)
        ok = torch.logical_and(all_finite(loss), finite)
        masked_step(opt, torch.logical_not(ok))
        guard.update(ok)

    step(xs[0], False)  # warm-up: lazy optimizer state, cuDNN/cuBLAS handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, bad in zip(xs[1:], [True, False, True], strict=True):
            step(x, bad)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert guard.read()["skipped_total"] == 2
