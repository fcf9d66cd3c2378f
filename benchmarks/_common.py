"""Shared benchmark plumbing: command-line flags, the machine record, timing, memory, JSON out.

Every benchmark script takes ``--device cpu|cuda``, ``--threads N`` (``torch.set_num_threads``,
recorded), ``--out PATH`` and ``--quick`` (tiny sizes for the smoke test), and writes one JSON
file whose ``machine`` block says where the figures came from: host, CPU model and count, torch
version and threads, device name, ``OMP_WAIT_POLICY``, the load average at start and end, date.

On a shared machine the load average matters: another process's threads make OpenMP's
busy-waiting barriers stall (see benchmarks/README.md), so figures taken at a load average
above the core count are flagged ``machine.noisy = true`` and should be rerun.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python benchmarks/x.py` from a checkout without `pip install -e`
    sys.path.insert(0, str(REPO))


def parser(description: str, name: str) -> argparse.ArgumentParser:
    """An argparse parser with the flags every benchmark shares (``--out`` defaults to
    ``benchmarks/results/<name>.json``, or ``<name>.cuda.json`` with ``--device cuda``)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: os.cpu_count())"
    )
    ap.add_argument("--out", type=Path, default=None, help=f"default results/{name}[.cuda].json")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test; not figures)")
    ap.add_argument(
        "--block",
        type=int,
        default=None,
        help="steps per timed sample (default: 1 CPU, 10 CUDA; on CUDA the host queues steps "
        "ahead as in training, so a per-step sync shows its real cost)",
    )
    ap.set_defaults(_name=name)
    return ap


def setup(ap: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, check ``--device cuda`` is usable, set the thread count, fill the default out path.
    Records ``args.started`` (machine state at start)."""
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but torch.cuda.is_available() is False")
    threads = args.threads or os.cpu_count() or 1
    if threads < 1:
        ap.error(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    if args.block is None:
        args.block = 10 if args.device == "cuda" else 1
    if args.block < 1:
        ap.error(f"--block must be >= 1, got {args.block}")
    if args.out is None:
        suffix = ".cuda" if args.device == "cuda" else ""
        quick = ".quick" if args.quick else ""
        args.out = RESULTS / f"{args._name}{suffix}{quick}.json"
    args.started = {"time": _now(), "load_avg": _load_avg()}
    return args


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _load_avg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def machine(args: argparse.Namespace) -> dict[str, Any]:
    """The machine block of every result file (call at the end: it records the end load)."""
    device = torch.device(args.device)
    end_load = _load_avg()
    cores = os.cpu_count() or 1
    loads = [x for x in (args.started["load_avg"], end_load) if x]
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": args.device,
        "device_name": device_name(device),
        "cpu": cpu_name(),
        "cpu_count": cores,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "started": args.started["time"],
        "finished": _now(),
        "load_avg_start": args.started["load_avg"],
        "load_avg_end": end_load,
        # 1-minute load above the core count: other processes competed for the cores
        "noisy": any(x[0] > cores for x in loads) if device.type == "cpu" else None,
        "quick": bool(args.quick),
        "argv": sys.argv[1:],
    }


def fill_defaults(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    """Set each flag the user left unset (None) to its device- and size-dependent default."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


# --device cuda without params/gpu.yaml: the base preset at full size (sized for <= 20 min)
GPU_FALLBACK = {
    "n_train": 800,
    "n_test": 50,
    "image_size": 256,
    "model_size": "base",
    "num_epochs": 100,
    "batch_size": 16,
    "crop_size": 256,
    "learning_rate": 1e-3,
    "scheduler": "cosine",
    "warmup_steps": 200,
    "alpha": 0.16,
    "beta": 0.84,
    "amp": "bf16",
    "channels_last": True,
}


def gpu_params() -> tuple[dict[str, Any], str]:
    """The GPU run's settings (papermill parameters: ``batch_size``, ``crop_size``,
    ``num_workers``, ...) from ``params/gpu.yaml``, or ``GPU_FALLBACK`` when that file is
    missing; and where they came from."""
    import yaml

    path = REPO / "params" / "gpu.yaml"
    if path.is_file():
        return yaml.safe_load(path.read_text()) or {}, str(path.relative_to(REPO))
    return dict(GPU_FALLBACK), "benchmarks/_common.py GPU_FALLBACK (params/gpu.yaml not found)"


def run_script(
    ap: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    run: Callable[[argparse.Namespace], dict[str, Any]],
) -> int:
    """A script's whole ``main``: parse (``setup``), seed torch with 0, ``run``, ``write``; 0."""
    args = setup(ap, argv)
    torch.manual_seed(0)
    write(args, run(args))
    return 0


def write(args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    """Prepend the machine block, write ``args.out`` (JSON, NaN written as null) and print it."""
    full = {"benchmark": args._name, "machine": machine(args), **result}
    text = json.dumps(_nan_to_none(full), indent=2) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text, end="")
    return full


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def sync(device: torch.device) -> None:
    """Wait for queued device work. Timing only: the code under test never calls this."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of ``fn()`` including its queued device work."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def timed_block(fn: Callable[[], Any], device: torch.device, steps: int) -> float:
    """Wall seconds per call of ``fn`` over ``steps`` back-to-back calls, synced only at the
    ends (the host may run ahead of the device between them, as in a training loop)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def summary(times: Sequence[float]) -> dict[str, float]:
    """Median, min, quartiles (seconds) and the sample count of per-iteration times."""
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "q1_s": q[0],
        "q3_s": q[2],
        "n": len(times),
    }


