"""Test hooks for training subprocesses, installed by patching: none lives in the package.

``python tests/hooks.py [--step_delay S] [--write_delay S] [--rank_report DIR] -- ARGS``
runs ``python -m deblur_lib.train ARGS`` (also under ``torchrun``, which runs this file as
its script) after installing:

``--step_delay S``   sleep S seconds after every training step, so a test can see the progress
                     bar move and kill the run in the middle of an epoch;
``--write_delay S``  every checkpoint write writes half of the file, flushes it and sleeps S
                     seconds before the rest, so a test can kill the run mid-write;
``--rank_report DIR`` every rank writes ``DIR/rank<R>.json`` at the end of the run (before
                     ``best.pt`` is loaded): the SHA-256 of its final weights, its stop reason,
                     skipped steps, injected faults and history, so a test can check that DDP
                     ranks stayed identical.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

import torch


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer's bytes, in ``state_dict`` order (host copy)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def slow_writes(delay: float) -> None:
    from deblur_lib import weights

    def write(fh, payload: dict) -> None:
        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
        fh.write(data[: len(data) // 2])
        fh.flush()
        os.fsync(fh.fileno())
        time.sleep(delay)
        fh.write(data[len(data) // 2 :])

    weights._write = write


def slow_steps(delay: float) -> None:
    from deblur_lib.train.loop import Trainer

    step = Trainer._train_step

    def slow(self, *args):
        step(self, *args)
        time.sleep(delay)

    Trainer._train_step = slow


def rank_reports(folder: Path) -> None:
    from deblur_lib.train.loop import Trainer

    finish = Trainer._finish

    def report(self, reason: str, message: str):
        facts = {
            "rank": self.ctx.rank,
            "world_size": self.ctx.world_size,
            "weights_sha256": weights_digest(self.model),
            "stop_reason": reason,
            "skipped_steps": self.guard.read()["skipped_total"],
            "injected": self.injector.injected,
            "history": self.progress.history,
        }
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"rank{self.ctx.rank}.json"
        path.write_text(json.dumps(facts, indent=1, default=str))
        return finish(self, reason, message)

    Trainer._finish = report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--step_delay", type=float, default=0.0)
    ap.add_argument("--write_delay", type=float, default=0.0)
    ap.add_argument("--rank_report", type=Path, default=None)
    ap.add_argument("train_args", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    if args.step_delay:
        slow_steps(args.step_delay)
    if args.write_delay:
        slow_writes(args.write_delay)
    if args.rank_report:
        rank_reports(args.rank_report)
    from deblur_lib.train.__main__ import main as train_main

    rest = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    return train_main(rest)


if __name__ == "__main__":
    sys.exit(main())
