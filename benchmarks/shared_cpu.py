"""Benchmark: a training step on a CPU that another process shares (issue 12, item 1).

    python benchmarks/shared_cpu.py          # small preset, batch 8, 128 px, the default step

torch's OpenMP threads busy-wait at every barrier, so when another process holds one of the
cores a step with one thread per core stalls on the descheduled thread. This measures the
training loop's own step (``Trainer._train_step``, the default recipe: fp32, channels_last)
with the median of ``--steps`` steps each:

* ``idle``: all cores, nothing else running (the reference);
* ``busy, N threads``: one other process spinning on one core, torch at every thread count
  1..cores;
* ``busy, --threads auto``: the same load with ``train.threads.ThreadPolicy`` deciding, as
  ``fit`` does (it samples the machine at each log interval, here every 5 steps).

Target: busy with ``--threads auto`` at most 2x the idle step. Run it alone: the point is the
one process it starts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import _common  # first: puts the repo on sys.path when run as a script
import torch

from deblur_lib.train.threads import ThreadPolicy

TARGET = 2.0


SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass"


def _start_other_process(seconds: float) -> int:
    """Another process's work: a Python busy loop on one core for ``seconds``, started through a
    shell that exits at once, so it is not this process's child (``ThreadPolicy`` counts its
    own children, e.g. DataLoader workers, as its own load). Returns its pid."""
    code = SPIN.format(seconds=seconds)
    out = subprocess.run(
        ["sh", "-c", f'"{sys.executable}" -c "$0" >/dev/null 2>&1 & echo $!', code],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(out.stdout.strip())


def _median_step(h, step, batch, steps: int, policy: ThreadPolicy | None = None) -> float:
    acc = torch.zeros(3, dtype=torch.float64)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        step(h, *batch, acc)
        if policy is not None and i % 5 == 4:
            policy.check()  # what fit does at its log interval
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args) -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    dev = torch.device("cpu")
    step, origin = _common.train_py_step()
    h = _common.step_harness(args.preset, dev, channels_last=True)
    batch = _common.make_batch(args.batch, args.crop, dev)
    given = torch.get_num_threads()  # --threads; the machine block reports it after the run
    torch.set_num_threads(cores)
    idle = _median_step(h, step, batch, args.steps)
    other = _start_other_process(seconds=600)
    try:
        time.sleep(1.0)  # the hog is running
        busy = {}
        for n in range(1, cores + 1):
            torch.set_num_threads(n)
            busy[f"{n} threads"] = _median_step(h, step, batch, args.steps)
        policy = ThreadPolicy(None, dev)  # starts with every core, like fit
        _median_step(h, step, batch, 5, policy)  # its first samples see the hog
        busy["auto"] = _median_step(h, step, batch, args.steps, policy)
        auto_threads = policy.current
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(other, signal.SIGTERM)
        torch.set_num_threads(given)
    ratios = {k: v / idle for k, v in busy.items()}
    return {
        "config": {
            "preset": args.preset,
            "batch": args.batch,
            "crop": args.crop,
            "steps": args.steps,
            "cores": cores,
            "step_code": origin,
            "other_load": "one process spinning on one core",
        },  # fmt: skip
        "idle_step_s": idle,
        "busy_step_s": busy,
        "busy_over_idle": ratios,
        "auto_threads_chosen": auto_threads,
        "target": {"busy_auto_over_idle_max": TARGET, "met": ratios["auto"] <= TARGET},
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = _common.parser(__doc__.splitlines()[0], "shared_cpu")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12)
    args = _common.setup(ap, argv)
    if args.device != "cpu":  # `make bench DEVICE=cuda` runs every script: nothing to measure
        print("shared_cpu: a CPU benchmark (torch's CPU threads); nothing to do on", args.device)
        return 0
    if args.quick:
        args.preset, args.batch, args.crop, args.steps = "tiny", 2, 32, 3
    _common.write(args, run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
