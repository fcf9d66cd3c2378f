"""The training loop: ``fit(cfg) -> TrainResult``, read top to bottom.

``fit`` builds everything from the ``TrainConfig`` (``Trainer.__init__``), then ``run``:
resume or start, the epochs, the end. One epoch, in nanoGPT's order: seed the epoch, then per
step: forward (optional bf16 autocast), loss, backward, clip and measure the gradient norm,
skip-or-step, zero grads, and every ``log_every`` steps read the device-side guard counters
(the loop's only sync point). Then: evaluate, step the scheduler on a valid PSNR, checkpoint
(atomic, finite weights only), log the epoch to MLflow. The end: load the best weights, log
figures and the model, write the ``stop_reason`` into ``last.pt``, mark the MLflow run, one
final line naming the ``stop_reason``. Resume: ``config.RESUME_POLICY`` says which changed
settings apply; a completed run is not trained again unless ``num_epochs`` grew.

Guards on (default): a step whose loss or gradients are not finite is skipped on the device
(``guards.masked_step``; under DDP the flag is all-reduced first, so every rank skips the same
steps) and counted. More than ``max_bad_steps`` consecutive skips (the longest run since the
previous read of the counters): roll back to ``last.pt`` with the LR halved; more than
``max_rollbacks`` rollbacks: stop, naming the first module whose output was non-finite.
A validation is valid only over every image: a partial one is logged as ``val_*_partial`` and
counts as invalid; ``max_invalid_epochs`` consecutive invalid validations: stop; a run without
any valid validation ends as ``no_valid_validation``. Ctrl-C and SIGTERM: see ``fit``.
Guards off: the original loop (``legacy``: the seed's loss and evaluation, metrics logged and
fed to the scheduler as they come) for the notebooks' "before" runs.

Checkpoints are written by rank 0 only and read by every rank: under torchrun on several
nodes ``out_dir`` must be on a shared filesystem. ``--inject_fault`` wraps what the loop calls
(``faults.instrument``); the loop itself has no injection code.
"""

from __future__ import annotations

import itertools
import logging
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from deblur_lib.data import (
    DatasetError,
    PairedImageFolder,
)
from deblur_lib.evaluate import evaluate, image_metrics
from deblur_lib.guards import (
    NanDetector,
    StepGuard,
    all_ranks_ok,
    grad_norm_and_finite,
    masked_step,
)
from deblur_lib.losses import CombinedLoss
from deblur_lib.train import distributed, faults, figures, legacy
from deblur_lib.train.build import (
    build_loaders,
    build_net,
    build_optimizer,
    build_scheduler,
    configure_backends,
    seed_all,
    use_bf16,
    use_channels_last,
    use_compile,
)
from deblur_lib.train.checkpoint import (
    Progress,
    archive_previous_run,
    remove_stale_temp_files,
    restore_training_state,
    training_state,
)
from deblur_lib.train.config import (
    SYNTHETIC,
    TrainConfig,
    one_line,
    resume_changes,
    shared_test_pairs,
)
from deblur_lib.train.ema import WeightAverage
from deblur_lib.train.threads import ThreadPolicy, parse_threads
from deblur_lib.train.tracking import JSONL, Tracker, read_jsonl, repair_jsonl
from deblur_lib.weights import load_checkpoint, save_checkpoint, weights_finite

__all__ = ["STOP_REASONS", "StopTraining", "TrainResult", "Trainer", "fit"]
log = logging.getLogger("deblur_lib.train")  # the name users filter on

