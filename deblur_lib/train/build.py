"""What ``fit`` trains with, built from a ``TrainConfig``: backends and seeds, the loaders,
the net (DDP, ``torch.compile``), the optimizer and the learning-rate schedule.

Each piece can be built (and tested, and timed by the benchmarks) alone; ``loop.Trainer``
calls them in ``__init__``.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from deblur_lib.data import (
    FreshKeys,
    GlobalBatchSampler,
    KeyedCrops,
    PairedImageFolder,
    data_range_problem,
    image_sizes,
    make_loader,
)
from deblur_lib.models import build_model
from deblur_lib.synth import SyntheticPairs
from deblur_lib.train import distributed
from deblur_lib.train.config import (
    COMPILE_MIN_STEPS,
    SYNTHETIC,
    TrainConfig,
    degradation,
    initial_weights,
)


def configure_backends(device: torch.device) -> None:
    """What training sets on CUDA (the benchmarks call it too, to time the same kernels): TF32
    matmuls and convolutions, and cuDNN autotuning (training crops have one fixed size).
    Nothing on other devices."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def use_bf16(amp: str, device: torch.device) -> bool:
    """``--amp``: ``bf16`` or ``off`` as given; ``auto`` is bf16 where the device computes it
    natively (CUDA with bf16 support; a CPU with bf16 instructions: AVX512-BF16 or AMX), else
    off. Measured (small preset, 128 px, batch 8): emulated bf16 made a training step 0.15x as
    fast on an AVX2 CPU, and 0.71x on an AVX512 CPU without AVX512-BF16 (bf16 + channels_last
    10.1 vs fp32 channels_last 14.1 images/s)."""
    if amp != "auto":
        return amp == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return _native_bf16_cpu(device)


def _native_bf16_cpu(device: torch.device) -> bool:
    """A CPU with bf16 instructions (AVX512-BF16 or AMX). Not oneDNN's own check
    (``mkldnn._is_mkldnn_bf16_supported``): it is true on any AVX512 CPU, where oneDNN converts
    to fp32 and bf16 ran slower than fp32 (``use_bf16``)."""
    if device.type != "cpu":
        return False
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _avx512_cpu(device: torch.device) -> bool:
    """A CPU with AVX512 (with or without its bf16 instructions)."""
    return device.type == "cpu" and torch.cpu._is_avx512_supported()


def use_compile(
    setting: str, device: torch.device, bf16: bool, channels_last: str, steps: int
) -> bool:
    """``--compile``: ``true`` or ``false`` as given; ``auto`` compiles where compiling made
    the whole training loop faster, and only for a run that plans at least
    ``COMPILE_MIN_STEPS`` training ``steps`` (``num_epochs`` x steps per epoch, also when
    resumed late in it; short runs, tests and notebooks would spend more on the compile than it
    saves). ``channels_last`` is the ``--channels_last`` setting (``auto``, ``true``,
    ``false``; see ``use_channels_last``).

    Measured (small preset, 128 px, batch 8; benchmarks/README.md sections 2 and 2b):

    - CPU with AVX512-BF16, bf16 (its ``--amp auto``): compiled bf16 + channels_last ran
      1.23-1.26x eager (33.4 vs 27.1 images/s), the whole loop 1.77x the previous default
      against 1.48x eager; compiled when ``channels_last`` is not ``false`` (bf16 in NCHW was
      not measured compiled). A cold compile took 62-98 s: 1,300-1,700 steps to earn back.
    - CPU with AVX512, fp32: the step compiled in NCHW ran 1.11-1.14x eager channels_last, the
      whole loop within noise (1.40x vs 1.28x the previous default, one round led by each),
      ``make pretrain``'s stage 1 1.06-1.07x (a cold compile included; epochs vary 20 % on
      this VM): eager. ``--compile true`` runs it (in NCHW under ``--channels_last auto``);
      ``make pretrain`` so reproduced the shipped test PSNR (+0.03 dB).
    - AVX2 CPU: compiled 0.87-0.94x: eager. CUDA: not measured (``make bench DEVICE=cuda``):
      eager.
    """
    if setting != "auto":
        return setting == "true"
    if device.type != "cpu" or steps < COMPILE_MIN_STEPS:
        return False
    return bf16 and _native_bf16_cpu(device) and channels_last != "false"