# --- peak memory ----------------------------------------------------------------------------
def reset_peak_memory(device: torch.device) -> None:
    """CUDA: reset the allocator's peak. CPU: reset the process's peak RSS (VmHWM) by writing 5
    to /proc/self/clear_refs (Linux >= 4.0); silently skipped where that file is read-only."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib() -> float | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def peak_memory_mib(device: torch.device) -> float | None:
    """CUDA: ``max_memory_allocated`` since the last reset (tensors only). CPU: the process's
    peak resident set (``VmHWM`` in /proc/self/status) since the last reset, which includes
    torch's own allocator caches and everything else in the process; None where unavailable.
    (tracemalloc does not see torch's C++ allocations; ``ru_maxrss`` cannot be reset.)"""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kib = _status_kib("VmHWM")
    return None if kib is None else kib / 1024


# --- the training loop's step, without loaders, tracking or checkpoints --------------------
def step_harness(
    preset: str,
    device: torch.device,
    *,
    guarded: bool = True,
    amp: str = "off",
    channels_last: bool = False,
    grad_clip: float = 1.0,
    width: int | None = None,
    seed: int = 0,
) -> Any:
    """An object carrying what ``deblur_lib.train.loop.Trainer._train_step`` reads (``cfg``,
    ``net``, ``model``, ``optimizer`` (fused AdamW, ``build.build_optimizer``), ``loss_fn``
    (``CombinedLoss``), ``guard``, no per-step scheduler, ...), so that
    :func:`train_step` runs the loop's own step code. Same ``seed`` -> same initial weights.

    The criterion is ``CombinedLoss`` whether or not ``guarded``: ``--guards off`` in the loop
    also swaps in the seed's loss, whose cost benchmarks/loss_metrics.py measures on its own;
    here only the step guard differs.
    """
    from types import SimpleNamespace

    from deblur_lib.guards import StepGuard
    from deblur_lib.losses import CombinedLoss
    from deblur_lib.train import build
    from deblur_lib.train.config import TrainConfig
    from deblur_lib.train.distributed import DistContext

    cfg = TrainConfig(
        model_size=preset,
        model_width=width,
        amp=amp,
        channels_last=channels_last,
        grad_clip=grad_clip,
        guards="on" if guarded else "off",
        device=device.type,
    )
    torch.manual_seed(seed)
    model, net = build.build_net(cfg, DistContext(), device)
    return SimpleNamespace(
        cfg=cfg,
        device=device,
        ctx=DistContext(),
        model=model,
        net=net,
        optimizer=build.build_optimizer(model, cfg, device),
        loss_fn=CombinedLoss(cfg.alpha, cfg.beta),
        guard=StepGuard(device),
        per_step_schedule=False,  # constant lr: no scheduler stepping inside the step
        scheduler=None,
        guarded=guarded,
        bf16=amp == "bf16",
        channels_last=channels_last,
        ema=None,  # no weight average: the step alone
        last_batch=None,
        acc=torch.zeros(3, dtype=torch.float64, device=device),
    )


def train_py_step() -> tuple[Callable[..., None], str]:
    """(step function, where it comes from): the training loop's own ``_train_step``, so every
    benchmark times exactly the step that ``fit`` runs."""
    from deblur_lib.train.loop import Trainer

    return Trainer._train_step, "deblur_lib.train.loop.Trainer._train_step"


def make_batch(
    batch: int, crop: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed (blur, sharp) model-space batch on the host, pinned when training on CUDA (as
    ``data.make_loader`` delivers it): smooth random 'sharp' images and a box-blurred copy."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((batch, 3, crop // 8, crop // 8), generator=g)
    sharp = torch.nn.functional.interpolate(coarse, size=(crop, crop), mode="bicubic")
    sharp = (sharp + 0.05 * torch.randn(sharp.shape, generator=g)).clamp(0, 1)
    blur = torch.nn.functional.avg_pool2d(sharp, 5, 1, 2)
    blur, sharp = blur * 2 - 1, sharp * 2 - 1
    if device.type == "cuda":
        blur, sharp = blur.pin_memory(), sharp.pin_memory()
    return blur.contiguous(), sharp.contiguous()


# --- counting host-device syncs ---------------------------------------------------------------
SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")


class CountHostReads:
    """Context manager counting Python-level calls of the Tensor methods that read a value back
    to the host (``SYNC_METHODS``): each is a host-device sync when the tensor is on a GPU.
    Catches reads from Python code (ours, torch's Python optimizers); not C++-internal ones."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(SYNC_METHODS, 0)
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> CountHostReads:
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original
            setattr(torch.Tensor, name, self._wrap(name, original))
        return self

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(tensor: torch.Tensor, *a: Any, **k: Any) -> Any:
            self.counts[name] += 1
            return original(tensor, *a, **k)

        return wrapper

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class CountCudaSyncs:
    """Context manager counting the warnings of ``torch.cuda.set_sync_debug_mode("warn")``: one
    per synchronizing CUDA call (``.item()``, a blocking copy, ``nonzero``, ...), from Python
    or C++. CUDA only."""

    def __enter__(self) -> CountCudaSyncs:
        import warnings

        self._catcher = warnings.catch_warnings(record=True)
        self._records = self._catcher.__enter__()
        warnings.simplefilter("always")
        self._mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.set_sync_debug_mode(self._mode)
        self._catcher.__exit__(*exc)
        self.messages = [str(w.message) for w in self._records if "synchroniz" in str(w.message)]

    @property
    def total(self) -> int:
        return len(self.messages)
