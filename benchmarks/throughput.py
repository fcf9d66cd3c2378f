"""Benchmark: training throughput (images/s) and peak memory per precision and layout (item 2).

    python benchmarks/throughput.py                  # CPU: small preset, 128 px crops, batch 8
    python benchmarks/throughput.py --device cuda    # GPU: base preset, 256 px crops, batch 16

Each variant runs the loop's own guarded training step (``Trainer._train_step``: fused AdamW,
CombinedLoss, grad clip, ``masked_step``) on a fixed batch with its own identically initialised
model: ``fp32``, ``bf16`` (autocast), ``channels_last``, ``bf16_channels_last``, and
``torch.compile`` of the model in fp32 and in bf16 + channels_last. A compile that fails records
its exception instead of a figure. Steps are timed interleaved (one step of each variant per
round, ``--block`` steps on CUDA, order rotated) after warm-up; images/s = batch / median step
time.

Peak memory, measured per variant after the timing (a few steps each): on CUDA
``torch.cuda.max_memory_allocated`` (tensors); on the CPU the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs) with glibc told to return large blocks to the
OS (``mallopt(M_MMAP_THRESHOLD)`` + ``malloc_trim``) so each variant starts from a clean heap.
``peak_mib`` is that absolute peak, which includes every variant's weights and AdamW state
(all stay alive for the interleaved timing); ``peak_delta_mib`` is the variant's own rise over
what was in use at the reset (CUDA: ``memory_allocated``; CPU: the resident set): its
activations, gradients and temporaries.
Target (H100): bf16 + channels_last >= 1.5x fp32. On the CPU: report. ``default`` compares
what ``fit`` runs by default on the device (channels_last; bf16 where native; compiled where
``build.use_compile`` says so for a run of ``COMPILE_MIN_STEPS`` steps or more) with the
previous default (fp32, NCHW); issue 12's goal: >= 2x. ``compile_s`` is each compile's wall
time: run with ``TORCHINDUCTOR_CACHE_DIR`` set to an empty folder to time cold compiles.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import statistics
import time
from collections.abc import Sequence
from typing import Any

import _common  # first: puts the repo on sys.path when run as a script
import torch

from deblur_lib.train.build import (
    COMPILE_MIN_STEPS,
    configure_backends,
    use_bf16,
    use_channels_last,
    use_compile,
)

EAGER = {
    "fp32": ("off", False),
    "bf16": ("bf16", False),
    "channels_last": ("off", True),
    "bf16_channels_last": ("bf16", True),
}
COMPILED = {
    "compile_fp32": ("off", False),
    "compile_channels_last": ("off", True),
    "compile_bf16_channels_last": ("bf16", True),
}


def _variant(bf16: bool, channels_last: bool, compiled: bool) -> str:
    """The name of the variant above that runs these settings (``compile_bf16`` is none)."""
    parts = ["bf16"] if bf16 else []
    name = "_".join(parts + ["channels_last"] if channels_last else parts) or "fp32"
    return f"compile_{name}" if compiled else name


def default_variants(dev: torch.device) -> tuple[str, str]:
    """The variants ``fit`` runs by default on ``dev`` (``--amp``, ``--channels_last`` and
    ``--compile`` auto): in a run under ``COMPILE_MIN_STEPS`` steps (eager) and in a longer one
    (compiled where ``use_compile`` says so, in the layout ``use_channels_last`` then picks)."""
    bf16 = use_bf16("auto", dev)
    short = _variant(bf16, use_channels_last("auto", dev, bf16, False), False)
    compiled = use_compile("auto", dev, bf16, "auto", COMPILE_MIN_STEPS)
    return short, _variant(bf16, use_channels_last("auto", dev, bf16, compiled), compiled)


# what torch.compile raises when it cannot compile here (no C++ compiler, unsupported op, ...)
COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.CppCompileError)


def _glibc_return_large_blocks() -> bool:
    """Make glibc hand freed blocks >= 128 KiB back to the OS (fixed mmap threshold) and trim
    the heap now, so a later VmHWM reset starts from what is really in use. False off glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold = -3
        ok = libc.mallopt(m_mmap_threshold, 128 * 1024) == 1
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


