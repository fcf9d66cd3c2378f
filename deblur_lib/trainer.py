"""The loop behind ``deblur_lib.train.fit``: ``Trainer`` and ``StopTraining``.

Read top to bottom: ``run`` (resume, epochs, finish), ``_train_epoch`` / ``_train_step`` (one
step in nanoGPT's order), ``_check_guard`` (the once-per-log-interval sync: rollback or stop),
``_end_epoch`` (evaluate, schedule, checkpoint, log). Checkpoints, resume and the end of the
run (figures, model, final line, ``TrainResult``) are in ``run_io.RunIO``, its mixin.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from deblur_lib import builders, distributed
from deblur_lib.checkpoint import Progress, load_checkpoint, weights_finite
from deblur_lib.cli import TrainConfig
from deblur_lib.evaluate import EvalReport, evaluate, evaluate_seed_style
from deblur_lib.faults import FaultInjector
from deblur_lib.guards import (
    NanDetector,
    StepGuard,
    all_ranks_ok,
    grad_norm_and_finite,
    masked_step,
)
from deblur_lib.run_io import RunIO
from deblur_lib.tracking import Tracker
from deblur_lib.train import TrainResult

__all__ = ["STEP_DELAY_ENV", "StopTraining", "Trainer"]
# Test hook: seconds to sleep after each training step, so a test can see a run's progress
# bar move and kill it in the middle of an epoch (tests/test_resume.py). Unset in normal use.
STEP_DELAY_ENV = "DEBLUR_STEP_DELAY_S"
log = logging.getLogger("deblur_lib.train")  # the name users filter on


class StopTraining(Exception):
    """Raised inside the loop to end the run with ``reason`` (a key of ``STOP_REASONS``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


class Trainer(RunIO):
    """One training run (one process of it under DDP); ``run()`` returns the ``TrainResult``."""

    def __init__(self, cfg: TrainConfig, ctx: distributed.DistContext, device: torch.device):
        self.cfg, self.ctx, self.device, self.guarded = cfg, ctx, device, cfg.guards == "on"
        self.last_path, self.best_path = Path(cfg.out_dir, "last.pt"), Path(cfg.out_dir, "best.pt")
        builders.seed_all(cfg.seed)
        builders.configure_backends(device)
        self.loaders = builders.build_loaders(cfg, ctx, device)
        self.model, self.net = builders.build_net(cfg, ctx, device)
        self.optimizer = builders.build_optimizer(self.model, cfg, device)
        n_batches = len(self.loaders.train)
        self.steps_per_epoch = min(n_batches, cfg.max_steps_per_epoch or n_batches)
        self.scheduler = builders.build_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        self.per_step_schedule = cfg.scheduler == "cosine"
        self.criterion = builders.build_criterion(cfg)
        self.eval_criterion = builders.build_criterion(cfg)  # its own counters
        self.guard = StepGuard(device)
        self.injector = FaultInjector(cfg.inject_fault, rank=ctx.rank)
        self.tracker = Tracker(
            cfg.experiment,
            cfg.tracking_uri,
            cfg.out_dir,
            enabled=ctx.is_main,
            retry_interval_s=cfg.tracking_retry_s,
        )
        self.progress = Progress()
        self.last_batch: torch.Tensor | None = None  # rerun under NanDetector before a stop
        self.step_delay_s = float(os.environ.get(STEP_DELAY_ENV) or 0)

    def run(self) -> TrainResult:
        cfg, resumed = self.cfg, self._resume()  # _resume replaces self.progress
        p = self.progress
        params = None if resumed else cfg.to_dict()  # params are logged once per run
        p.run_id = self.tracker.start(Path(cfg.out_dir).name, params, p.run_id) or p.run_id
        self.tracker.set_tags({"guards": cfg.guards})
        if self.ctx.is_main:
            for text in self.loaders.range_warnings:
                log.warning("data range: %s", text)
        if resumed:
            self._relog_last_epoch()
        else:
            self._save(self.last_path)  # the rollback target until the first epoch ends
        reason, message = "completed", ""
        try:
            with torch.autograd.set_detect_anomaly(cfg.detect_anomaly):
                for epoch in range(p.epoch + 1, cfg.num_epochs):
                    self._end_epoch(epoch, self._train_epoch(epoch))
        except StopTraining as stop:
            reason, message = stop.reason, stop.message
        except BaseException as exc:  # a crash or Ctrl-C: close the MLflow run, then re-raise
            self.tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        return self._finish(reason, message)

    # --- one epoch of steps -----------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> torch.Tensor:
        cfg, loader = self.cfg, self.loaders.train
        builders.seed_all(cfg.seed + 10_000 * (epoch + 1))  # resumable epochs
        self.loaders.sampler.set_epoch(epoch)  # the order and crops depend on (seed, epoch) only
        self.net.train()
        # device-side sums over the steps taken (loss, steps, grad norm), then MS-SSIM fallbacks
        acc = torch.zeros(4, dtype=torch.float64, device=self.device)
        bar = tqdm(
            itertools.islice(loader, self.steps_per_epoch),  # none past --max_steps_per_epoch
            total=self.steps_per_epoch,
            desc=f"epoch {epoch}",
            leave=False,
            dynamic_ncols=True,
            disable=not self.ctx.is_main,
        )
        for blur, sharp in bar:
            self._train_step(blur, sharp, acc)
            self.progress.step += 1
            if self.step_delay_s:
                time.sleep(self.step_delay_s)  # test hook (STEP_DELAY_ENV), 0 in normal use
            if self.progress.step % cfg.log_every == 0:
                self._check_guard(bar, acc)
        bar.close()
        self._check_guard(None, acc)  # the tail of the epoch
        return acc

    def _train_step(self, blur: torch.Tensor, sharp: torch.Tensor, acc: torch.Tensor) -> None:
        cfg, dev, inj, step = self.cfg, self.device, self.injector, self.progress.step
        blur, sharp = blur.to(dev, non_blocking=True), sharp.to(dev, non_blocking=True)
        if cfg.channels_last:
            blur = blur.contiguous(memory_format=torch.channels_last)
        blur, sharp = inj.batch(step, blur, sharp)
        self.last_batch = blur
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
            out = self.net(blur)
        out = inj.output(step, out.float())
        loss = inj.loss(step, self.criterion(out, sharp))
        loss.backward()
        inj.grads(step, self.model)
        norm, grads_ok = grad_norm_and_finite(self.model.parameters(), cfg.grad_clip or None)
        if self.guarded:
            # decided on the device and all-reduced: no host sync, the same skip on every rank
            ok = all_ranks_ok(grads_ok & torch.isfinite(loss.detach()))
            self.guard.update(ok)
            masked_step(self.optimizer, ~ok)
        else:
            ok = torch.ones((), dtype=torch.bool, device=dev)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.per_step_schedule:
            self.scheduler.step()  # follows the step count, skipped steps included
        taken = torch.stack([loss.detach().double(), torch.ones_like(acc[0]), norm.double()])
        acc[:3] += torch.where(ok, taken.to(acc.device), torch.zeros_like(taken))

    def _check_guard(self, bar, acc: torch.Tensor) -> None:
        """Read the counters (note: a CPU-GPU sync point, once per log interval); roll back or
        stop after too many consecutive skipped steps."""
        counts, cfg, p = self.guard.read(), self.cfg, self.progress
        if bar is not None:
            loss_sum, taken = acc[:2].tolist()
            bar.set_postfix(loss=loss_sum / max(taken, 1), skipped=counts["skipped_total"])
        bad = counts["consecutive_bad"]
        if bad <= cfg.max_bad_steps:
            return
        what = f"{bad} consecutive non-finite steps (> --max_bad_steps {cfg.max_bad_steps})"
        if p.rollbacks >= cfg.max_rollbacks:
            raise StopTraining(
                "rollbacks_exhausted",
                f"{what} up to step {p.step - 1} after {p.rollbacks} rollback(s) "
                f"(--max_rollbacks {cfg.max_rollbacks}); {self._diagnose()}",
            )
        lr = self.optimizer.param_groups[0]["lr"] * 0.5
        ck = load_checkpoint(self.last_path, map_location=self.device)
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.per_step_schedule:  # LambdaLR resets lr to base_lr * factor at every step
            self.scheduler.base_lrs = [b * 0.5 for b in self.scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.guard.reset_streak()
        p.rollbacks += 1
        if self.ctx.is_main:
            log.warning(
                f"rollback {p.rollbacks}/{cfg.max_rollbacks}: {what} up to step "
                f"{p.step - 1}; restored {self.last_path} (epoch {ck['epoch']}), "
                f"lr -> {lr:.3g}"
            )

    def _diagnose(self) -> str:
        """Rerun the offending batch with hooks on every module; name the first NaN source."""
        if self.last_batch is None:
            return "no batch to rerun"
        with torch.no_grad(), NanDetector(self.model) as det:
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.cfg.amp == "bf16"):
                self.model(self.last_batch)
        found = det.first_nonfinite is not None or det.model_input_finite is False
        text = det.report()
        if not found:
            text += ", so the non-finite value came after the model (loss or gradients)"
        texts = distributed.gather_strings(f"{int(found)}{text}")  # one entry per rank
        if len(texts) == 1:
            return text
        hits = [f"rank {r}: {t[1:]}" for r, t in enumerate(texts) if t[0] == "1"]
        return "; ".join(hits) or f"on every rank: {text}"

    # --- end of epoch: evaluate, schedule, checkpoint, log ------------------------------------
    def _end_epoch(self, epoch: int, acc: torch.Tensor) -> None:
        cfg, p = self.cfg, self.progress
        stats = getattr(self.criterion, "stats", None)  # guards off: the seed's loss has none
        if stats is not None:
            acc[3] = stats["msssim_fallbacks"]  # summed over the ranks with the rest
        loss_sum, taken, norm_sum, fallbacks = distributed.all_reduce_sum_(acc).tolist()
        rec: dict[str, float] = {
            "train_loss": loss_sum / taken if taken else math.nan,
            "grad_norm": norm_sum / taken if taken else math.nan,
            "lr": self.optimizer.param_groups[0]["lr"],
            "skipped_steps": self.guard.read()["skipped_total"],
            "rollbacks": p.rollbacks,
        }
        if stats is not None:
            rec["msssim_fallbacks"] = int(fallbacks)  # this epoch's, all ranks
            self.criterion.reset_stats()
        report, valid = None, False
        if (epoch + 1) % cfg.val_every == 0 or epoch == cfg.num_epochs - 1:
            report = self._validate(epoch)
            rec.update(val_valid_batches=report.n_valid, val_total_batches=report.n_total)
            rec.update({f"val_skipped_{k}": v for k, v in report.skipped.items()})
            valid = not self.guarded or report.ok  # the original trusted whatever came
            if valid:
                rec.update(val_loss=report.loss, val_psnr=report.psnr, val_ssim=report.ssim)
                if cfg.scheduler == "plateau":
                    self.scheduler.step(report.psnr)  # guards off: NaN and 0.0 go in too
            p.invalid_epochs = 0 if valid else p.invalid_epochs + 1
        p.epoch = epoch
        p.history.append({"epoch": epoch, **rec})
        finite = weights_finite(self.model)  # note: a sync point, once per epoch
        if finite:
            if valid and rec["val_psnr"] > p.best_psnr:
                p.best_psnr, p.best_epoch = rec["val_psnr"], epoch
                self._save(self.best_path)
            self._save(self.last_path)
        self.tracker.log_metrics(rec, step=epoch, raw=not self.guarded)
        if self.ctx.is_main:
            log.info("epoch %d: %s", epoch, " ".join(f"{k}={v:.4g}" for k, v in rec.items()))
        if not finite:
            msg = f"epoch {epoch}: the weights are not finite; no checkpoint written"
            if self.guarded:
                raise StopTraining("nonfinite_weights", msg)
            log.warning(msg)
        if report is not None and not valid:
            msg = (
                f"{p.invalid_epochs} consecutive invalid validation(s) (--max_invalid_epochs "
                f"{cfg.max_invalid_epochs}), last at epoch {epoch}: {report.summary()}"
            )
            if p.invalid_epochs >= cfg.max_invalid_epochs:
                raise StopTraining("invalid_epochs", msg)
            log.warning("%s; metrics not logged, scheduler not stepped, no best checkpoint", msg)

    def _validate(self, epoch: int) -> EvalReport:
        fn = evaluate if self.guarded else evaluate_seed_style
        args = (self.model, self.loaders.test, self.eval_criterion, self.device)
        return fn(*args, injector=self.injector, epoch=epoch)
