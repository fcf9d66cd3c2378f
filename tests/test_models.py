"""Tests for deblur_lib.models: shapes, padding, identity at init, gradients, presets."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from deblur_lib import models
from deblur_lib.models import (
    MODEL_PRESETS,
    DeblurNet,
    LayerNorm2d,
    architecture,
    build_model,
    count_parameters,
    network_of,
    preset_architecture,
)


def _perturbed(model: DeblurNet, seed: int = 0) -> DeblurNet:
    """Give the zero-initialised residual parameters random values, so outputs are non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("beta", "gamma")) or name.startswith("ending"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _input(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture
def tiny() -> DeblurNet:
    torch.manual_seed(0)
    return build_model("tiny")


@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (7, 5), (37, 53), (32, 32), (64, 48), (5, 100)])
def test_identity_at_init_any_size(tiny: DeblurNet, hw: tuple[int, int]) -> None:
    x = _input((2, 3, *hw))
    with torch.no_grad():
        y = tiny(x)
    assert y.shape == x.shape
    assert torch.equal(y, x)


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("hw", [(1, 1), (3, 2), (37, 53), (17, 64)])
def test_padding_path_odd_sizes(preset: str, hw: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = _perturbed(build_model(preset))
    x = _input((2, 3, *hw))
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    assert not torch.equal(y, x)


def test_padding_matches_explicit_pad_and_crop(tiny: DeblurNet) -> None:
    """37x53 is padded (reflect) to 40x56 internally: same as padding by hand and cropping."""
    model = _perturbed(tiny)
    x = _input((1, 3, 37, 53))
    with torch.no_grad():
        y = model(x)
        padded = F.pad(x, (0, 3, 0, 3), mode="reflect")
        y_ref = model(padded)[..., :37, :53]
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)


def test_no_batch_statistics(tiny: DeblurNet) -> None:
    """A sample's output does not depend on the other samples in the batch."""
    model = _perturbed(tiny)
    x = _input((4, 3, 16, 16))
    with torch.no_grad():
        batched = model(x)
        single = model(x[:1])
    torch.testing.assert_close(batched[:1], single, rtol=1e-5, atol=1e-6)


def test_gradient_flow(tiny: DeblurNet) -> None:
    """Zero-initialised residual paths open in turn: at init only the last conv gets a gradient;
    after one step the skip path and the beta/gamma scales too; after two, every parameter."""
    x, target = _input((2, 3, 16, 16), 1), _input((2, 3, 16, 16), 2)
    opt = torch.optim.SGD(tiny.parameters(), lr=0.1)
    with_grad = []
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(tiny(x), target).backward()
        for name, p in tiny.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        with_grad.append({n for n, p in tiny.named_parameters() if p.grad.abs().sum() > 0})
        opt.step()
    names = {n for n, _ in tiny.named_parameters()}
    assert with_grad[0] == {"ending.weight", "ending.bias"}
    assert {n for n in names if n.endswith(("beta", "gamma"))} <= with_grad[1]
    assert with_grad[2] == names


def test_channels_last_matches_contiguous(tiny: DeblurNet) -> None:
    model = _perturbed(tiny)
    x = _input((2, 3, 37, 53))
    y = model(x)
    model_cl = model.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y_cl = model_cl(x_cl)
    torch.testing.assert_close(y_cl, y, rtol=1e-4, atol=1e-5)
    y_cl.square().mean().backward()
    assert x_cl.grad is not None and torch.isfinite(x_cl.grad).all()


def test_layernorm2d_matches_layer_norm_over_channels() -> None:
    norm = LayerNorm2d(6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 6, 5, 7, generator=torch.Generator().manual_seed(0))
    ref = F.layer_norm(
        x.permute(0, 2, 3, 1), (6,), norm.weight.flatten(), norm.bias.flatten(), 1e-6
    )
    torch.testing.assert_close(norm(x), ref.permute(0, 3, 1, 2), rtol=1e-5, atol=1e-5)


def test_layernorm2d_fp16_large_values_stay_finite() -> None:
    x = torch.full((1, 4, 2, 2), 60000.0, dtype=torch.float16)
    x[:, 0] = -60000.0
    y = LayerNorm2d(4)(x)
    assert y.dtype == torch.float16
    assert torch.isfinite(y).all()


@pytest.mark.parametrize(
    ("preset", "low", "high"),
    [("tiny", 1_000, 50_000), ("small", 300_000, 1_000_000), ("base", 2_000_000, 10_000_000)],
)
def test_preset_parameter_counts(preset: str, low: int, high: int) -> None:
    n = count_parameters(build_model(preset))
    assert low <= n < high
    # the docstring's table states the measured count
    row = re.search(rf"^{preset}\s.*?(\d{{1,3}}(?:,\d{{3}})+)", models.__doc__, re.MULTILINE)
    assert row is not None and int(row.group(1).replace(",", "")) == n


def test_build_model_width_override() -> None:
    model = build_model("tiny", width=4)
    assert model.width == 4
    assert model.intro.out_channels == 4
    assert count_parameters(model) < count_parameters(build_model("tiny"))
    assert set(MODEL_PRESETS) >= {"tiny", "small", "base"}


def test_default_is_base() -> None:
    assert count_parameters(build_model()) == count_parameters(DeblurNet())


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(3, 8, 8),
        torch.zeros(1, 1, 8, 8),
        torch.zeros(1, 4, 8, 8),
        torch.zeros(1, 3, 8, 8, dtype=torch.uint8),
        torch.zeros(1, 3, 8, 8, dtype=torch.int64),
        torch.zeros(0, 3, 8, 8),
        torch.zeros(1, 3, 0, 8),
    ],
    ids=["3d", "1ch", "4ch", "uint8", "int64", "empty-batch", "zero-height"],
)
def test_input_checks_name_the_shape(tiny: DeblurNet, bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=re.escape(str(tuple(bad.shape)))):
        tiny(bad)


def test_non_tensor_input(tiny: DeblurNet) -> None:
    with pytest.raises(TypeError, match="ndarray"):
        tiny(_input((1, 3, 8, 8)).numpy())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 0}, "width"),
        ({"enc_blocks": (1, 1), "dec_blocks": (1,)}, "same length"),
        ({"middle_blocks": -1}, ">= 0"),
    ],
)
def test_constructor_checks(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DeblurNet(**kwargs)


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="tiny"):
        build_model("huge")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast_channels_last() -> None:
    model = _perturbed(build_model("tiny")).cuda().to(memory_format=torch.channels_last)
    x = _input((2, 3, 37, 53)).cuda().contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = model(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


def test_network_of_ignores_the_preset_name_and_tuple_vs_list():
    built = architecture(build_model("small"), preset=None)
    assert network_of(built) == network_of(preset_architecture("small"))
    assert network_of(dict(MODEL_PRESETS["small"], preset="x")) == network_of(built)
    assert network_of(built) != network_of(preset_architecture("small", width=24))
    assert network_of(built) != network_of(preset_architecture("tiny"))