def use_channels_last(setting: str, device: torch.device, bf16: bool, compiled: bool) -> bool:
    """``--channels_last``: ``true`` or ``false`` as given; ``auto`` is on (DeblurNet's 1x1
    convolutions run as GEMMs on channels_last input: 1.43-1.56x an eager fp32 CPU step),
    except for a step compiled (``--compile true``) in fp32 on an AVX512 CPU, which ran faster
    in NCHW (1.74x vs 1.58x the previous default's step without bf16 instructions)."""
    if setting != "auto":
        return setting == "true"
    return not (compiled and not bf16 and _avx512_cpu(device))


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Loaders:
    """``train``: random crops + flips of the training folder, or generated pairs (``--train_data
    synthetic``), this rank's slice of each global batch (``sampler``, see
    ``data.GlobalBatchSampler``). ``test``: full-size images, this rank's slice (no
    padding, so no duplicates). ``example``: the first test pair (blur, sharp), each
    (1, 3, H, W) model space (MLflow input example, range check). ``range_warnings``: what
    ``data.data_range_problem`` found on the first full-size pair of each set."""

    train: DataLoader
    test: DataLoader
    sampler: GlobalBatchSampler
    example: torch.Tensor
    example_sharp: torch.Tensor
    range_warnings: list[str] = field(default_factory=list)


def build_loaders(cfg: TrainConfig, ctx: distributed.DistContext, device: torch.device) -> Loaders:
    if cfg.batch_size % ctx.world_size:
        raise ValueError(
            f"--batch_size {cfg.batch_size} must be divisible by the {ctx.world_size} DDP "
            "processes (it is the global batch)"
        )
    bs = cfg.batch_size // ctx.world_size
    if cfg.train_data == SYNTHETIC:  # endless: sample number epoch * per_epoch + position
        train_ds = SyntheticPairs(
            cfg.crop_size, cfg.epoch_size, cfg.seed, natural_share=cfg.natural_share,
            params=degradation(cfg.kernel_min),
        )  # fmt: skip
        sampler = GlobalBatchSampler(cfg.epoch_size, cfg.batch_size, ctx.rank, ctx.world_size)
        keyed = FreshKeys(train_ds, sampler.steps() * cfg.batch_size)
        first_train = train_ds[0]
    else:
        train_ds = PairedImageFolder(cfg.train_data, crop_size=cfg.crop_size, augment=True)
        n = len(train_ds)
        sampler = GlobalBatchSampler(n, cfg.batch_size, ctx.rank, ctx.world_size, cfg.seed)
        keyed = KeyedCrops(train_ds, cfg.seed)
        first_train = PairedImageFolder(cfg.train_data)[0]
    test_ds = PairedImageFolder(cfg.test_data)
    common = {"device": device, "num_workers": cfg.num_workers, "seed": cfg.seed}
    train = make_loader(keyed, bs, shuffle=False, sampler=sampler, **common)
    shard = Subset(test_ds, range(ctx.rank, len(test_ds), ctx.world_size))
    eval_bs = bs if len(set(image_sizes(test_ds))) == 1 else 1  # mixed sizes cannot be batched
    test = make_loader(shard, eval_bs, shuffle=False, **common)
    blur, sharp = test_ds[0]
    firsts = (("train_data", first_train), ("test_data", (blur, sharp)))
    warnings = [
        f"--{flag} {getattr(cfg, flag)}: {problem}"
        for flag, pair in firsts
        if (problem := data_range_problem(*pair))
    ]
    return Loaders(train, test, sampler, blur[None], sharp[None], warnings)


def build_net(
    cfg: TrainConfig,
    ctx: distributed.DistContext,
    device: torch.device,
    compiled: bool = False,
    channels_last: bool | None = None,
) -> tuple[nn.Module, nn.Module]:
    """(model, net): the raw DeblurNet on ``device`` and what the training step calls (the DDP
    wrapper under torchrun, else the model itself; ``torch.compile``d when ``compiled``: see
    ``use_compile``), in channels_last memory format when ``channels_last`` (None: what
    ``use_channels_last`` decides for ``cfg``). Evaluate, checkpoint and diagnose ``model``."""
    if channels_last is None:
        bf16 = use_bf16(cfg.amp, device)
        channels_last = use_channels_last(cfg.channels_last, device, bf16, compiled)
    model = build_model(cfg.model_size, cfg.model_width)
    init = initial_weights(cfg)  # --init_from (a resumed run then loads its checkpoint)
    if init is not None:
        model.load_state_dict(init)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net: nn.Module = model
    if ctx.enabled:
        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
    if compiled:  # shares model's parameters; evaluation and checkpoints use model
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
