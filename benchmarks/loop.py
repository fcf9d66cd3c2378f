"""Benchmark: the whole training loop's speed per speed setting, as the CLI runs it (issue 12).

    python benchmarks/loop.py                 # 2 rounds of 3 runs, 2 epochs of 150 steps each
    python benchmarks/loop.py --rounds 1
    python benchmarks/loop.py --amp off       # fp32: eager (auto) vs compiled

``throughput.py`` times the training step alone; this runs ``python -m deblur_lib.train`` with
``params/pretrain.yaml``'s model and data (small preset, 128 px crops, batch 8, pairs generated
on the fly in the training process) for ``--epochs`` epochs of ``--epoch_size`` pairs, then
validation on a 60-image test split written like ``make pretrain``'s, per speed setting:

- ``previous``: the defaults before issue 12: fp32, NCHW, eager;
- ``default_short``: what ``--amp auto --channels_last auto --compile auto`` run in a run
  under ``COMPILE_MIN_STEPS`` steps (eager, channels_last; bf16 where the CPU has bf16
  instructions);
- ``default_long``: what they run in a run of ``COMPILE_MIN_STEPS`` steps or more (compiled
  where ``build.use_compile`` says so, in the layout ``build.use_channels_last`` then picks;
  absent where it is the same as ``default_short``).

``--amp off`` runs in fp32: ``previous``, ``default_short`` (what ``auto`` runs in fp32:
eager, channels_last) and ``compiled`` (``--compile true``, the layout ``auto`` picks: NCHW on
an AVX512 CPU), to ask whether compiling an fp32 step pays in the whole loop (on an AVX512-BF16
machine it measures the fp32 case of an AVX512 CPU without bf16 instructions).

Runs go one after another, the variants in turn, ``--rounds`` times, each in a fresh process
(``TORCHINDUCTOR_CACHE_DIR`` a new empty folder per benchmark, so the first compiled run
compiles cold and later ones hit the cache). Per run: each epoch's ``epoch_s`` from the run's
own history (training, data generation, validation; the first epoch includes the compile), the
wall time of the process, and ``--threads auto``'s changes of the thread count (a compiled run
recompiles at each new count). ``steady_epoch_s`` is the median over rounds of the epochs after
the first; ``speedup_vs_previous`` compares those.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import _common  # first: puts the repo on sys.path when run as a script
import torch

from deblur_lib.train.build import COMPILE_MIN_STEPS, use_bf16, use_compile
from deblur_lib.weights import load_checkpoint

PREVIOUS = ["--amp", "off", "--channels_last", "false", "--compile", "false"]


def variants(compiled: bool = True, amp: str = "auto") -> dict[str, list[str]]:
    """Speed flags per variant: what ``auto`` resolves to on this machine, short and long
    (``compiled`` False: no compiled variant, as ``--no_compile``; ``amp`` ``off``: fp32)."""
    if amp not in ("auto", "off"):
        raise ValueError(f"amp must be 'auto' or 'off', got {amp!r}")
    cpu = torch.device("cpu")
    bf16 = use_bf16(amp, cpu)
    auto = ["--amp", amp, "--channels_last", "auto"]  # the YAML pins make pretrain's
    found = {"previous": PREVIOUS, "default_short": [*auto, "--compile", "false"]}
    if compiled and use_compile("auto", cpu, bf16, "auto", COMPILE_MIN_STEPS):
        found["default_long"] = [*auto, "--compile", "true"]  # channels_last as auto decides
    elif compiled and amp == "off":  # fp32: auto stays eager; would compiling pay?
        found["compiled"] = [*auto, "--compile", "true"]
    return found


def _one_run(
    args, test_data: Path, tmp: Path, name: str, flags: list[str], k: int, env: dict
) -> dict:
    out = tmp / f"{name}_{k}"
    cmd = [
        sys.executable, "-m", "deblur_lib.train", "--config", str(args.config),
        "--test_data", str(test_data), "--num_epochs", str(args.epochs),
        "--epoch_size", str(args.epoch_size), "--out_dir", str(out),
        "--tracking_uri", f"sqlite:///{tmp}/mlflow.db", "--registered_model_name", "",
        "--log_model", "false", "--system_metrics", "false", *flags, *args.extra,
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=_common.REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: exit {proc.returncode}: {proc.stderr[-2000:]}")
    history = load_checkpoint(out / "last.pt")["history"]
    lines = proc.stderr.replace("\r", "\n").splitlines()  # tqdm redraws with \r
    speed = [line for line in lines if line.startswith("speed: ")]
    changes = [line[line.index("threads: ") :] for line in lines if "threads: " in line]
    return {
        "epoch_s": [round(h["epoch_s"], 2) for h in history],
        "threads": [h["threads"] for h in history],
        "val_psnr": round(history[-1]["val_psnr"], 3),
        "wall_s": round(wall, 1),
        "speed": speed[0].removeprefix("speed: ") if speed else None,
        "thread_changes": changes,  # --threads auto's decisions, with the load it measured
    }


def run(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_loop_") as tmp:
        return _run_in(args, Path(tmp))


def _run_in(args, tmp: Path) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp / "inductor"))
    test_data = args.test_data
    if test_data is None:  # the make pretrain split (its test half: 60 photos, 256 px)
        n_test, size = (2, 48) if args.quick else (60, 256)
        subprocess.run(
            [sys.executable, "-m", "deblur_lib.data", "synth", "--out", str(tmp / "data"),
             "--n_train", "1", "--n_test", str(n_test), "--size", str(size), "--seed", "0"],
            check=True, capture_output=True, cwd=_common.REPO,
        )  # fmt: skip
        test_data = tmp / "data" / "test"
    chosen = variants(args.compile, args.amp)
    runs: dict[str, list[dict]] = {name: [] for name in chosen}
    for k in range(args.rounds):
        for name, flags in chosen.items():
            runs[name].append(_one_run(args, test_data, tmp, name, flags, k, env))
    result: dict[str, dict] = {}
    for name, rs in runs.items():
        later = [s for r in rs for s in r["epoch_s"][1:]]
        result[name] = {
            "flags": " ".join(chosen[name]),
            "runs": rs,
            "first_epoch_s": [r["epoch_s"][0] for r in rs],
            "steady_epoch_s": statistics.median(later) if later else None,
        }
    base = result["previous"]["steady_epoch_s"]
    for r in result.values():
        steady = r["steady_epoch_s"]
        r["speedup_vs_previous"] = base / steady if base and steady else None
    best = max(result, key=lambda n: result[n]["speedup_vs_previous"] or 0)
    return {
        "config": {
            "train_config": str(args.config),
            "epochs": args.epochs,
            "epoch_size": args.epoch_size,
            "rounds": args.rounds,
            "test_data": str(args.test_data or "a make pretrain split of its own"),
            "extra_flags": args.extra,
            "amp": args.amp,
            "min_steps_for_compile": COMPILE_MIN_STEPS,
        },
        "variants": result,
        "fastest": best,
        "goal": {"speedup_min": 2.0, "speedup": result[best]["speedup_vs_previous"]},
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = _common.parser(__doc__.splitlines()[0], "loop")
    ap.add_argument("--config", type=Path, default=_common.REPO / "params" / "pretrain.yaml")
    ap.add_argument("--test_data", type=Path, default=None, help="default: a split of its own")
    ap.add_argument("--epochs", type=int, default=None, help="default 2")
    ap.add_argument("--epoch_size", type=int, default=None, help="pairs per epoch (default 1200)")
    ap.add_argument("--rounds", type=int, default=None, help="default 2")
    ap.add_argument("--no_compile", dest="compile", action="store_false", help="no compiled run")
    ap.add_argument(
        "--amp", choices=("auto", "off"), default="auto",
        help="off: fp32, eager as auto runs it and compiled (--compile true)",
    )  # fmt: skip
    args = _common.setup(ap, argv)
    if args.device != "cpu":
        ap.error("loop.py measures the CPU loop; on CUDA use params/gpu.yaml's run")
    quick = {"epochs": 2, "epoch_size": 4, "rounds": 1}
    _common.fill_defaults(args, quick if args.quick else {"epochs": 2, "epoch_size": 1200})
    _common.fill_defaults(args, {"rounds": 2})
    args.extra = ["--threads", str(args.threads)] if args.threads else []
    if args.quick:  # the tiny preset at 32 px, 2 steps per epoch
        args.extra += ["--model_size", "tiny", "--crop_size", "32", "--batch_size", "2"]
    _common.write(args, run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