def build(args, dev: torch.device) -> tuple[dict[str, Any], dict[str, dict]]:
    """Harnesses per variant; compiled ones are compiled here (first step, timed)."""
    harness, notes = {}, {}
    variants = dict(EAGER)
    if args.compile:
        variants.update(COMPILED)
    step, _ = _common.train_py_step()
    batch = _common.make_batch(args.batch, args.crop, dev)
    for name, (amp, cl) in variants.items():
        h = _common.step_harness(
            args.preset, dev, guarded=True, amp=amp, channels_last=cl, width=args.width
        )
        notes[name] = {"amp": amp, "channels_last": cl, "compiled": name in COMPILED}
        if name in COMPILED:
            h.net = torch.compile(h.model)
            t0 = time.perf_counter()
            try:
                step(h, *batch, h.acc)
                _common.sync(dev)
            except COMPILE_ERRORS as exc:
                notes[name]["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                continue
            notes[name]["compile_s"] = time.perf_counter() - t0
        harness[name] = h
    return harness, notes


def run(args) -> dict:
    dev = torch.device(args.device)
    step, origin = _common.train_py_step()
    batch = _common.make_batch(args.batch, args.crop, dev)
    harness, notes = build(args, dev)
    names = list(harness)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.warmup + args.steps):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            h = harness[n]
            t = _common.timed_block(lambda h=h: step(h, *batch, h.acc), dev, args.block)
            if r >= args.warmup:
                times[n].append(t)
    clean_heap = dev.type == "cpu" and _glibc_return_large_blocks()
    results: dict[str, dict] = {}
    for n in notes:
        results[n] = dict(notes[n])
        if n not in harness:
            continue
        h = harness[n]
        med = statistics.median(times[n])
        results[n].update(images_per_s=args.batch / med, **_common.summary(times[n]))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        elif clean_heap:
            _glibc_return_large_blocks()
        if dev.type == "cuda":
            base = torch.cuda.memory_allocated(dev) / 2**20  # all variants' weights + AdamW
        else:
            base = _common.rss_mib()
        _common.reset_peak_memory(dev)
        for _ in range(args.memory_steps):
            step(h, *batch, h.acc)
        _common.sync(dev)
        peak = _common.peak_memory_mib(dev)
        results[n]["peak_mib"] = peak
        results[n]["peak_delta_mib"] = None if base is None or peak is None else peak - base
    fp32 = results["fp32"]["images_per_s"]
    for r in results.values():
        if "images_per_s" in r:
            r["speedup_vs_fp32"] = r["images_per_s"] / fp32
    bf16_cl = results["bf16_channels_last"]["speedup_vs_fp32"]
    on_gpu = dev.type == "cuda"
    # what fit runs by default here against the previous default (fp32, NCHW): issue 12's >= 2x
    bf16_native = use_bf16("auto", dev)
    short, long_run = default_variants(dev)
    if "speedup_vs_fp32" not in results.get(long_run, {}):  # --no_compile, or it failed here
        long_run = short
    speedup = results[long_run]["speedup_vs_fp32"]
    return {
        "config": {
            "preset": args.preset,
            "width": args.width,
            "batch": args.batch,
            "crop": args.crop,
            "warmup_rounds": args.warmup,
            "timed_rounds": args.steps,
            "steps_per_round": args.block,
            "step_code": origin + " (guards on)",
            "memory": (
                "torch.cuda.max_memory_allocated; delta over memory_allocated at the reset"
                if on_gpu
                else "VmHWM after clear_refs reset"
                + (", glibc mmap threshold 128 KiB + malloc_trim" if clean_heap else "")
            ),
        },
        "variants": results,
        "default": {
            "previous": "fp32",
            "now": long_run,
            "now_below_min_steps": short,
            "min_steps": COMPILE_MIN_STEPS,
            "speedup_below_min_steps": results[short]["speedup_vs_fp32"],
            "bf16_native": bf16_native,
            "speedup": speedup,
            "goal_min": 2.0,
            "met": speedup >= 2.0,
        },
        "target": {
            "bf16_channels_last_speedup_min": 1.5 if on_gpu else None,
            "bf16_channels_last_speedup": bf16_cl,
            "met": (bf16_cl >= 1.5) if on_gpu else None,
            "note": "target applies on an H100; on the CPU the figures are reported only",
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = _common.parser(__doc__.splitlines()[0], "throughput")
    ap.add_argument("--preset", default=None, help="model preset (default: small CPU, base GPU)")
    ap.add_argument("--width", type=int, default=None, help="override the preset's width")
    ap.add_argument("--batch", type=int, default=None, help="default: 8 CPU, 16 GPU")
    ap.add_argument("--crop", type=int, default=None, help="px (default: 128 CPU, 256 GPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed rounds (default 20)")
    ap.add_argument(
        "--warmup", type=int, default=None, help="untimed rounds (default: 3 CPU, 2 GPU)"
    )
    ap.add_argument("--memory_steps", type=int, default=2, help="steps per peak-memory reading")
    ap.add_argument("--no_compile", dest="compile", action="store_false", help="skip compile")
    args = _common.setup(ap, argv)
    gpu = args.device == "cuda"
    if args.quick:
        defaults = {"preset": "tiny", "crop": 32, "batch": 2, "steps": 2, "warmup": 1}
        args.memory_steps = 1
    else:
        defaults = {"preset": "base" if gpu else "small", "crop": 256 if gpu else 128}
        defaults.update(batch=16 if gpu else 8, steps=20, warmup=2 if gpu else 3)
    _common.fill_defaults(args, defaults)
    configure_backends(torch.device(args.device))  # as fit()
    _common.write(args, run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
