"""Guarded evaluation: per-image averages, named skip reasons, NaN (never 0.0/999) when all fail."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from deblur_lib.evaluate import REASONS, EvalReport, evaluate, image_metrics
from deblur_lib.metrics import PSNR_CAP_DB, denormalize, psnr, ssim
from deblur_lib.train.faults import FaultInjector, instrument
from deblur_lib.train.legacy import evaluate_seed_style, seed_calculate_metrics

torch.set_num_threads(2)


def _batches(sizes=(2, 2), hw=24, seed=0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(blur, sharp) model-space batches in [-1, 1] of the given batch sizes."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        sharp = torch.rand(n, 3, hw, hw, generator=g) * 2 - 1
        blur = (sharp + 0.2 * torch.randn(n, 3, hw, hw, generator=g)).clamp(-1, 1)
        out.append((blur, sharp))
    return out


class Identity(nn.Module):
    def forward(self, x):
        return x.clone()


class L1(nn.Module):
    def forward(self, pred, target):
        return (pred - target).abs().mean()


def _faulty(injector, model, metrics, epoch=0):
    """``model`` and ``metrics`` wrapped as ``fit`` wraps them for ``--inject_fault``."""
    parts = instrument(
        injector,
        step_of=lambda: 0,
        epoch_of=lambda: epoch,
        net=None,
        train_loader=None,
        criterion=None,
        eval_model=model,
        metrics=metrics,
        model=model,
    )
    return parts.eval_model, parts.metrics


def _run(batches, model=None, criterion=None, injector=None, epoch=0) -> EvalReport:
    model, metrics = model or Identity(), image_metrics
    if injector is not None:
        model, metrics = _faulty(injector, model, metrics, epoch)
    return evaluate(model, batches, criterion or L1(), "cpu", metrics=metrics)


def test_per_image_average_weights_the_uneven_last_batch():
    batches = _batches(sizes=(3, 3, 1))
    report = _run(batches)
    blur = torch.cat([b for b, _ in batches])
    sharp = torch.cat([s for _, s in batches])
    per_image = psnr(denormalize(blur), denormalize(sharp))
    assert report.psnr == pytest.approx(per_image.mean().item(), abs=1e-9)
    assert report.ssim == pytest.approx(ssim(denormalize(blur), denormalize(sharp)).mean().item())
    per_batch = sum(psnr(denormalize(b), denormalize(s)).mean().item() for b, s in batches) / 3
    assert report.psnr != pytest.approx(per_batch, abs=1e-6)  # the seed's per-batch average
    loss = sum((b - s).abs().mean().item() * len(b) for b, s in batches) / 7
    assert report.loss == pytest.approx(loss)
    assert (report.n_valid, report.n_total, report.n_images, report.n_images_total) == (3, 3, 7, 7)
    assert report.ok and report.complete and report.skipped == dict.fromkeys(REASONS, 0)


class NaNModel(nn.Module):
    def forward(self, x):
        return x * float("nan")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_all_batches_bad_gives_nan_and_not_ok_never_zero_or_999(value):
    model = NaNModel() if math.isnan(value) else Identity()
    injector = None if math.isnan(value) else FaultInjector("val_inf_output@epoch=0,batches=all")
    report = _run(_batches(sizes=(2, 2, 2)), model=model, injector=injector)
    assert not report.ok
    assert all(math.isnan(v) for v in (report.loss, report.psnr, report.ssim))
    assert report.psnr not in (0.0, 999.0)
    assert (report.n_valid, report.n_total, report.n_images) == (0, 3, 0)
    assert report.skipped["nonfinite_output"] == 3


def test_mixed_batches_skip_only_the_bad_ones_with_reasons():
    injector = FaultInjector("val_nan_output@epoch=2;val_metric_error@epoch=2,batches=3")
    batches = _batches(sizes=(2, 2, 2, 2))
    report = _run(batches, injector=injector, epoch=2)
    # batch 0: NaN output (checked first); batches 1, 2: metric error; batch 3 valid
    assert report.skipped == {
        "nonfinite_output": 0,
        "nonfinite_loss": 0,
        "nonfinite_metric": 0,
        "metric_error": 3,
    }
    assert (report.n_valid, report.n_total, report.n_images, report.n_images_total) == (1, 4, 2, 8)
    blur, sharp = batches[3]
    assert report.psnr == pytest.approx(psnr(denormalize(blur), denormalize(sharp)).mean().item())
    assert report.ok and not report.complete  # a subset: not comparable with a full validation


def test_nonfinite_output_takes_precedence_over_the_metric_error():
    injector = FaultInjector("val_nan_output@epoch=0")
    report = _run(_batches(sizes=(2, 2)), injector=injector)
    assert report.skipped["nonfinite_output"] == 1 and report.n_valid == 1


class NaNLoss(nn.Module):
    def forward(self, pred, target):
        return (pred - target).abs().mean() * float("nan")


def test_nonfinite_loss_is_a_reason():
    report = _run(_batches(sizes=(2, 2)), criterion=NaNLoss())
    assert report.skipped["nonfinite_loss"] == 2 and not report.ok


def test_nonfinite_metric_is_a_reason():
    def nan_ssim(p, t):
        return psnr(p, t), torch.full((p.shape[0],), float("nan"), dtype=torch.float64)

    report = evaluate(Identity(), _batches(sizes=(2,)), L1(), "cpu", metrics=nan_ssim)
    assert report.skipped["nonfinite_metric"] == 1 and math.isnan(report.ssim)


def test_too_small_images_are_a_metric_error_not_a_crash():
    report = _run(_batches(sizes=(2,), hw=8))  # SSIM's 11 px window does not fit
    assert report.skipped["metric_error"] == 1 and not report.ok


def test_psnr_at_the_cap_is_valid():
    batches = [(s.clone(), s) for _, s in _batches(sizes=(2,))]
    report = _run(batches)
    assert report.ok and report.psnr == PSNR_CAP_DB and report.ssim == pytest.approx(1.0)


class Buggy(nn.Module):
    def forward(self, x):
        return undefined_name * x  # noqa: F821 (the bug under test)


def test_name_error_inside_the_model_propagates():
    with pytest.raises(NameError):
        _run(_batches(), model=Buggy())


def test_name_error_inside_metric_code_propagates():
    def broken(pred, target):
        return np.mean(pred)  # noqa: F821 (fix 4's missing import)

    with pytest.raises(NameError):
        evaluate(Identity(), _batches(), L1(), "cpu", metrics=broken)


def test_logs_the_summary_with_reasons(caplog):
    injector = FaultInjector("val_nan_output@epoch=0")
    with caplog.at_level(logging.INFO, logger="deblur_lib.evaluate"):
        _run(_batches(sizes=(2, 2, 2)), injector=injector)
    assert "Evaluated 2/3 batches successfully (skipped: nonfinite_output=1)" in caplog.text


def test_restores_the_training_mode_and_uses_inference_mode():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append((self.training, torch.is_inference_mode_enabled()))
            return x.clone()

    model = Probe().train()
    _run(_batches(sizes=(1,)), model=model)
    assert seen == [(False, True)] and model.training


def test_reads_the_device_once(monkeypatch):
    """No per-batch .item()/bool(): one .tolist() at the end (one sync per evaluation)."""
    calls = {"item": 0, "bool": 0, "tolist": 0}
    for name, attr in (("item", "item"), ("bool", "__bool__"), ("tolist", "tolist")):
        original = getattr(torch.Tensor, attr)

        def counted(self, *a, _name=name, _orig=original, **k):
            calls[_name] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, attr, counted)
    _run(_batches(sizes=(2, 2, 2, 2)), injector=FaultInjector("val_nan_output@epoch=0"))
    assert calls == {"item": 0, "bool": 0, "tolist": 1}


def test_seed_style_turns_metric_failures_into_zero_per_batch():
    """The original evaluation, reproduced: a metric error is logged as 0.0 and averaged in."""
    injector = FaultInjector("val_metric_error@epoch=0")
    batches = _batches(sizes=(2, 2))
    model, metrics = _faulty(injector, Identity(), seed_calculate_metrics)
    report = evaluate_seed_style(model, batches, L1(), "cpu", metrics=metrics)
    second = evaluate_seed_style(Identity(), batches[1:], L1(), "cpu")
    assert report.psnr == pytest.approx(second.psnr / 2)  # (0.0 + psnr of batch 1) / 2 batches
    assert report.n_valid == report.n_total == 2


def test_seed_style_passes_nan_through():
    report = evaluate_seed_style(NaNModel(), _batches(sizes=(2,)), L1(), "cpu")
    assert math.isnan(report.loss)
    assert report.psnr == 0.0 or math.isnan(report.psnr)  # the symptoms the seed logged


class Layout(nn.Module):
    """Records the memory format of each input it is given."""

    def __init__(self):
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x):
        self.seen.append(x.is_contiguous(memory_format=torch.channels_last))
        return x.clone()


@pytest.mark.parametrize("evaluate_fn", [evaluate, evaluate_seed_style])
@pytest.mark.parametrize("channels_last", [False, True])
def test_channels_last_changes_the_input_layout_and_nothing_else(evaluate_fn, channels_last):
    batches = _batches((2, 2, 1))
    model = Layout()
    report = evaluate_fn(model, batches, L1(), "cpu", channels_last=channels_last)
    assert model.seen == [channels_last] * 3
    plain = evaluate_fn(Identity(), batches, L1(), "cpu")
    assert (report.psnr, report.ssim, report.loss) == (plain.psnr, plain.ssim, plain.loss)
