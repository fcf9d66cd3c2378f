"""What ``fit`` trains with, built from a ``TrainConfig``: loaders, model, optimizer, loss.

Kept apart from the loop so each piece can be built (and tested) alone, e.g. in a notebook.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, get_worker_info

from deblur_lib.cli import TrainConfig, image_sizes
from deblur_lib.data import PairedImageFolder, make_loader
from deblur_lib.distributed import DistContext
from deblur_lib.models import build_model


def configure_backends(device: torch.device) -> None:
    """What training sets on CUDA (the benchmarks call it too, to time the same kernels): TF32
    matmuls and convolutions, and cuDNN autotuning (training crops have one fixed size).
    Nothing on other devices."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class GlobalBatchSampler(Sampler):
    """Training order that does not depend on the number of processes.

    Every rank draws the same permutation of ``n`` indices from ``(seed, epoch)``, cuts it into
    global batches of ``global_batch`` (the last one completed by wrapping around, so every
    step has a full batch and ranks never get an empty one) and yields its own contiguous
    slice of each, as ``(epoch, position, index)`` keys for :class:`KeyedCrops` (``position``:
    the sample's place in the epoch, counted over all ranks). One process and N processes
    therefore see the same global batches, with the same crops.
    """

    def __init__(self, n: int, global_batch: int, rank: int = 0, world_size: int = 1, seed=0):
        if n < 1 or global_batch % world_size:
            raise ValueError(
                f"GlobalBatchSampler: need n >= 1 and a global batch divisible by the "
                f"{world_size} ranks, got n={n}, global_batch={global_batch}"
            )
        self.n, self.global_batch, self.rank, self.seed = n, global_batch, rank, seed
        self.local_batch = global_batch // world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def steps(self) -> int:
        return -(-self.n // self.global_batch)  # ceil

    def __len__(self) -> int:
        return self.steps() * self.local_batch

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=gen).tolist()
        for step in range(self.steps()):
            start = step * self.global_batch + self.rank * self.local_batch
            for k in range(start, start + self.local_batch):
                yield self.epoch, k, perm[k % self.n]


