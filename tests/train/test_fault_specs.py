"""deblur_lib.faults: the spec parser and the injector, unit level (the end-to-end fault
matrix through ``fit`` lives in tests/test_faults.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deblur_lib.train.faults import (
    TRAIN_KINDS,
    VAL_KINDS,
    FaultInjector,
    FaultSpec,
    InjectedMetricError,
    parse_faults,
)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(3, 3, 8, 8, generator=gen) * 2 - 1, torch.rand(3, 3, 8, 8, generator=gen)


# --- parser ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nan_output@step=40", [FaultSpec("nan_output", step=40)]),
        (
            "nan_grad@step=10,count=8,rank=1",
            [FaultSpec("nan_grad", step=10, count=8, rank=1)],
        ),
        (" NaN_Input @ step = 0 ; ", [FaultSpec("nan_input", step=0)]),
        ("constant_frame@step=3", [FaultSpec("const_input", step=3)]),
        ("metric_error@epoch=2", [FaultSpec("val_metric_error", epoch=2)]),
        (
            "val_metric_error@epoch=2,batches=all;nan_loss@step=5",
            [FaultSpec("val_metric_error", epoch=2, batches=None), FaultSpec("nan_loss", step=5)],
        ),
        ("val_nan_output@epoch=0,batches=3", [FaultSpec("val_nan_output", epoch=0, batches=3)]),
        (None, []),
        ("", []),
        ("  ;  ", []),
    ],
)
def test_parse_valid(text, expected):
    assert parse_faults(text) == expected


@pytest.mark.parametrize("kind", TRAIN_KINDS + VAL_KINDS)
def test_every_kind_round_trips_through_str(kind):
    text = f"{kind}@step=7,count=2,rank=1" if kind in TRAIN_KINDS else f"{kind}@epoch=4,batches=all"
    (spec,) = parse_faults(text)
    assert str(spec) == text
    assert parse_faults(str(spec)) == [spec]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("nan_outptu@step=4", "unknown kind 'nan_outptu'"),
        ("nan_output", "missing '@'"),
        ("nan_output@", "expected key=value"),
        ("nan_output@step", "expected key=value"),
        ("nan_output@step=", "expected key=value"),
        ("nan_output@step=-1", "step must be >= 0"),
        ("nan_output@step=1,count=0", "count must be >= 1"),
        ("nan_output@step=1,rank=-2", "rank must be >= 0"),
        ("nan_output@step=x", "step='x' is not an integer"),
        ("nan_output@step=1.5", "is not an integer"),
        ("nan_output@count=2", "needs step="),
        ("nan_output@epoch=2", "val_nan_output@epoch=E"),
        ("nan_loss@epoch=2", "epoch= belongs to validation kinds"),
        ("val_metric_error@step=3", "step= belongs to training kinds"),
        ("val_metric_error@batches=2", "needs epoch="),
        ("val_nan_output@epoch=1,rank=0", "rank= belongs to training kinds"),
        ("val_nan_output@epoch=1,batches=0", "batches must be >= 1"),
        ("nan_grad@step=1,step=2", "step= given twice"),
        ("nan_grad@step=1,when=2", "unknown key 'when'"),
        ("nan_output@step=1;bogus@step=1", "unknown kind 'bogus'"),
    ],
)
def test_parse_invalid_names_the_problem_and_the_grammar(text, why):
    with pytest.raises(ValueError) as info:
        parse_faults(text)
    msg = str(info.value)
    assert why in msg
    assert "KIND@step=N" in msg and "val_metric_error" in msg and "e.g." in msg


def test_parse_rejects_non_string():
    with pytest.raises(TypeError, match="str or None"):
        parse_faults(3)


# --- injector: training ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "which", "value"),
    [
        ("nan_input", 0, math.nan),
        ("inf_input", 0, math.inf),
        ("nan_target", 1, math.nan),
        ("inf_target", 1, math.inf),
    ],
)
def test_batch_faults_write_one_pixel_of_the_first_sample(kind, which, value):
    blur, sharp = _batch()
    original = (blur.clone(), sharp.clone())
    inj = FaultInjector(f"{kind}@step=5")
    out = inj.batch(5, blur, sharp)
    assert torch.equal(blur, original[0]) and torch.equal(sharp, original[1])  # not in place
    assert out[1 - which] is (blur, sharp)[1 - which]  # untouched tensor passes through
    bad = ~torch.isfinite(out[which])
    assert bad.sum() == 3 and bad[0, :, 0, 0].all()
    if math.isnan(value):
        assert torch.isnan(out[which][0, :, 0, 0]).all()
    else:
        assert (out[which][0, :, 0, 0] == value).all()
    assert torch.equal(out[which][~bad], original[which][~bad])
    assert inj.injected == {kind: 1}


def test_const_input_makes_the_first_blur_frame_constant():
    blur, sharp = _batch()
    b, s = FaultInjector("const_input@step=0").batch(0, blur, sharp)
    assert torch.equal(b[0], torch.zeros_like(b[0]))
    assert torch.equal(b[1:], blur[1:]) and s is sharp
    assert b[0].std() == 0


@pytest.mark.parametrize("kind", ["nan_output", "inf_output"])
def test_output_fault_keeps_the_graph(kind):
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = x * 2
    poisoned = FaultInjector(f"{kind}@step=1").output(1, out)
    assert poisoned is not out and torch.isfinite(out).all()
    assert (~torch.isfinite(poisoned)).sum() == 3
    poisoned.sum().backward()
    assert x.grad is not None


def test_nan_loss_makes_loss_and_gradients_nan():
    w = torch.ones(3, requires_grad=True)
    loss = (w * 2).sum()
    bad = FaultInjector("nan_loss@step=2").loss(2, loss)
    assert torch.isfinite(loss) and torch.isnan(bad)
    bad.backward()
    assert torch.isnan(w.grad).all()


def test_nan_grad_writes_in_place_into_the_first_existing_grad():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    inj = FaultInjector("nan_grad@step=3")
    with pytest.raises(ValueError, match="no parameter has a .grad"):
        inj.grads(3, model)
    model(torch.randn(4, 2)).sum().backward()
    model[0].weight.grad = None
    assert not inj.grads(2, model)
    assert inj.grads(3, model)
    assert torch.isnan(model[0].bias.grad[0]) and torch.isfinite(model[0].bias.grad[1])
    assert torch.isfinite(model[1].weight.grad).all()
    assert inj.injected == {"nan_grad": 1}


def test_nan_grad_works_on_a_channels_last_model():
    """channels_last gives (1, C, 1, 1) parameters grads that ``.view(-1)`` cannot flatten."""
    from deblur_lib.models import build_model

    model = build_model("tiny").to(memory_format=torch.channels_last)
    x = torch.rand(1, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()
    assert FaultInjector("nan_grad@step=0").grads(0, model)
    first = next(p for p in model.parameters() if p.grad is not None)
    assert torch.isnan(first.grad).sum() == 1


@pytest.mark.parametrize(
    ("spec", "fires"),
    [
        ("nan_output@step=3", {3}),
        ("nan_output@step=3,count=4", {3, 4, 5, 6}),
        ("nan_output@step=3,count=2,rank=1", set()),
        ("nan_output@step=3,count=2,rank=0", {3, 4}),
        ("nan_output@step=1;nan_output@step=8", {1, 8}),
    ],
)
def test_schedule_steps_count_and_rank(spec, fires):
    inj = FaultInjector(spec, rank=0)
    out = torch.zeros(1, 3, 2, 2)
    fired = {s for s in range(12) if not torch.isfinite(inj.output(s, out)).all()}
    assert fired == fires
    assert inj.injected["nan_output"] == len(fires)


def test_same_step_fires_again_when_replayed():
    inj = FaultInjector("nan_loss@step=4")
    for _ in range(2):
        assert torch.isnan(inj.loss(4, torch.tensor(1.0)))
    assert inj.injected == {"nan_loss": 2}


def test_no_specs_is_a_cheap_no_op():
    inj = FaultInjector(None)
    blur, sharp = _batch()
    assert not inj
    assert inj.batch(0, blur, sharp) == (blur, sharp)
    assert inj.output(0, blur) is blur
    inj.val_metric(0, 0)
    assert inj.injected == {}
    assert inj.describe() == "faults: none"


@pytest.mark.parametrize("bad", [torch.zeros(3, 8, 8), torch.zeros(0, 3, 8, 8)])
def test_wrong_batch_shape_is_a_value_error(bad):
    with pytest.raises(ValueError, match=r"\(N>=1, C, H, W\) blur tensor, got"):
        FaultInjector("nan_input@step=0").batch(0, bad, bad)


def test_injector_accepts_parsed_specs_only():
    specs = parse_faults("nan_loss@step=1")
    assert FaultInjector(specs).specs == specs
    with pytest.raises(TypeError, match="FaultSpec"):
        FaultInjector(["nan_loss@step=1"])


# --- injector: validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "hits"),
    [
        ("val_nan_output@epoch=2", {(2, 0)}),
        ("val_inf_output@epoch=2,batches=2", {(2, 0), (2, 1)}),
        ("val_nan_output@epoch=1,batches=all", {(1, i) for i in range(4)}),
    ],
)
def test_val_output_schedule(spec, hits):
    inj = FaultInjector(spec)
    out = torch.zeros(2, 3, 4, 4)
    got = {
        (e, i)
        for e in range(4)
        for i in range(4)
        if not torch.isfinite(inj.val_output(e, i, out)).all()
    }
    assert got == hits
    assert torch.isfinite(out).all()


def test_val_metric_error_raises_a_value_error_like_skimage():
    inj = FaultInjector("val_metric_error@epoch=1,batches=2")
    inj.val_metric(0, 0)
    inj.val_metric(1, 2)
    for i in range(2):
        with pytest.raises(ValueError, match="win_size exceeds image extent") as info:
            inj.val_metric(1, i)
        assert isinstance(info.value, InjectedMetricError)
    assert inj.injected == {"val_metric_error": 2}


def test_train_and_val_faults_do_not_cross():
    inj = FaultInjector("nan_output@step=0;val_nan_output@epoch=0")
    out = torch.zeros(1, 3, 2, 2)
    assert torch.isnan(inj.output(0, out)).any()
    assert torch.isnan(inj.val_output(0, 0, out)).any()
    assert inj.injected == {"nan_output": 1, "val_nan_output": 1}


def test_describe_lists_specs_and_counts():
    inj = FaultInjector("nan_output@step=1,count=2;val_metric_error@epoch=3,batches=all", rank=1)
    inj.output(1, torch.zeros(1, 3, 2, 2))
    assert inj.describe() == (
        "faults (rank 1): nan_output@step=1,count=2 (fired 1x); "
        "val_metric_error@epoch=3,batches=all (fired 0x)"
    )
