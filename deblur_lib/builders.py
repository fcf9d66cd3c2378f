"""What ``fit`` trains with, built from a ``TrainConfig``: loaders, model, optimizer, loss.

Kept apart from the loop so each piece can be built (and tested) alone, e.g. in a notebook.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from deblur_lib.cli import TrainConfig, image_sizes
from deblur_lib.data import PairedImageFolder, make_loader
from deblur_lib.distributed import DistContext
from deblur_lib.models import build_model


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Loaders:
    """``train``: random crops + flips, this rank's share of the global batch (``sampler`` under
    DDP). ``test``: full-size images, this rank's slice (no padding, so no duplicates).
    ``example``: the first test blur image, (1, 3, H, W) model space (MLflow input example)."""

    train: DataLoader
    test: DataLoader
    sampler: DistributedSampler | None
    example: torch.Tensor


def build_loaders(cfg: TrainConfig, ctx: DistContext, device: torch.device) -> Loaders:
    if cfg.batch_size % ctx.world_size:
        raise ValueError(
            f"--batch_size {cfg.batch_size} must be divisible by the {ctx.world_size} DDP "
            "processes (it is the global batch)"
        )
    bs = cfg.batch_size // ctx.world_size
    train_ds = PairedImageFolder(cfg.train_data, crop_size=cfg.crop_size, augment=True)
    test_ds = PairedImageFolder(cfg.test_data)
    sampler = None
    if ctx.enabled:
        sampler = DistributedSampler(train_ds, ctx.world_size, ctx.rank, seed=cfg.seed)
    common = {"device": device, "num_workers": cfg.num_workers, "seed": cfg.seed}
    train = make_loader(train_ds, bs, shuffle=sampler is None, sampler=sampler, **common)
    shard = Subset(test_ds, range(ctx.rank, len(test_ds), ctx.world_size))
    eval_bs = bs if len(set(image_sizes(test_ds))) == 1 else 1  # mixed sizes cannot be batched
    test = make_loader(shard, eval_bs, shuffle=False, **common)
    return Loaders(train, test, sampler, test_ds[0][0][None])


def build_net(
    cfg: TrainConfig, ctx: DistContext, device: torch.device
) -> tuple[nn.Module, nn.Module]:
    """(model, net): the raw DeblurNet on ``device`` and what the training step calls (the DDP
    wrapper under torchrun, else the model itself). Evaluate, checkpoint and diagnose ``model``."""
    model = build_model(cfg.model_size, cfg.model_width).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if not ctx.enabled:
        return model, model
    ids = [device.index] if device.type == "cuda" else None
    return model, DistributedDataParallel(model, device_ids=ids)


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW, fused on CPU and CUDA: one kernel per step, and it honours ``found_inf`` (the
    sync-free skip of ``guards.masked_step``)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """``plateau``: ReduceLROnPlateau(mode="max") on validation PSNR, stepped only with a
    valid PSNR (guards on); ``cosine``: CosineAnnealingLR over ``num_epochs``, stepped per epoch."""
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", patience=cfg.patience
        )
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.num_epochs)


def build_criterion(cfg: TrainConfig) -> nn.Module:
    """Guards on: ``losses.CombinedLoss`` (per-sample fallback, device counters). Guards off:
    the seed's ``legacy.SeedCombinedLoss`` (stock MS-SSIM; asserts on crops of 160 px or less)."""
    if cfg.guards == "on":
        from deblur_lib.losses import CombinedLoss

        return CombinedLoss(cfg.alpha, cfg.beta)
    from deblur_lib.legacy import SeedCombinedLoss

    return SeedCombinedLoss(cfg.alpha, cfg.beta)
