"""Benchmark: images/s the data loader delivers vs what a training step consumes. Issue 6, item 3.

    python benchmarks/data_loading.py                  # CPU: small preset, TrainConfig's sizes
    python benchmarks/data_loading.py --device cuda    # GPU: params/gpu.yaml's batch/crop/workers

Two sources. Generated pairs (``--train_data synthetic``: ``SyntheticPairs`` through
``FreshKeys``, new samples every epoch) in the training process and with one worker. And a
synthetic dataset on disk (``synthesize(n_train, size=256)``) in a temporary folder, read by
``PairedImageFolder(crop_size, augment=True)`` through ``make_loader(batch, shuffle=True,
device=...)``, with and without ``cache=True`` (``preload()`` first, so forked workers share
one decoded copy). Loader rate: images over ``--epochs`` epochs after one warm-up epoch (worker
start-up, cache fill). Settings on the CPU: ``TrainConfig``'s batch and crop, make_loader's
default workers (0 on a CPU device), 64 pairs. On CUDA: the GPU run's ``batch_size``,
``crop_size`` and ``num_workers`` (``params/gpu.yaml`` via ``_common.gpu_params``; pinned
memory), the base preset in bf16 + channels_last, and enough pairs for two batches per worker
per epoch, so that the verdict describes the GPU run. ``config.defaults_from`` records which.

Consumption: the loop's own guarded step on the same device, batch size and crop, on a fixed
batch (images/s = batch / median step time). Also measured: the same step fed by the loader
(end to end), which shows any stall. Target: loader >= 2x the step's consumption.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import _common  # first: puts the repo on sys.path when run as a script
import torch

from deblur_lib.data import FreshKeys, GlobalBatchSampler, PairedImageFolder, make_loader
from deblur_lib.synth import SyntheticPairs, synthesize
from deblur_lib.train.build import configure_backends
from deblur_lib.train.config import TrainConfig


def loader_rate(root: Path, args, dev: torch.device, cache: bool) -> dict:
    ds = PairedImageFolder(root, crop_size=args.crop, augment=True, cache=cache)
    if cache:
        t0 = time.perf_counter()
        ds.preload()
        preload_s = time.perf_counter() - t0
    loader = make_loader(ds, args.batch, shuffle=True, device=dev, num_workers=args.workers, seed=0)
    t0 = time.perf_counter()
    for _ in loader:  # warm-up epoch: worker start-up
        pass
    first_epoch_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 0
    for _ in range(args.epochs):
        for blur, _sharp in loader:
            n += blur.shape[0]
    elapsed = time.perf_counter() - t0
    out = {
        "cache": cache,
        "num_workers": loader.num_workers,
        "pin_memory": loader.pin_memory,
        "images": n,
        "seconds": elapsed,
        "images_per_s": n / elapsed,
        "first_epoch_s": first_epoch_s,
    }
    if cache:
        out["preload_s"] = preload_s
    return out


def generator_rate(args, dev: torch.device, workers: int) -> dict:
    """Images/s of ``--train_data synthetic``'s loader: ``SyntheticPairs`` (dead leaves and
    photos, realistic degradation) read through ``FreshKeys`` as ``fit`` reads it, with
    ``workers`` DataLoader processes (0: in the training process)."""
    ds = SyntheticPairs(args.crop, args.batch * 8, seed=0)
    sampler = GlobalBatchSampler(len(ds), args.batch)
    keyed = FreshKeys(ds, sampler.steps() * args.batch)
    loader = make_loader(
        keyed, args.batch, shuffle=False, sampler=sampler, device=dev, num_workers=workers
    )
    for _ in loader:  # warm-up epoch: worker start-up, photo decoding
        pass
    t0, n = time.perf_counter(), 0
    for epoch in range(1, 1 + args.epochs):
        sampler.set_epoch(epoch)  # new samples every epoch, as in training
        for blur, _sharp in loader:
            n += blur.shape[0]
    elapsed = time.perf_counter() - t0
    return {"num_workers": workers, "images": n, "seconds": elapsed, "images_per_s": n / elapsed}


def step_rate(args, dev: torch.device, loader_root: Path | None = None) -> dict:
    """The loop's guarded step on a fixed batch; with ``loader_root``, fed by the cached loader."""
    step, origin = _common.train_py_step()
    h = _common.step_harness(
        args.preset, dev, amp=args.amp, channels_last=args.channels_last, width=args.width
    )
    batch = _common.make_batch(args.batch, args.crop, dev)
    for _ in range(args.warmup):
        step(h, *batch, h.acc)
    fn = lambda: step(h, *batch, h.acc)  # noqa: E731
    times = [
        _common.timed_block(fn, dev, args.block) for _ in range(max(1, args.steps // args.block))
    ]
    out = {"step_code": origin, **_common.summary(times)}
    out["images_per_s"] = args.batch / statistics.median(times)
    if loader_root is not None:
        ds = PairedImageFolder(loader_root, crop_size=args.crop, augment=True, cache=True)
        ds.preload()
        loader = make_loader(
            ds,
            args.batch,
            shuffle=True,
            device=dev,
            num_workers=args.workers,
            seed=0,
            drop_last=True,
        )
        n, done = 0, False
        _common.sync(dev)
        t0 = time.perf_counter()
        while not done:
            for blur, sharp in loader:
                step(h, blur, sharp, h.acc)
                n += blur.shape[0]
                if n >= args.steps * args.batch:
                    done = True
                    break
        _common.sync(dev)
        out["end_to_end_images_per_s"] = n / (time.perf_counter() - t0)
        out["end_to_end_vs_fixed_batch"] = out["end_to_end_images_per_s"] / out["images_per_s"]
    return out


def run(args) -> dict:
    dev = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        t0 = time.perf_counter()
        synthesize(tmp, n_train=args.n_train, n_test=1, size=args.size, seed=0, progress=False)
        synth_s = time.perf_counter() - t0
        root = Path(tmp) / "train"
        loaders = {
            "no_cache": loader_rate(root, args, dev, cache=False),
            "cache": loader_rate(root, args, dev, cache=True),
            "generated_in_process": generator_rate(args, dev, workers=0),
            "generated_1_worker": generator_rate(args, dev, workers=1),
        }
        consume = step_rate(args, dev, loader_root=root)
    need = 2.0 * consume["images_per_s"]
    ratios = {k: v["images_per_s"] / consume["images_per_s"] for k, v in loaders.items()}
    return {
        "config": {
            "n_train": args.n_train,
            "image_size": args.size,
            "crop": args.crop,
            "batch": args.batch,
            "num_workers": args.workers,
            "defaults_from": args.defaults_from,
            "preset": args.preset,
            "width": args.width,
            "amp": args.amp,
            "channels_last": args.channels_last,
            "loader_epochs": args.epochs,
            "timed_steps": args.steps,
            "synthesize_s": synth_s,
        },
        "loader": loaders,
        "train_step": consume,
        "loader_vs_step": ratios,
        "target": {
            "ratio_min": 2.0,
            "met_without_cache": loaders["no_cache"]["images_per_s"] >= need,
            "met_with_cache": loaders["cache"]["images_per_s"] >= need,
            "met_generated": loaders["generated_in_process"]["images_per_s"] >= need,
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = _common.parser(__doc__.splitlines()[0], "data_loading")
    ap.add_argument("--preset", default=None, help="model preset (default: small CPU, base GPU)")
    ap.add_argument("--width", type=int, default=None, help="override the preset's width")
    default_cfg = TrainConfig()
    ap.add_argument(
        "--batch", type=int, default=None, help=f"default {default_cfg.batch_size}, GPU: gpu.yaml's"
    )
    ap.add_argument(
        "--crop", type=int, default=None, help=f"default {default_cfg.crop_size}, GPU: gpu.yaml's"
    )
    ap.add_argument(
        "--amp", choices=["off", "bf16"], default=None, help="default: off CPU, bf16 GPU"
    )
    ap.add_argument("--channels_last", type=int, choices=[0, 1], default=None)
    ap.add_argument(
        "--num_workers",
        dest="workers",
        type=int,
        default=None,
        help="default: make_loader's on CPU, gpu.yaml's on GPU",
    )
    ap.add_argument(
        "--n_train",
        type=int,
        default=None,
        help="synthetic pairs (default 64; GPU: >= 2 batches per worker)",
    )
    ap.add_argument("--size", type=int, default=None, help="synthetic image side (default 256)")
    ap.add_argument("--epochs", type=int, default=None, help="timed loader epochs (default 3)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 6 CPU, 50 GPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default: 1 CPU)")
    args = _common.setup(ap, argv)
    gpu = args.device == "cuda"
    if args.quick:
        defaults = {"preset": "tiny", "crop": 32, "batch": 2, "n_train": 4, "size": 48}
        defaults.update(epochs=1, steps=2, warmup=1)
        args.defaults_from = "--quick sizes"
    elif gpu:
        params, args.defaults_from = _common.gpu_params()
        defaults = {"preset": "base", "crop": params["crop_size"], "batch": params["batch_size"]}
        workers = params.get("num_workers", -1)  # -1 (papermill's "None"): make_loader's default
        defaults.update(workers=None if workers < 0 else workers)
        defaults.update(size=256, epochs=3, steps=50, warmup=10)
    else:
        defaults = {"preset": "small", "crop": default_cfg.crop_size, "n_train": 64}
        defaults.update(batch=default_cfg.batch_size, size=256, epochs=3, steps=6, warmup=1)
        args.defaults_from = "TrainConfig defaults"
    defaults.update(amp="bf16" if gpu else "off", channels_last=1)  # TrainConfig's default
    _common.fill_defaults(args, defaults)
    if args.n_train is None:  # GPU: two batches per worker per epoch (make_loader's default <= 4)
        workers = 4 if args.workers is None else max(1, args.workers)
        args.n_train = max(64, 2 * args.batch * workers)
    args.channels_last = bool(args.channels_last)
    configure_backends(torch.device(args.device))  # as fit()
    _common.write(args, run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
