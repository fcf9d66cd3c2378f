"""What a training run reads and writes around the loop: checkpoints, resume, the end.

``RunIO`` is a mixin of ``trainer.Trainer`` (kept apart to keep each module short): it uses the
trainer's ``cfg``, ``ctx``, ``device``, ``model``, ``optimizer``, ``scheduler``, ``guard``,
``progress``, ``tracker``, ``injector``, ``loaders``, ``last_path``, ``best_path`` and
``guarded``. Checkpoints are written by rank 0 only (atomically, finite weights only) and read
by every rank: under torchrun on several nodes ``out_dir`` must be on a shared filesystem.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from deblur_lib import artifacts, distributed
from deblur_lib.checkpoint import (
    load_checkpoint,
    remove_stale_temp_files,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from deblur_lib.train import TrainResult

__all__ = ["RunIO", "archive_previous_run"]
log = logging.getLogger("deblur_lib.train")
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "figures")  # what a run writes in out_dir


def archive_previous_run(out_dir: str | Path) -> Path | None:
    """Move an earlier run's files out of the way of a fresh run in the same ``out_dir``.

    A new run (no ``--resume``) would otherwise overwrite the earlier ``last.pt``/``best.pt``
    and append to its ``metrics.jsonl``. They go to ``out_dir/previous/<UTC time>/``; returns
    that folder, or None when there was nothing to move.
    """
    found = [Path(out_dir, name) for name in RUN_FILES if Path(out_dir, name).exists()]
    if not found:
        return None
    dest = Path(out_dir, "previous", time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    while dest.exists():  # two fresh runs within one second
        dest = dest.with_name(dest.name + "+")
    dest.mkdir(parents=True)
    for path in found:
        path.rename(dest / path.name)
    return dest


class RunIO:
    """Checkpoint save/resume, the re-log after a crash, the final figures and ``TrainResult``."""

    def _save(self, path: Path) -> None:
        if self.ctx.is_main:
            p = self.progress
            p.run_id = self.tracker.run_id or p.run_id  # known late after a tracking outage
            objects = (self.model, self.optimizer, self.scheduler, self.guard)
            save_checkpoint(path, training_state(*objects, p, self.cfg.to_dict()), self.model)
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
        p = restore_training_state(ck, self.model, self.optimizer, self.scheduler, self.guard)
        p.run_id = p.run_id or None  # "" when the tracking server was down at the first start
        self.progress = p
        if self.ctx.is_main:
            log.info(
                f"resumed from {path}: epoch {p.epoch} done, continuing at epoch "
                f"{p.epoch + 1} (MLflow run {p.run_id})"
            )
        return True

    def _relog_last_epoch(self) -> None:
        """Log the checkpoint's last epoch again when a crash came between writing the checkpoint
        and logging the epoch (metrics.jsonl, written first, does not have that step yet)."""
        p, path = self.progress, self.tracker.jsonl_path
        if not p.history or not self.ctx.is_main:
            return
        steps = [-1]
        if path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()
            steps += [json.loads(line)["step"] for line in lines if line.strip()]
        if max(steps) < p.epoch:
            rec = {k: v for k, v in p.history[-1].items() if k != "epoch"}
            self.tracker.log_metrics(rec, step=p.epoch, raw=not self.guarded)
            log.info(
                "epoch %d was checkpointed but not logged before the crash: logged now", p.epoch
            )

    def _finish(self, reason: str, message: str) -> TrainResult:
        cfg, p = self.cfg, self.progress
        best = self.best_path if p.best_epoch is not None else None
        if reason == "completed":
            psnr = f"{p.best_psnr:.2f} dB at epoch {p.best_epoch}" if best else "none valid"
            line = f"Training finished: {p.epoch + 1} epochs; best val_psnr {psnr}"
        else:
            line = f"Training stopped ({reason}): {message}"
        counts = self.guard.read()
        # test hook ($DEBLUR_RANK_REPORT_DIR): this rank's final weights, before best.pt is loaded
        distributed.write_rank_report(
            self.ctx,
            self.model,
            stop_reason=reason,
            skipped_steps=counts["skipped_total"],
            injected=self.injector.injected,
            history=p.history,
        )
        if best is not None:
            self.model.load_state_dict(load_checkpoint(best, self.device)["model"])
        self.tracker.set_tags({"stop_reason": reason, "guards": cfg.guards, "stop_message": line})
        if self.ctx.is_main:
            self._log_figures()
            if best is not None and cfg.log_model:
                self.tracker.log_model(self.model, cfg.registered_model_name, self.loaders.example)
        self.tracker.end("FINISHED" if reason == "completed" else "FAILED")
        if self.ctx.is_main:
            log.log(logging.INFO if reason == "completed" else logging.WARNING, line)
        return TrainResult(
            stop_reason=reason,
            message=line,
            epochs_completed=p.epoch + 1,
            global_step=p.step,
            best_psnr=p.best_psnr if best else math.nan,
            best_epoch=p.best_epoch,
            best_checkpoint=best,
            last_checkpoint=self.last_path if self.last_path.is_file() else None,
            run_id=self.tracker.run_id or p.run_id,
            skipped_steps=counts["skipped_total"],
            rollbacks=p.rollbacks,
            history=p.history,
            model=self.model.eval(),
        )

    def _log_figures(self) -> None:
        """Rank 0: the curves PNG and blur/restored/sharp triplets of the first test images (the
        model as returned: the best checkpoint's weights when there is one)."""
        if not self.progress.history:
            return
        folder = Path(self.cfg.out_dir, "figures")
        curves = artifacts.curves_png(self.progress.history, folder / "curves.png")
        shard = self.loaders.test.dataset
        pairs = [shard[i] for i in range(min(3, len(shard)))]
        triplets = artifacts.triplets_png(self.model, pairs, folder / "triplets.png", self.device)
        for path in (curves, triplets):
            self.tracker.log_artifact(path, "figures")