STOP_REASONS = {
    "completed": "every epoch ran",
    "rollbacks_exhausted": "non-finite steps kept coming after --max_rollbacks rollbacks",
    "invalid_epochs": "--max_invalid_epochs consecutive validations were invalid",
    "nonfinite_weights": "the weights became non-finite (guards on)",
    "no_valid_validation": "every epoch ran, but no validation was valid over every image "
    "(guards on): there is no best checkpoint and no model was logged or registered",
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


class StopTraining(Exception):
    """Raised inside the loop to end the run with ``reason`` (a key of ``STOP_REASONS``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


class Terminated(KeyboardInterrupt):
    """SIGTERM (how batch schedulers and ``docker stop`` end a job), raised in the main thread
    like Ctrl-C's KeyboardInterrupt, so that both end a run the same way."""


def _terminate(signum: int, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up
    raise Terminated(f"signal {signum}")


def fit(cfg: TrainConfig) -> TrainResult:
    """Train as ``cfg`` says (see the module docstring); ValueError if ``cfg`` is invalid.

    Ctrl-C (KeyboardInterrupt) and SIGTERM (``Terminated``, handled while ``fit`` runs in the
    main thread) abandon the step in progress: ``last.pt`` stays the last finished epoch's, the
    MLflow run is marked KILLED with the tag ``stop_reason`` = ``interrupted`` or
    ``terminated``, and the exception propagates (the CLI exits 130 or 143)."""
    cfg.validate()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    ctx, device = distributed.setup(cfg.device)
    try:
        return Trainer(cfg, ctx, device).run()
    finally:
        distributed.teardown()
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class Trainer:
    """One training run (one process of it under DDP); ``run()`` returns the ``TrainResult``."""

    def __init__(self, cfg: TrainConfig, ctx: distributed.DistContext, device: torch.device):
        self.cfg, self.ctx, self.device, self.guarded = cfg, ctx, device, cfg.guards == "on"
        self.last_path, self.best_path = Path(cfg.out_dir, "last.pt"), Path(cfg.out_dir, "best.pt")
        seed_all(cfg.seed)
        configure_backends(device)
        self.bf16 = use_bf16(cfg.amp, device)
        self.loaders = build_loaders(cfg, ctx, device)
        n_batches = len(self.loaders.train)
        self.steps_per_epoch = min(n_batches, cfg.max_steps_per_epoch or n_batches)
        steps = cfg.num_epochs * self.steps_per_epoch
        self.compiled = use_compile(cfg.compile, device, self.bf16, cfg.channels_last, steps)
        self.channels_last = use_channels_last(cfg.channels_last, device, self.bf16, self.compiled)
        # validation runs eager: channels_last unless asked not to, also when the compiled
        # training step runs in NCHW (an eager fp32 DeblurNet forward in NCHW: 0.55x)
        self.eval_channels_last = cfg.channels_last != "false"
        # re-checked at every log interval; compiled, each new thread count recompiles
        settle = 2 if self.compiled else 1
        self.threads = ThreadPolicy(parse_threads(cfg.threads), device, settle)
        # net: what the step calls (DDP, compile)
        self.model, net = build_net(cfg, ctx, device, self.compiled, self.channels_last)
        self.optimizer = build_optimizer(self.model, cfg, device)
        self.ema = WeightAverage(self.model, cfg.ema) if cfg.ema else None
        self.final = self.ema.model if self.ema else self.model  # validated, saved as best
        self.scheduler = build_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        self.per_step_schedule = cfg.scheduler == "cosine"
        # guards off: the seed's loss (stock MS-SSIM), its evaluation and its metric code
        loss_cls = CombinedLoss if self.guarded else legacy.SeedCombinedLoss
        self.criterion = loss_cls(cfg.alpha, cfg.beta)
        self.eval_criterion = loss_cls(cfg.alpha, cfg.beta)  # its own counters
        self.evaluate = evaluate if self.guarded else legacy.evaluate_seed_style
        metric_fn = image_metrics if self.guarded else legacy.seed_calculate_metrics
        self.guard = StepGuard(device)
        self.progress = Progress()
        self.epoch = 0  # the epoch in progress
        # --inject_fault: the same objects, wrapped so that faults fire at their step/epoch
        self.injector = faults.FaultInjector(cfg.inject_fault, rank=ctx.rank)
        parts = faults.instrument(
            self.injector,
            step_of=lambda: self.progress.step,
            epoch_of=lambda: self.epoch,
            net=net,
            train_loader=self.loaders.train,
            criterion=self.criterion,
            eval_model=self.final,
            metrics=metric_fn,
            model=self.model,
        )
        self.net, self.train_batches, self.loss_fn = parts.net, parts.train_loader, parts.criterion
        self.eval_model, self.metrics = parts.eval_model, parts.metrics
        self.tracker = Tracker(
            cfg.experiment,
            cfg.tracking_uri,
            cfg.out_dir,
            enabled=ctx.is_main,
            retry_interval_s=cfg.tracking_retry_s,
            system_metrics=cfg.system_metrics,
        )
        self.last_batch: torch.Tensor | None = None  # rerun under NanDetector before a stop
        self.resumed_from: Path | None = None  # the checkpoint, when resumed
        self.changes: list[tuple[str, tuple]] = []  # settings changed on resume, applied

    def run(self) -> TrainResult:
        cfg, resumed = self.cfg, self._resume()  # _resume replaces self.progress
        p = self.progress
        if resumed and p.stop_reason == "completed" and p.epoch + 1 >= cfg.num_epochs:
            return self._finished_already()
        p.stop_reason = None  # running (again)
        reason, message = "completed", ""
        try:
            params = None if resumed else cfg.to_dict()  # params are logged once per run
            name = cfg.run_name or Path(cfg.out_dir).name
            p.run_id = self.tracker.start(name, params, p.run_id) or p.run_id
            speed = (
                f"bf16 {'on' if self.bf16 else 'off'} (--amp {cfg.amp}), channels_last "
                f"{'on' if self.channels_last else 'off'} (--channels_last {cfg.channels_last}), "
                f"compile "
                f"{'on' if self.compiled else 'off'} (--compile {cfg.compile})"
            )
            self.tracker.set_tags({"guards": cfg.guards, "speed": speed})
            if self.ctx.is_main:
                log.info("speed: %s", speed)
            if cfg.allow_test_in_train and cfg.train_data != SYNTHETIC:
                self._warn_test_in_train()
            changed = {f"resume_changed.{k}": f"{old} -> {new}" for k, (old, new) in self.changes}
            self.tracker.set_tags(changed)
            if self.ctx.is_main:
                for text in self.loaders.range_warnings:
                    log.warning("data range: %s", text)
            if resumed:
                self._relog_last_epoch()
            else:
                self._save(self.last_path)  # the rollback target until the first epoch ends
            with torch.autograd.set_detect_anomaly(cfg.detect_anomaly):
                for epoch in range(p.epoch + 1, cfg.num_epochs):
                    self.epoch = epoch
                    self._end_epoch(epoch, self._train_epoch(epoch))
        except StopTraining as stop:
            reason, message = stop.reason, stop.message
        except BaseException as exc:  # a crash, a bad file, Ctrl-C, SIGTERM: close the run
            self._abort(exc)
            raise
        try:
            return self._finish(reason, message)
        except BaseException as exc:  # e.g. SIGTERM while the model uploads
            self._abort(exc)
            raise

    def _warn_test_in_train(self) -> None:
        """--allow_test_in_train: say how much of the test set is training data, once in the
        log and as the MLflow tag ``test_in_train`` (validation then measures memorisation)."""
        train, test = PairedImageFolder(self.cfg.train_data), PairedImageFolder(self.cfg.test_data)
        if overlap := shared_test_pairs(train, test):
            self.tracker.set_tags({"test_in_train": overlap})
            if self.ctx.is_main:
                log.warning("--allow_test_in_train: %s; validation measures memorisation", overlap)

    def _abort(self, exc: BaseException) -> None:
        """Tag why the run ends early and mark the MLflow run (KILLED for Ctrl-C and SIGTERM,
        FAILED otherwise); ``last.pt`` stays as the last finished epoch wrote it."""
        if isinstance(exc, KeyboardInterrupt):
            reason = "terminated" if isinstance(exc, Terminated) else "interrupted"
        else:
            reason = "data_error" if isinstance(exc, DatasetError) else "crashed"
        what = one_line(exc.problem) if isinstance(exc, DatasetError) else type(exc).__name__
        line = f"{reason} in epoch {self.epoch} ({what}); last.pt holds epoch {self.progress.epoch}"
        if self.tracker.started:
            self.tracker.set_tags({"stop_reason": reason, "stop_message": line})
        self.tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        if self.ctx.is_main:
            log.warning("Training %s", line)

    # --- one epoch of steps -----------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> torch.Tensor:
        cfg = self.cfg
        self.epoch_start = time.perf_counter()
        seed_all(cfg.seed + 10_000 * (epoch + 1))  # resumable epochs
        self.loaders.sampler.set_epoch(epoch)  # the order and crops depend on (seed, epoch) only
        self.net.train()
        # device-side sums over the steps taken (loss, steps, grad norm), then MS-SSIM fallbacks
        acc = torch.zeros(4, dtype=torch.float64, device=self.device)
        bar = tqdm(
            itertools.islice(self.train_batches, self.steps_per_epoch),  # --max_steps_per_epoch
            total=self.steps_per_epoch,
            desc=f"epoch {epoch}",
            leave=False,
            dynamic_ncols=True,
            disable=not self.ctx.is_main,
        )
        for blur, sharp in bar:
            self._train_step(blur, sharp, acc)
            self.progress.step += 1
            if self.progress.step % cfg.log_every == 0:
                self._check_guard(bar, acc)
        bar.close()
        self._check_guard(None, acc)  # the tail of the epoch
        return acc

    def _train_step(self, blur: torch.Tensor, sharp: torch.Tensor, acc: torch.Tensor) -> None:
        cfg, dev = self.cfg, self.device
        blur, sharp = blur.to(dev, non_blocking=True), sharp.to(dev, non_blocking=True)
        if self.channels_last:
            blur = blur.contiguous(memory_format=torch.channels_last)
        self.last_batch = blur
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.net(blur)
        loss = self.loss_fn(out.float(), sharp)
        loss.backward()
        norm, grads_ok = grad_norm_and_finite(self.model.parameters(), cfg.grad_clip or None)
        if self.guarded:
            # decided on the device and all-reduced: no host sync, the same skip on every rank
            ok = all_ranks_ok(grads_ok & torch.isfinite(loss.detach()))
            self.guard.update(ok)
            masked_step(self.optimizer, ~ok)
        else:
            ok = torch.ones((), dtype=torch.bool, device=dev)
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, ok)  # a skipped step leaves the average unchanged
        self.optimizer.zero_grad(set_to_none=True)
        if self.per_step_schedule:
            self.scheduler.step()  # follows the step count, skipped steps included
        taken = torch.stack([loss.detach().double(), torch.ones_like(acc[0]), norm.double()])
        acc[:3] += torch.where(ok, taken.to(acc.device), torch.zeros_like(taken))

    def _check_guard(self, bar, acc: torch.Tensor) -> None:
        """Read the counters (note: a CPU-GPU sync point, once per log interval); roll back or
        stop after too many consecutive skipped steps. The longest run since the last check
        counts (``max_consecutive_bad``), also one that ended between the two checks."""
        counts, cfg, p = self.guard.read(), self.cfg, self.progress
        self.threads.check()  # fewer threads while other processes hold cores (threads.py)
        if bar is not None:
            loss_sum, taken = acc[:2].tolist()
            # no step taken this epoch yet: there is no loss to show (not 0)
            bar.set_postfix(loss=loss_sum / taken if taken else "skipped",
                            skipped=counts["skipped_total"])  # fmt: skip
        bad = counts["max_consecutive_bad"]
        if bad <= cfg.max_bad_steps:
            self.guard.reset_max()  # the next check judges the runs after this one
            return
        what = f"{bad} consecutive non-finite steps (> --max_bad_steps {cfg.max_bad_steps})"
        if p.rollbacks >= cfg.max_rollbacks:
            raise StopTraining(
                "rollbacks_exhausted",
                f"{what} by step {p.step - 1} after {p.rollbacks} rollback(s) "
                f"(--max_rollbacks {cfg.max_rollbacks}); {self._diagnose()}",
            )
        lr = self.optimizer.param_groups[0]["lr"] * 0.5
        ck = load_checkpoint(self.last_path, map_location=self.device)
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(ck["ema"])
        if self.per_step_schedule:  # LambdaLR resets lr to base_lr * factor at every step
            self.scheduler.base_lrs = [b * 0.5 for b in self.scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.guard.reset_streak()
        p.rollbacks += 1
        if self.ctx.is_main:
            log.warning(
                f"rollback {p.rollbacks}/{cfg.max_rollbacks}: {what} by step "
                f"{p.step - 1}; restored {self.last_path} (epoch {ck['epoch']}), "
                f"lr -> {lr:.3g}"
            )

    def _diagnose(self) -> str:
        """Rerun the offending batch with hooks on every module; name the first NaN source."""
        if self.last_batch is None:
            return "no batch to rerun"
        with torch.no_grad(), NanDetector(self.model) as det:
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
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
            "threads": self.threads.current,
        }
        if stats is not None:
            rec["msssim_fallbacks"] = int(fallbacks)  # this epoch's, all ranks
            self.criterion.reset_stats()
        report, valid = None, False
        if (epoch + 1) % cfg.val_every == 0 or epoch == cfg.num_epochs - 1:
            report = self.evaluate(
                self.eval_model,
                self.loaders.test,
                self.eval_criterion,
                self.device,
                metrics=self.metrics,
                channels_last=self.eval_channels_last,
            )
            rec.update(val_valid_batches=report.n_valid, val_total_batches=report.n_total)
            rec.update(val_valid_images=report.n_images, val_total_images=report.n_images_total)
            rec.update({f"val_skipped_{k}": v for k, v in report.skipped.items()})
            # only a validation over every image counts: the mean of a subset is another
            # quantity, which must not drive the LR nor pick best.pt (the original trusted all)
            valid = not self.guarded or report.complete
            if valid:
                rec.update(val_loss=report.loss, val_psnr=report.psnr, val_ssim=report.ssim)
                if cfg.scheduler == "plateau":
                    self.scheduler.step(report.psnr)  # guards off: NaN and 0.0 go in too
            elif report.ok:  # partial: logged under its own names, for the record only
                rec.update(
                    val_loss_partial=report.loss,
                    val_psnr_partial=report.psnr,
                    val_ssim_partial=report.ssim,
                )
            p.invalid_epochs = 0 if valid else p.invalid_epochs + 1
        rec["epoch_s"] = time.perf_counter() - self.epoch_start  # training + validation
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
            what = "invalid"
            if report.ok:
                what = (
                    f"partial ({report.n_images}/{report.n_images_total} images valid; logged as "
                    "val_*_partial, counted as invalid)"
                )
            msg = (
                f"{p.invalid_epochs} consecutive invalid validation(s) (--max_invalid_epochs "
                f"{cfg.max_invalid_epochs}), last at epoch {epoch}, {what}: {report.summary()}"
            )
            if p.invalid_epochs >= cfg.max_invalid_epochs:
                raise StopTraining("invalid_epochs", msg)
            log.warning("%s; val_psnr not logged, scheduler not stepped, no best checkpoint", msg)

    # --- checkpoints and resume ---------------------------------------------------------------
    def _save(self, path: Path) -> None:
        if self.ctx.is_main:
            p = self.progress
            p.run_id = self.tracker.run_id or p.run_id  # known late after a tracking outage
            objects = (self.model, self.optimizer, self.scheduler, self.guard)
            state = training_state(*objects, p, self.cfg.to_dict(), self.ema)
            save_checkpoint(path, state, self.model)
        distributed.barrier()  # every rank may read it next (rollback)

    def _resume(self) -> bool:
        cfg = self.cfg
        if self.ctx.is_main:
            for tmp in remove_stale_temp_files(cfg.out_dir) if Path(cfg.out_dir).is_dir() else []:
                log.info("removed %s, a checkpoint write interrupted by a crash", tmp)
        path = None
        if cfg.resume is not None:
            path = self.last_path if cfg.resume == "auto" else Path(cfg.resume)
        if path is None or not path.is_file():
            if path is not None:
                log.info("--resume auto: no %s yet, starting a new run", path)
            if self.ctx.is_main and (moved := archive_previous_run(cfg.out_dir)) is not None:
                log.warning(
                    "a new run in %s: the earlier run's files moved to %s", cfg.out_dir, moved
                )
            distributed.barrier()
            return False
        ck = load_checkpoint(path, map_location=self.device)
        objects = (self.model, self.optimizer, self.scheduler, self.guard, self.ema)
        p = restore_training_state(ck, *objects)
        p.run_id = p.run_id or None  # "" when the tracking server was down at the first start
        self.progress, self.resumed_from = p, path
        if p.best_epoch is not None:
            missing = not self.best_path.is_file()
            distributed.barrier()  # every rank looked before rank 0 copies
            if missing:
                self._adopt_best(path.with_name(self.best_path.name))
        # checked by TrainConfig.validate already: only changes RESUME_POLICY applies remain
        changes = resume_changes(ck.get("config", {}), cfg, p.epoch + 1, str(path))
        self.changes = list(changes.items())
        if "learning_rate" in changes:  # the restored state holds the old one
            if self.per_step_schedule:  # LambdaLR: lr = base_lr * factor(step)
                self.scheduler.base_lrs = [cfg.learning_rate for _ in self.scheduler.base_lrs]
                factors = [f(self.scheduler.last_epoch) for f in self.scheduler.lr_lambdas]
            else:
                factors = [1.0] * len(self.optimizer.param_groups)
            for group, factor in zip(self.optimizer.param_groups, factors, strict=True):
                group["lr"] = cfg.learning_rate * factor
        if "patience" in changes and cfg.scheduler == "plateau":
            self.scheduler.patience = cfg.patience
        if self.ctx.is_main:
            jsonl = self.tracker.jsonl_path
            if jsonl.is_file() and (torn := repair_jsonl(jsonl)):
                log.warning("%s: dropped a torn last line (a write cut by the crash): %r",
                            jsonl, torn[:120])  # fmt: skip
            log.info(
                f"resumed from {path}: epoch {p.epoch} done, continuing at epoch "
                f"{p.epoch + 1} (MLflow run {p.run_id})"
            )
            for name, (old, new) in self.changes:
                log.info("--%s changed on resume: %s -> %s (applied)", name, old, new)
        return True

    def _adopt_best(self, source: Path) -> None:
        """``--resume FILE`` into another ``out_dir``: the best checkpoint so far is the one
        beside FILE; copy it, so that this folder holds the whole run. Without it, the best
        is looked for again from the next validation on."""
        p = self.progress
        if source.is_file():
            if self.ctx.is_main:
                self.best_path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, self.best_path)
                log.info("copied %s (epoch %d, the best so far) to %s", source, p.best_epoch,
                         self.best_path)  # fmt: skip
            distributed.barrier()
            return
        if self.ctx.is_main:
            log.warning("%s (epoch %s, the best so far) is missing: the best is looked for "
                        "again from the next validation on", source, p.best_epoch)  # fmt: skip
        p.best_epoch, p.best_psnr = None, -math.inf

    def _relog_last_epoch(self) -> None:
        """Log the checkpoint's last epoch when a crash came between writing the checkpoint and
        logging the epoch. Which steps the run has is asked of the tracking store; when it
        cannot say (unreachable, tracking off), of metrics.jsonl in out_dir and beside the
        checkpoint (``--resume FILE`` from another folder). A step is never logged twice."""
        p = self.progress
        if not p.history or not self.ctx.is_main:
            return
        steps, source = self.tracker.logged_steps(), f"MLflow run {self.tracker.run_id}"
        if steps is None:
            files = dict.fromkeys([self.tracker.jsonl_path, self.resumed_from.with_name(JSONL)])
            files = [f for f in files if f.is_file()]
            steps = {rec["step"] for f in files for rec in read_jsonl(f)[0]}
            where = " and ".join(map(str, files)) or f"no {JSONL}"
            source = f"{where} (the tracking store cannot tell)"
        if p.epoch in steps:
            return
        rec = {k: v for k, v in p.history[-1].items() if k != "epoch"}
        self.tracker.log_metrics(rec, step=p.epoch, raw=not self.guarded)
        log.info("epoch %d was checkpointed but is not in %s: logged now", p.epoch, source)

    def _finished_already(self) -> TrainResult:
        """``--resume`` of a run that completed every epoch, ``--num_epochs`` not raised: one
        line, and nothing trained, logged, registered or written."""
        p = self.progress
        best = self.best_path if p.best_epoch is not None and self.best_path.is_file() else None
        if best is not None:
            ck = load_checkpoint(best, self.device)
            self.final.load_state_dict(ck["ema"]["model"] if self.ema else ck["model"])
        line = (
            f"{self.resumed_from}: the run finished all {p.epoch + 1} epochs (MLflow run "
            f"{p.run_id}); nothing to do (raise --num_epochs to train on)"
        )
        if self.ctx.is_main:
            log.info(line)
        return self._result("completed", line, best, self.resumed_from, p.run_id)

    # --- the end ------------------------------------------------------------------------------
    def _finish(self, reason: str, message: str) -> TrainResult:
        cfg, p = self.cfg, self.progress
        best = self.best_path if p.best_epoch is not None else None
        if reason == "completed" and best is None and self.guarded:
            n_val = sum("val_total_batches" in rec for rec in p.history)
            reason = "no_valid_validation"
            message = (
                f"{p.epoch + 1} epoch(s) ran, and none of the {n_val} validation(s) was valid over "
                "every image (see the val_skipped_* metrics): no best checkpoint"
            )
        if reason == "completed":
            psnr = f"{p.best_psnr:.2f} dB at epoch {p.best_epoch}" if best else "none valid"
            line = f"Training finished: {p.epoch + 1} epochs; best val_psnr {psnr}"
        else:
            line = f"Training stopped ({reason}): {message}"
        if best is not None:  # the best weights: the average's with --ema
            ck = load_checkpoint(best, self.device)
            self.final.load_state_dict(ck["ema"]["model"] if self.ema else ck["model"])
        self.tracker.set_tags({"stop_reason": reason, "guards": cfg.guards, "stop_message": line})
        if self.ctx.is_main:
            self._log_figures()
            if best is not None and cfg.log_model:
                self.tracker.log_model(
                    self.final,
                    cfg.registered_model_name,
                    self.loaders.example,
                    train_crop_size=cfg.crop_size,
                    preset=cfg.model_size if cfg.model_width is None else None,
                    description=self._model_card(),
                )
        self._record_stop(reason)
        self.tracker.end("FINISHED" if reason == "completed" else "FAILED")
        if self.ctx.is_main:
            log.log(logging.INFO if reason == "completed" else logging.WARNING, line)
            if best is None and cfg.log_model:
                name = f" as {cfg.registered_model_name!r}" if cfg.registered_model_name else ""
                log.warning("no valid validation, no best checkpoint: no model was logged or "
                            "registered%s", name)  # fmt: skip
        last = self.last_path if self.last_path.is_file() else None
        return self._result(reason, line, best, last, self.tracker.run_id or p.run_id)

    def _result(
        self, reason: str, line: str, best: Path | None, last: Path | None, run_id: str | None
    ) -> TrainResult:
        p = self.progress
        return TrainResult(
            stop_reason=reason,
            message=line,
            epochs_completed=p.epoch + 1,
            global_step=p.step,
            best_psnr=p.best_psnr if best else math.nan,
            best_epoch=p.best_epoch,
            best_checkpoint=best,
            last_checkpoint=last,
            run_id=run_id,
            skipped_steps=self.guard.read()["skipped_total"],
            rollbacks=p.rollbacks,
            history=p.history,
            model=self.final.eval(),
        )

    def _record_stop(self, reason: str) -> None:
        """Write how the run ended into ``last.pt`` (its state otherwise unchanged: the live
        model may hold the best weights by now, or a stopped epoch's), so that a ``--resume``
        of a finished run knows it."""
        self.progress.stop_reason = reason
        if self.ctx.is_main and self.last_path.is_file():
            state = load_checkpoint(self.last_path)
            save_checkpoint(self.last_path, state | {"stop_reason": reason})
        distributed.barrier()

    def _model_card(self) -> str:
        """What the registered version's description says: the data, the training and the
        best validation (Markdown; MLflow's UI shows it on the version's page)."""
        cfg, p = self.cfg, self.progress
        best = p.history[p.best_epoch] if p.best_epoch is not None else {}
        data = "generated pairs (synth.SyntheticPairs)" if cfg.train_data == SYNTHETIC else (
            f"`{cfg.train_data}`"
        )  # fmt: skip
        return (
            f"DeblurNet `{cfg.model_size}`"
            f"{f' width {cfg.model_width}' if cfg.model_width else ''}, deblur-guard.\n\n"
            f"- data: {data}, {cfg.crop_size} px crops; validation `{cfg.test_data}`\n"
            f"- training: {p.step} steps of batch {cfg.batch_size} ({p.epoch + 1} epochs), "
            f"lr {cfg.learning_rate} {cfg.scheduler}, loss {cfg.alpha} (1 - MS-SSIM) + "
            f"{cfg.beta} Charbonnier{f', EMA {cfg.ema}' if cfg.ema else ''}; "
            f"{best.get('skipped_steps', 0)} skipped steps, {p.rollbacks} rollbacks\n"
            f"- best validation (epoch {p.best_epoch}): PSNR {p.best_psnr:.2f} dB, "
            f"SSIM {best.get('val_ssim', float('nan')):.4f}\n"
            f"- weights-only (config.json + weights.pt, SHA-256 checked): "
            f"`deblur_lib.weights.load_model('models:/{cfg.registered_model_name}/<version>')`"
        )

    def _log_figures(self) -> None:
        """Rank 0: the curves PNG and blur/restored/sharp triplets of the first test images (the
        model as returned: the best checkpoint's weights when there is one)."""
        if not self.progress.history:
            return
        folder = Path(self.cfg.out_dir, "figures")
        curves = figures.curves_png(self.progress.history, folder / "curves.png")
        shard = self.loaders.test.dataset
        pairs = [shard[i] for i in range(min(3, len(shard)))]
        triplets = figures.triplets_png(self.final, pairs, folder / "triplets.png", self.device)
        for path in (curves, triplets):
            self.tracker.log_artifact(path, "figures")
