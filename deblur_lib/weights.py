"""Weights on disk: atomic, weights-only files whose contents are checked on every load.

A checkpoint file is a plain dict saved with ``torch.save`` and read back with
``torch.load(..., weights_only=True)``: tensors, numbers, strings, lists and dicts only, so
loading one never runs pickled code. It holds at least ``model`` (a state dict); training
checkpoints (``deblur_lib.train.checkpoint``) add the optimizer, scheduler, RNG and progress.

Integrity (``FORMAT`` 2): torch's zip reader does not check the CRCs of tensor storages, so a
flipped bit in a checkpoint would load as a silently different weight. ``save_checkpoint``
therefore stores ``digest``, a SHA-256 (hex str) over the whole payload, every key but
``digest`` itself: dicts in sorted key order, lists and tuples in order, scalars and strings
by type and value, and each tensor by dtype, shape and the CRC-32 (``zlib.crc32``) of its
bytes in row-major order (its contents, not its storage layout or device). CRC-32 rather than
SHA-256 over the ~80 MB of a base-preset model and AdamW state: it is ~2.5x faster here, and
it detects every error burst up to 32 bits long and all other corruption but one in 2**32.
``load_checkpoint`` recomputes it: a mismatch raises the same ValueError as an unreadable
file (naming the file and both digests). Files of ``FORMAT`` 1 (no digest) still load, with a
logged warning that they are unverified; a ``FORMAT`` 2 file without its digest is refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import zlib
from pathlib import Path

import torch
from torch import nn

FORMAT = 2  # 1: no digest; 2: ``digest`` (see the module docstring)
# What torch.load raises on a truncated or garbage file (zip reader, then the legacy unpickler)
_UNREADABLE = (
    RuntimeError, EOFError, OSError, pickle.UnpicklingError, KeyError, IndexError, ValueError
)  # fmt: skip
log = logging.getLogger(__name__)


def weights_finite(model: nn.Module) -> bool:
    """True when every parameter and buffer is finite. Syncs: call at epoch boundaries only."""
    tensors = [t.detach() for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if not tensors:
        return True
    # note: CPU-GPU sync point (one per call)
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def save_checkpoint(path: str | os.PathLike, state: dict, model: nn.Module | None = None) -> Path:
    """Write ``state`` to ``path`` atomically (temp file in the same folder + ``os.replace``).

    A crash mid-write leaves the previous file intact. With ``model`` given, refuses (ValueError)
    to write when its weights are not finite, so a checkpoint on disk always holds finite weights.
    """
    path = Path(path)
    if model is not None and not weights_finite(model):
        raise ValueError(f"refusing to write {path}: the model's weights are not finite")
    payload = {k: v for k, v in state.items() if k != "digest"} | {"format": FORMAT}
    payload["digest"] = state_digest(payload)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            _write(fh, payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write(fh, payload: dict) -> None:
    """The bytes of a checkpoint (its own function so a crash test can slow it down)."""
    torch.save(payload, fh)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by ``save_checkpoint`` (``weights_only=True``: no pickled code)
    and check its digest; returns the state without ``digest``.

    Raises ValueError naming the file when it is not such a checkpoint, or when its contents
    do not match its digest (corrupted after it was written). A ``FORMAT`` 1 file (no digest)
    loads with a logged warning.
    """
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except _UNREADABLE as exc:
        raise ValueError(f"{path}: not a readable checkpoint ({exc})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path}: not a deblur-guard checkpoint (no 'model' entry)")
    stored, fmt = state.pop("digest", None), state.get("format", 1)
    if not isinstance(fmt, int) or fmt > FORMAT:
        raise ValueError(f"{path}: checkpoint format {fmt!r}; this deblur_lib reads 1 to {FORMAT}")
    if stored is None and fmt == 1:
        log.warning("%s: format 1 checkpoint without a digest: loaded unverified", path)
    elif stored is None:
        raise ValueError(f"{path}: not a readable checkpoint (format {fmt} but no digest)")
    elif (computed := state_digest(state)) != stored:
        raise ValueError(
            f"{path}: not a readable checkpoint (digest mismatch: stored {stored}, computed "
            f"{computed}; its contents changed after it was written)"
        )
    return state


def state_digest(state: dict) -> str:
    """SHA-256 (hex) of ``state`` as the module docstring describes: what ``save_checkpoint``
    stores as ``digest``. Deterministic across processes and devices."""
    h = hashlib.sha256()
    _feed(h, state)
    return h.hexdigest()


def _feed(h, obj) -> None:
    """Update ``h`` with a type-tagged, unambiguous encoding of ``obj`` (see ``state_digest``)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()  # note: a device-host copy for CUDA tensors
        crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy())
        h.update(f"T{t.dtype}{tuple(t.shape)}{crc:08x};".encode())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for key in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, list | tuple):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)};".encode())
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, str):
        data = obj.encode()
        h.update(f"S{len(data)};".encode())
        h.update(data)
    elif isinstance(obj, bytes):
        h.update(f"B{len(obj)};".encode())
        h.update(obj)
    elif obj is None or isinstance(obj, bool | int | float | complex | torch.dtype | torch.device):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())  # repr round-trips (nan, inf, -0.0)
    else:
        raise TypeError(f"checkpoint digest: cannot encode a {type(obj).__name__}: {obj!r:.80}")
