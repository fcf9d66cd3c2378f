"""DDP plumbing for ``torchrun``: process group, device per rank, a few collectives.

``torchrun --nproc_per_node N -m deblur_lib.train ...`` sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``; with ``WORLD_SIZE > 1`` ``setup`` joins the process group (NCCL on CUDA,
gloo on CPU). Without torchrun everything here is a no-op for a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: ``rank`` of ``world_size``, GPU ``local_rank``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that logs, tracks and writes checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda`` when available else ``cpu``; under DDP, the rank's own GPU."""
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {choice!r}")
    use_cuda = choice == "cuda" or (choice == "auto" and torch.cuda.is_available())
    return torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")


def setup(device_choice: str) -> tuple[DistContext, torch.device]:
    """Join the process group when launched by torchrun; returns the context and the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(), resolve_device(device_choice)
    ctx = DistContext(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", 0)))
    device = resolve_device(device_choice, ctx.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=ctx.rank, world_size=world_size)
    return ctx, device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no host sync on NCCL); identity for one process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def gather_strings(text: str) -> list[str]:
    """Every rank's ``text``, in rank order (diagnostics only: a host round trip)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [text]
    out: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(out, text)
    return [str(t) for t in out]