class KeyedCrops(Dataset):
    """``dataset[i]`` looked up by ``(epoch, position, i)``, its random crop and flips seeded by
    ``(seed, epoch, position)`` alone: the same sample gets the same crop on any rank, with any
    number of workers, and again when a resumed run replays the epoch; an image drawn twice in
    one epoch (the wrapped last batch) gets two different crops."""

    def __init__(self, dataset: PairedImageFolder, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, position, i = key
        seed = (self.seed * 1_000_003 + epoch) * 1_000_003 + position
        if get_worker_info() is None:
            self.dataset.reseed(seed)  # a private generator: the global RNG is left alone
        else:
            torch.manual_seed(seed)  # a worker process's own RNG
        return self.dataset[i]


@dataclass
class Loaders:
    """``train``: random crops + flips, this rank's slice of each global batch (``sampler``,
    see :class:`GlobalBatchSampler`). ``test``: full-size images, this rank's slice (no
    padding, so no duplicates). ``example``: the first test pair (blur, sharp), each
    (1, 3, H, W) model space (MLflow input example, range check). ``range_warnings``: what
    :func:`data_range_problem` found on the first full-size pair of each set."""

    train: DataLoader
    test: DataLoader
    sampler: GlobalBatchSampler
    example: torch.Tensor
    example_sharp: torch.Tensor
    range_warnings: list[str] = field(default_factory=list)


def build_loaders(cfg: TrainConfig, ctx: DistContext, device: torch.device) -> Loaders:
    if cfg.batch_size % ctx.world_size:
        raise ValueError(
            f"--batch_size {cfg.batch_size} must be divisible by the {ctx.world_size} DDP "
            "processes (it is the global batch)"
        )
    bs = cfg.batch_size // ctx.world_size
    train_ds = PairedImageFolder(cfg.train_data, crop_size=cfg.crop_size, augment=True)
    test_ds = PairedImageFolder(cfg.test_data)
    sampler = GlobalBatchSampler(len(train_ds), cfg.batch_size, ctx.rank, ctx.world_size, cfg.seed)
    common = {"device": device, "num_workers": cfg.num_workers, "seed": cfg.seed}
    train = make_loader(
        KeyedCrops(train_ds, cfg.seed), bs, shuffle=False, sampler=sampler, **common
    )
    shard = Subset(test_ds, range(ctx.rank, len(test_ds), ctx.world_size))
    eval_bs = bs if len(set(image_sizes(test_ds))) == 1 else 1  # mixed sizes cannot be batched
    test = make_loader(shard, eval_bs, shuffle=False, **common)
    blur, sharp = test_ds[0]
    firsts = (("train_data", PairedImageFolder(cfg.train_data)[0]), ("test_data", (blur, sharp)))
    warnings = [
        f"--{flag} {getattr(cfg, flag)}: {problem}"
        for flag, pair in firsts
        if (problem := data_range_problem(*pair))
    ]
    return Loaders(train, test, sampler, blur[None], sharp[None], warnings)


def data_range_problem(blur: torch.Tensor, sharp: torch.Tensor) -> str | None:
    """The data-range check (one pair, full size; a host sync: once per run, not per step).

    Model space is [-1, 1]. Values outside it (e.g. [0, 255] data) raise ValueError. Inside
    it, a range confusion cannot be told from the values with certainty, so two signs of one
    give a warning text (None when the pair looks normal): every pixel in the upper half of
    the range (metric-space [0, 1] data read as model space, or images normalised twice) and
    a pair that spans less than 1/16 of the range (8-bit values in a 16-bit file, a wrong
    divisor, a constant frame).
    """
    both = torch.stack([blur.float(), sharp.float()])
    low, high = torch.aminmax(both)
    low, high = float(low), float(high)
    if not (math.isfinite(low) and math.isfinite(high)) or low < -1.001 or high > 1.001:
        raise ValueError(
            f"pixel values in [{low:.4g}, {high:.4g}]: model space is [-1, 1] "
            "(normalise with x / 127.5 - 1 for 8-bit data)"
        )
    if low >= 0.0:
        return (
            f"every pixel is in [{low:.3g}, {high:.3g}], the upper half of model space [-1, 1]: "
            "[0, 1] data read as [-1, 1], or images normalised twice?"
        )
    if high - low < 2.0 / 16:
        return (
            f"the first pair spans only [{low:.3g}, {high:.3g}] of model space [-1, 1]: 8-bit "
            "values in a 16-bit file, a wrong divisor, or a constant frame?"
        )
    return None


def build_net(
    cfg: TrainConfig, ctx: DistContext, device: torch.device
) -> tuple[nn.Module, nn.Module]:
    """(model, net): the raw DeblurNet on ``device`` and what the training step calls (the DDP
    wrapper under torchrun, else the model itself; ``torch.compile``d with ``cfg.compile``).
    Evaluate, checkpoint and diagnose ``model``."""
    model = build_model(cfg.model_size, cfg.model_width).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net: nn.Module = model
    if ctx.enabled:
        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:  # shares model's parameters; evaluation and checkpoints use model
        net = torch.compile(net)
    return model, net


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW, fused on CPU and CUDA: one kernel per step, and it honours ``found_inf`` (the
    sync-free skip of ``guards.masked_step``)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """``plateau``: ReduceLROnPlateau(mode="max") on validation PSNR, stepped only with a
    valid PSNR (guards on). ``cosine``: stepped after every training step; linear warm-up
    from ``lr / warmup_steps`` to ``lr`` over ``cfg.warmup_steps`` steps, then a half cosine
    to 0 at the last of ``num_epochs * steps_per_epoch`` steps (``cosine_warmup_factor``)."""
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", patience=cfg.patience
        )
    total = cfg.num_epochs * steps_per_epoch
    factor = functools.partial(cosine_warmup_factor, warmup=cfg.warmup_steps, total=total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def cosine_warmup_factor(step: int, warmup: int, total: int) -> float:
    """LR multiplier at 0-based ``step``: (step + 1) / warmup during the warm-up, then
    0.5 * (1 + cos(pi * t)) with t going from 0 to 1 over the remaining steps; in (0, 1]
    before ``total``, 0 from ``total`` on."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * t))


def build_criterion(cfg: TrainConfig) -> nn.Module:
    """Guards on: ``losses.CombinedLoss`` (per-sample fallback, device counters). Guards off:
    the seed's ``legacy.SeedCombinedLoss`` (stock MS-SSIM; asserts on crops of 160 px or less)."""
    if cfg.guards == "on":
        from deblur_lib.losses import CombinedLoss

        return CombinedLoss(cfg.alpha, cfg.beta)
    from deblur_lib.legacy import SeedCombinedLoss

    return SeedCombinedLoss(cfg.alpha, cfg.beta)
