"""Deblur your own photos: the ``deblur`` API (``python -m deblur_lib.predict`` is its CLI).

Spaces and types (``deblur`` returns the type, range, dtype and mode it got):

* ``torch.Tensor`` (3, H, W) or (N, 3, H, W), float, **model space** [-1, 1]; returned in its
  dtype and on its device, clamped to [-1, 1]. Values are not checked (that would sync a GPU).
* ``numpy.ndarray`` (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA; uint8 [0, 255], uint16
  [0, 65535] or float in [0, 1] (checked). Gray goes through the net as three equal channels
  and comes back as their mean; alpha is carried through untouched.
* ``PIL.Image.Image``: L, I;16 (and I;16B/L/N, returned as I;16), I (values 0..65535), RGB,
  RGBA and LA keep their mode (alpha untouched); 1 becomes L; P and PA become RGB, or RGBA
  when the palette has transparency; CMYK, YCbCr, LAB and HSV become RGB. ``icc_profile`` is
  copied. The API does not apply EXIF orientation (the CLI does).
* a list or tuple of the above (mixed allowed): a list of results. Equal sizes are batched.

Large images: ``tile=SIZE`` runs SIZE x SIZE tiles (``tile_overlap`` px shared with each
neighbour) in batches of equal-size tiles and blends them with a separable raised-cosine
cross-fade (weight sin^2 rising over the overlap with the previous tile, cos^2 falling over
the overlap with the next, 1 elsewhere; the accumulated weights are divided out, so a constant
output stays exactly constant and a single tile is returned unchanged). Without ``tile``,
an image whose estimated activation memory exceeds ``max_memory_mb`` is tiled automatically
with the largest tile that fits. Estimate (``estimate_memory_mb``), fp32:
``padded H * padded W * (BYTES_PER_PX_PER_WIDTH * width + BYTES_PER_PX_FIXED)`` bytes, the
peak resident-set rise of one forward under ``torch.inference_mode`` measured on the CPU
(torch 2.13, 1 thread): 290, 601 and 1241 B/px for width 8, 16 and 32 (the tiny, small and
base presets) at 512 and 1024 px, i.e. 38.9 B/px per channel of width. The default budget,
``DEFAULT_MAX_MEMORY_MB`` = 4096, keeps a 6000 x 4000 photo with the 'small' preset (whole:
14.8 GiB by this estimate) to one 2536 px tile at a time, about 5.5 GiB of process memory
in all (the image, its float copies and the blending accumulators add ~40 B/px; measured
on a 3000 x 2000 image with a 512 MiB budget: peak resident set 714 MiB above the baseline,
i.e. ~35 B/px besides the activations): it runs on a 24 GiB CPU machine (and on 8 GiB).
The budget also caps how many images or tiles go into one
forward (``batch_size`` is the upper limit).

Tiles and global pooling: DeblurNet's channel attention averages each feature map over the
whole input, so a tile's output depends on the tile and tiled and whole outputs differ.
``tiling_gap`` measures it. ``tlc=SIZE`` (NAFNet's test-time local converter, Chu et al.
2022) replaces that global average by a local SIZE x SIZE px average (scaled per U-Net level;
NAFNet uses 1.5x the training crop), so a pixel's statistics no longer depend on the input's
extent beyond that window.

Self-ensemble: ``ensemble`` in (1, 2, 4, 8) runs the net on that many flips/rotations of the
input (identity, horizontal flip, 180-degree rotation, both, then the transposing 90/270
rotations) and averages the inverse-transformed outputs.

The command line (files, folders, metrics.csv) is ``deblur_lib.predict.__main__``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from deblur_lib.metrics import denormalize, psnr, ssim
from deblur_lib.models import DeblurNet

DEFAULT_MAX_MEMORY_MB = 4096.0  # activation budget per forward (see the module docstring)
BYTES_PER_PX_PER_WIDTH = 40  # measured 38.9 B/px per channel of width (fp32, CPU)
BYTES_PER_PX_FIXED = 24  # the (3, H, W) fp32 input and output of one forward
TLC_BYTES_PER_PX_PER_WIDTH = 1  # TLC: measured +0.2 B/px per width (small, 512 px); allowance
DEFAULT_WIDTH = 32  # assumed for a model without a ``width`` attribute (memory estimate)
ENSEMBLE_SIZES = (1, 2, 4, 8)
# (rot90 quarter turns k, horizontal flip): the first 4 keep H x W, the last 4 transpose it
_TRANSFORMS = ((0, False), (0, True), (2, False), (2, True), (1, False), (1, True), (3, False),
               (3, True))  # fmt: skip
_INT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_TO_RGB_MODES = ("CMYK", "YCbCr", "LAB", "HSV", "RGBX")


class NonFiniteOutputError(RuntimeError):
    """The network produced NaN or inf (broken weights, an fp overflow): nothing is returned."""


# --- memory and tiling ------------------------------------------------------------------------
def estimate_memory_mb(width: int, h: int, w: int, multiple: int = 1, tlc: bool = False) -> float:
    """Estimated peak activation memory (MiB, fp32) of one DeblurNet forward of one (3, h, w)
    input with ``width`` channels; the input is padded to a multiple of ``multiple``."""
    hp, wp = math.ceil(h / multiple) * multiple, math.ceil(w / multiple) * multiple
    per_px = BYTES_PER_PX_PER_WIDTH * width + BYTES_PER_PX_FIXED
    if tlc:
        per_px += TLC_BYTES_PER_PX_PER_WIDTH * width
    return hp * wp * per_px / 2**20


@dataclass(frozen=True)
class TilePlan:
    """How one H x W image is run: ``tile`` (th, tw) px, or None for the whole image;
    ``overlap`` px; ``batch``: images or tiles per forward; ``estimate_mb``: per input."""

    tile: tuple[int, int] | None
    overlap: int
    batch: int
    estimate_mb: float


def plan_tiling(
    model: nn.Module,
    h: int,
    w: int,
    *,
    tile: int | None = None,
    tile_overlap: int = 32,
    batch_size: int = 4,
    max_memory_mb: float = DEFAULT_MAX_MEMORY_MB,
    tlc: bool = False,
) -> TilePlan:
    """The ``TilePlan`` for an h x w image: ``tile`` when given (a tile covering the image
    means no tiling), else the whole image when its estimate fits ``max_memory_mb``, else the
    largest square tile (a multiple of the model's pad multiple, at least
    2 * tile_overlap + that multiple) that fits."""
    if tile is not None and not 0 <= tile_overlap < tile:
        raise ValueError(f"tile_overlap must be in [0, tile); got {tile_overlap} and tile {tile}")
    width = getattr(model, "width", DEFAULT_WIDTH)
    multiple = getattr(model, "multiple", 1)
    budget = float(max_memory_mb)

    def fits(est: float) -> int:
        if est <= 0 or math.isinf(budget):
            return batch_size
        return max(1, min(batch_size, int(budget // est)))

    if tile is None:
        est = estimate_memory_mb(width, h, w, multiple, tlc)
        if est <= budget:
            return TilePlan(None, 0, fits(est), est)
        per_px = estimate_memory_mb(width, 1, 1, 1, tlc)
        side = int(math.sqrt(budget / per_px)) // multiple * multiple
        tile = max(side, 2 * tile_overlap + multiple, multiple)
    if tile >= h and tile >= w:
        est = estimate_memory_mb(width, h, w, multiple, tlc)
        return TilePlan(None, 0, fits(est), est)
    th, tw = min(tile, h), min(tile, w)
    est = estimate_memory_mb(width, th, tw, multiple, tlc)
    return TilePlan((th, tw), tile_overlap, fits(est), est)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the fewest ``tile`` px tiles covering ``length`` px with neighbours
    sharing at least ``overlap`` px, spread evenly (first at 0, last ending at ``length``)."""
    if tile >= length:
        return [0]
    n = 1 + math.ceil((length - tile) / (tile - overlap))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def tile_windows(starts: Sequence[int], tile: int) -> list[Tensor]:
    """1-D blending weights (tile,) per tile: sin^2 rising over the overlap with the previous
    tile, cos^2 falling over the overlap with the next, 1 elsewhere. Where two tiles overlap
    their weights sum to 1; where three do (overlap > tile / 2) the blend divides by the sum."""
    windows = []
    for i, start in enumerate(starts):
        wnd = torch.ones(tile, dtype=torch.float64)
        if i > 0:
            ov = starts[i - 1] + tile - start
            ramp = torch.sin(0.5 * math.pi * (torch.arange(ov, dtype=torch.float64) + 0.5) / ov)
            wnd[:ov] *= ramp.square()
        if i + 1 < len(starts):
            ov = start + tile - starts[i + 1]
            ramp = torch.cos(0.5 * math.pi * (torch.arange(ov, dtype=torch.float64) + 0.5) / ov)
            wnd[tile - ov :] *= ramp.square()
        windows.append(wnd.float())
    return windows


# --- TLC: local instead of global statistics --------------------------------------------------
class LocalMeanPool2d(nn.Module):
    """Mean over a ``kernel`` x ``kernel`` window around each position, same size out
    (N, C, H, W) -> (N, C, H, W) (windows clipped to the map; edges replicate the nearest full
    window, as NAFNet's TLC); the global mean (N, C, 1, 1) when the window covers the map.
    Separable box sums from cumulative sums, in float32."""

    def __init__(self, kernel: int) -> None:
        super().__init__()
        if kernel < 1:
            raise ValueError(f"kernel must be >= 1, got {kernel}")
        self.kernel = kernel

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        kh, kw = min(self.kernel, h), min(self.kernel, w)
        if kh == h and kw == w:
            return x.mean(dim=(-2, -1), keepdim=True)
        y = _box_sum(_box_sum(x.float(), kh, -2), kw, -1) / (kh * kw)
        ph, pw = h - y.shape[-2], w - y.shape[-1]
        y = F.pad(y, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="replicate")
        return y.to(x.dtype)


def _box_sum(x: Tensor, k: int, dim: int) -> Tensor:
    """Sums of k consecutive values along ``dim``: size n -> n - k + 1."""
    n = x.shape[dim]
    c = torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), x.cumsum(dim)], dim)
    return c.narrow(dim, k, n - k + 1) - c.narrow(dim, 0, n - k + 1)


def with_local_statistics(model: DeblurNet, size: int) -> DeblurNet:
    """A copy of ``model`` whose channel attention averages over ``size`` x ``size`` input px
    (``LocalMeanPool2d``, kernel ceil(size / 2**level) at each U-Net level) instead of the
    whole image. Inputs of at most ``size`` px give the same output as ``model``."""
    if not isinstance(model, DeblurNet):
        raise TypeError(f"TLC needs a DeblurNet, got {type(model).__name__}")
    if size < 1:
        raise ValueError(f"TLC size must be >= 1 px, got {size}")
    net = copy.deepcopy(model)
    levels = len(net.encoders)
    stages = [(enc, i) for i, enc in enumerate(net.encoders)] + [(net.middle, levels)]
    stages += [(dec, levels - 1 - j) for j, dec in enumerate(net.decoders)]
    for stage, level in stages:
        for block in stage:
            block.sca[0] = LocalMeanPool2d(math.ceil(size / 2**level))
    return net


# --- the inference engine ---------------------------------------------------------------------
@dataclass
class _Options:
    tile: int | None
    tile_overlap: int
    batch_size: int
    ensemble: int
    max_memory_mb: float
    device: torch.device
    amp: bool
    channels_last: bool
    tlc: int | None


class _Engine:
    """Runs a model on lists of (3, H, W) model-space tensors per ``_Options``. A context
    manager: puts the model (or a working copy, when it must move device, change memory format
    or get TLC) in eval mode and restores every module's training flag on exit."""

    def __init__(self, model: nn.Module, opts: _Options) -> None:
        self.model, self.opts = model, opts
        self._flags: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> _Engine:
        opts, model = self.opts, self.model
        param = next(model.parameters(), None)
        here = param.device if param is not None else opts.device
        same = here.type == opts.device.type and opts.device.index in (None, here.index)
        if opts.tlc is not None:
            net = with_local_statistics(model, opts.tlc)
        elif not same or opts.channels_last:
            net = copy.deepcopy(model)
        else:
            net = model
            self._flags = [(m, m.training) for m in model.modules()]
        net = net.to(opts.device)
        if opts.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net.eval()
        return self

    def __exit__(self, *exc: object) -> None:
        for module, flag in self._flags:
            module.training = flag

    def tiled(self, h: int, w: int) -> bool:
        """Whether an h x w image runs in tiles under these options."""
        return self._plan(h, w).tile is not None

    def restore(self, xs: Sequence[Tensor]) -> list[Tensor]:
        """Restored (3, H, W) float32 model-space tensors, clamped to [-1, 1], each on its
        input's device; equal sizes (and devices) batched, ``batch_size`` images at most, and
        an image that runs in tiles alone (its tiles are batched), so that memory stays
        bounded by one large image."""
        out: list[Tensor | None] = [None] * len(xs)
        groups: dict[tuple, list[int]] = {}
        for i, x in enumerate(xs):
            groups.setdefault((tuple(x.shape), x.device), []).append(i)
        for idx in groups.values():
            n = 1 if self.tiled(*xs[idx[0]].shape[-2:]) else self.opts.batch_size
            for k in range(0, len(idx), n):
                chunk = idx[k : k + n]
                y = self.restore_batch(torch.stack([xs[i].float() for i in chunk]))
                for i, yi in zip(chunk, y, strict=True):
                    out[i] = yi
        return out  # type: ignore[return-value]

    def restore_batch(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) -> restored (N, 3, H, W) float32 on x's device, clamped to [-1, 1].
        Raises NonFiniteOutputError when the output holds NaN or inf (one host read)."""
        acc = None
        with torch.inference_mode():
            for k, flip in _TRANSFORMS[: self.opts.ensemble]:
                xt = _transform(x, k, flip)
                yt = self._forward(xt)
                y = _invert(yt, k, flip)
                acc = y if acc is None else acc.add_(y)
            if self.opts.ensemble > 1:
                acc = acc.div_(self.opts.ensemble)
            if not bool(torch.isfinite(acc).all()):  # note: a host-device sync per batch
                raise NonFiniteOutputError(
                    f"the model produced NaN/inf for a batch of shape {tuple(x.shape)}"
                )
            return acc.clamp_(-1, 1)

    def _plan(self, h: int, w: int) -> TilePlan:
        opts = self.opts
        return plan_tiling(
            self.net,
            h,
            w,
            tile=opts.tile,
            tile_overlap=opts.tile_overlap,
            batch_size=opts.batch_size,
            max_memory_mb=opts.max_memory_mb,
            tlc=opts.tlc is not None,
        )

    def _forward(self, x: Tensor) -> Tensor:
        plan = self._plan(*x.shape[-2:])
        if plan.tile is None:
            return torch.cat([self._run(c) for c in x.split(plan.batch)])
        return self._forward_tiled(x, plan)

    def _forward_tiled(self, x: Tensor, plan: TilePlan) -> Tensor:
        (th, tw), (h, w) = plan.tile, x.shape[-2:]
        ys, xs = tile_starts(h, th, plan.overlap), tile_starts(w, tw, plan.overlap)
        wys, wxs = tile_windows(ys, th), tile_windows(xs, tw)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        wsum = torch.zeros((h, w), dtype=torch.float32, device=x.device)
        for (y0, wy), (x0, wx) in (
            (a, b) for a in zip(ys, wys, strict=True) for b in zip(xs, wxs, strict=True)
        ):
            wsum[y0 : y0 + th, x0 : x0 + tw] += wy[:, None].to(x.device) * wx.to(x.device)
        jobs = [(n, y0, x0) for n in range(x.shape[0]) for y0 in ys for x0 in xs]
        wy_of, wx_of = dict(zip(ys, wys, strict=True)), dict(zip(xs, wxs, strict=True))
        for k in range(0, len(jobs), plan.batch):
            batch = jobs[k : k + plan.batch]
            crops = torch.stack([x[n, :, y0 : y0 + th, x0 : x0 + tw] for n, y0, x0 in batch])
            res = self._run(crops)
            for (n, y0, x0), r in zip(batch, res, strict=True):
                wnd = (wy_of[y0][:, None] * wx_of[x0]).to(x.device)
                out[n, :, y0 : y0 + th, x0 : x0 + tw] += r * wnd
        return out.div_(wsum)

    def _run(self, x: Tensor) -> Tensor:
        """One forward of (B, 3, h, w) on the engine's device; float32 on x's device."""
        opts = self.opts
        xd = x.to(opts.device, non_blocking=True)
        if opts.channels_last:
            xd = xd.contiguous(memory_format=torch.channels_last)
        with torch.autocast(opts.device.type, dtype=torch.bfloat16, enabled=opts.amp):
            y = self.net(xd)
        return y.float().to(x.device).contiguous()


def _transform(x: Tensor, k: int, flip: bool) -> Tensor:
    if flip:
        x = x.flip(-1)
    return x.rot90(k, (-2, -1)) if k else x


def _invert(y: Tensor, k: int, flip: bool) -> Tensor:
    if k:
        y = y.rot90(-k, (-2, -1))
    return y.flip(-1) if flip else y


def _options(
    model: nn.Module,
    tile: int | None,
    tile_overlap: int,
    batch_size: int,
    ensemble: int,
    device: str | torch.device | None,
    max_memory_mb: float,
    amp: bool | None,
    channels_last: bool | None,
    tlc: int | None,
) -> _Options:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 1):
        raise ValueError(f"tile must be a positive int or None, got {tile!r}")
    if not isinstance(tile_overlap, int) or tile_overlap < 0:
        raise ValueError(f"tile_overlap must be an int >= 0, got {tile_overlap!r}")
    if tile is not None and tile_overlap >= tile:
        raise ValueError(f"tile_overlap ({tile_overlap} px) must be smaller than tile ({tile} px)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if ensemble not in ENSEMBLE_SIZES:
        raise ValueError(f"ensemble must be one of {ENSEMBLE_SIZES}, got {ensemble!r}")
    if not max_memory_mb > 0:
        raise ValueError(f"max_memory_mb must be > 0, got {max_memory_mb!r}")
    if tlc is not None and (isinstance(tlc, bool) or not isinstance(tlc, int) or tlc < 1):
        raise ValueError(f"tlc must be a window size in px (int >= 1) or None, got {tlc!r}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    cuda = device.type == "cuda"
    if channels_last is None:  # a DeblurNet runs its 1x1 convs as GEMMs on channels_last input
        channels_last = isinstance(model, DeblurNet)  # (models.pointwise): 1.6x a CPU forward
    return _Options(
        tile=tile,
        tile_overlap=tile_overlap,
        batch_size=batch_size,
        ensemble=ensemble,
        max_memory_mb=float(max_memory_mb),
        device=device,
        amp=cuda if amp is None else bool(amp),
        # a DeblurNet runs its 1x1 convs as GEMMs on channels_last input (models.pointwise):
        # 1.6x a CPU forward (small preset, 512 px); other modules are left as they are
        channels_last=isinstance(model, DeblurNet)
        if channels_last is None
        else bool(channels_last),
        tlc=tlc,
    )


# --- conversions ------------------------------------------------------------------------------
@dataclass
class _ArrayMeta:
    dtype: np.dtype
    gray: bool
    alpha: np.ndarray | None


def _array_to_model(arr: np.ndarray) -> tuple[Tensor, _ArrayMeta]:
    """(H, W) / (H, W, 3) / (H, W, 4) uint8, uint16 or float [0, 1] -> (3, H, W) model space."""
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or arr.size == 0:
        raise ValueError(
            f"expected a non-empty (H, W), (H, W, 3) or (H, W, 4) array, got shape {arr.shape}"
        )
    if arr.dtype == np.uint8 or arr.dtype == np.uint16:
        scale = float(np.iinfo(arr.dtype).max)
    elif arr.dtype.kind == "f":
        lo, hi = float(np.min(arr)), float(np.max(arr))
        if not (math.isfinite(lo) and math.isfinite(hi) and lo >= 0.0 and hi <= 1.0):
            raise ValueError(
                f"a float image must lie in [0, 1] (metric space); got {lo}..{hi}, "
                f"shape {arr.shape}, dtype {arr.dtype}"
            )
        scale = 1.0
    else:
        raise TypeError(f"image dtype must be uint8, uint16 or float, got {arr.dtype}")
    alpha = arr[..., 3].copy() if arr.ndim == 3 and arr.shape[2] == 4 else None
    rgb = arr[..., :3] if arr.ndim == 3 else arr[..., None]
    t = torch.from_numpy(np.ascontiguousarray(rgb).astype(np.float32)).permute(2, 0, 1)
    t = t.expand(3, -1, -1) if arr.ndim == 2 else t
    x = t.div(scale).mul(2).sub(1).contiguous()
    return x, _ArrayMeta(arr.dtype, arr.ndim == 2, alpha)


def _model_to_array(y: Tensor, meta: _ArrayMeta) -> np.ndarray:
    """(3, H, W) model space -> the array type ``meta`` describes."""
    v = denormalize(y).permute(1, 2, 0).cpu().numpy()
    if meta.gray:
        v = v.mean(axis=2)
    if meta.dtype.kind == "f":
        out = v.astype(meta.dtype)
    else:
        top = np.iinfo(meta.dtype).max
        out = np.clip(np.rint(v * top), 0, top).astype(meta.dtype)
    if meta.alpha is not None:
        out = np.concatenate([out, meta.alpha[..., None]], axis=2)
    return out


def _pil_to_array(img: Image.Image) -> tuple[np.ndarray, str]:
    """Pixels of ``img`` as (H, W) / (H, W, 3) / (H, W, 4) uint8 or uint16, and the mode the
    result gets (see the module docstring)."""
    mode = img.mode
    if mode in _INT16_MODES:
        return np.asarray(img).astype(np.uint16), "I;16"
    if mode == "I":
        arr = np.asarray(img)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(
                f"mode I image with values {arr.min()}..{arr.max()}: expected 0..65535"
            )
        return arr.astype(np.uint16), "I"
    if mode in ("1", "L"):
        return np.asarray(img.convert("L")), "L"
    if mode == "LA":
        la = np.asarray(img)
        return np.stack([la[..., 0]] * 3 + [la[..., 1]], axis=2), "LA"
    if mode in ("RGB", "RGBA"):
        return np.asarray(img), mode
    if mode in ("P", "PA"):
        rgba = np.asarray(img.convert("RGBA"))
        if mode == "PA" or "transparency" in img.info:
            return rgba, "RGBA"
        return rgba[..., :3], "RGB"
    if mode in _TO_RGB_MODES:
        return np.asarray(img.convert("RGB")), "RGB"
    raise ValueError(f"unsupported PIL image mode {mode!r} (size {img.size})")


def _array_to_pil(arr: np.ndarray, mode: str, info: dict) -> Image.Image:
    if mode == "LA":
        arr = np.stack([arr[..., :3].mean(axis=2).round().astype(np.uint8), arr[..., 3]], axis=2)
    elif mode == "I":
        arr = arr.astype(np.int32)
    out = Image.fromarray(np.ascontiguousarray(arr))
    if "icc_profile" in info:
        out.info["icc_profile"] = info["icc_profile"]
    return out


def _unpack(obj: Any) -> tuple[list[Tensor], Callable[[list[Tensor]], Any]]:
    """Model-space (3, H, W) tensors from one input object, and the function that turns the
    restored tensors back into that object's type."""
    if isinstance(obj, Tensor):
        if obj.ndim not in (3, 4) or obj.shape[-3] != 3 or not obj.is_floating_point():
            raise ValueError(
                "a tensor image must be float (3, H, W) or (N, 3, H, W) in model space [-1, 1], "
                f"got shape {tuple(obj.shape)} dtype {obj.dtype}"
            )
        if obj.numel() == 0:
            raise ValueError(f"empty tensor image, shape {tuple(obj.shape)}")
        dtype, batched = obj.dtype, obj.ndim == 4
        xs = list(obj.float()) if batched else [obj.float()]
        # stack/clone outside inference mode: the caller gets ordinary tensors
        return xs, lambda ys: torch.stack(ys).to(dtype) if batched else ys[0].clone().to(dtype)
    if isinstance(obj, np.ndarray):
        x, meta = _array_to_model(obj)
        return [x], lambda ys: _model_to_array(ys[0], meta)
    if isinstance(obj, Image.Image):
        arr, mode = _pil_to_array(obj)
        x, meta = _array_to_model(arr)
        info = dict(obj.info)
        return [x], lambda ys: _array_to_pil(_model_to_array(ys[0], meta), mode, info)
    raise TypeError(
        "images must be a torch.Tensor, numpy.ndarray, PIL.Image.Image or a list of them, "
        f"got {type(obj).__name__}"
    )


# --- public API -------------------------------------------------------------------------------
def deblur(
    model: nn.Module,
    images: Any,
    tile: int | None = None,
    tile_overlap: int = 32,
    batch_size: int = 4,
    ensemble: int = 1,
    device: str | torch.device | None = None,
    *,
    max_memory_mb: float = DEFAULT_MAX_MEMORY_MB,
    amp: bool | None = None,
    channels_last: bool | None = None,
    tlc: int | None = None,
) -> Any:
    """Deblur ``images`` with ``model`` (a DeblurNet, or any module mapping model-space
    (N, 3, H, W) to the same shape); returns the type, range, dtype and mode it got.

    images: model-space tensor (3, H, W) / (N, 3, H, W) in [-1, 1]; NumPy (H, W), (H, W, 3),
        (H, W, 4) uint8 / uint16 / float in [0, 1]; a PIL image; or a list of these (see the
        module docstring for modes, gray and alpha).
    tile, tile_overlap: tile side and overlap, px (None: whole images, tiled automatically
        when the estimate exceeds ``max_memory_mb``).
    batch_size: most images or tiles per forward (the memory budget may allow fewer).
    ensemble: 1, 2, 4 or 8 flips/rotations averaged.
    device: where the net runs (None: the model's device); outputs return to each input's
        device. amp: bf16 autocast (None: on CUDA only). channels_last: None: on for a
        DeblurNet (1x1 convs as GEMMs, ``models.pointwise``; 1.6x on the CPU), off otherwise.
    tlc: NAFNet TLC window in px (None: the trained global pooling).

    The model runs in eval mode under ``torch.inference_mode``; its training flags are
    restored afterwards and it is never moved or modified (a copy is used when needed).
    Raises NonFiniteOutputError when the net produces NaN/inf.
    """
    opts = _options(
        model, tile, tile_overlap, batch_size, ensemble, device, max_memory_mb, amp,
        channels_last, tlc,
    )  # fmt: skip
    single = not isinstance(images, list | tuple)
    objs = [images] if single else list(images)
    unpacked = [_unpack(obj) for obj in objs]
    xs = [x for parts, _ in unpacked for x in parts]
    with _Engine(model, opts) as engine:
        ys = engine.restore(xs)
    results, k = [], 0
    for parts, pack in unpacked:
        results.append(pack(ys[k : k + len(parts)]))
        k += len(parts)
    return results[0] if single else results


def tiling_gap(
    model: nn.Module,
    blurred: Iterable[Tensor],
    sharp: Iterable[Tensor] | None = None,
    *,
    tile: int = 256,
    tile_overlap: int = 32,
    tlc: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, list[float]]:
    """How much tiling changes the output, per image (metric space, dB, ``metrics.psnr``).

    blurred, sharp: model-space (3, H, W) tensors (e.g. a ``PairedImageFolder``'s pairs).
    Returns ``tiled_vs_whole``: PSNR of the tiled output against the whole-image output (the
    same ``tlc`` for both; higher = closer); with ``sharp``: ``whole`` and ``tiled``, PSNR of
    each against the sharp image. Whole images run without a memory budget.
    """
    out: dict[str, list[float]] = {"tiled_vs_whole": []}
    sharps = list(sharp) if sharp is not None else None
    if sharps is not None:
        out.update(whole=[], tiled=[])
    for i, x in enumerate(blurred):
        kw = {"tile_overlap": tile_overlap, "device": device, "tlc": tlc}
        whole = deblur(model, x, max_memory_mb=math.inf, **kw)
        tiled = deblur(model, x, tile=tile, **kw)
        w, t = denormalize(whole[None].float()), denormalize(tiled[None].float())
        out["tiled_vs_whole"].append(float(psnr(t, w)[0]))
        if sharps is not None:
            s = denormalize(sharps[i][None].float())
            out["whole"].append(float(psnr(w, s)[0]))
            out["tiled"].append(float(psnr(t, s)[0]))
    return out


def aligned_scores(
    pred: Tensor, target: Tensor, max_shift: int = 0
) -> tuple[float, float, int, int]:
    """(psnr, ssim, dy, dx) of ``pred`` against ``target`` (metric space (3, H, W) in [0, 1])
    at the integer shift within +-``max_shift`` px that maximises PSNR, with ``max_shift`` px
    cropped from every border of both (Levin et al. 2009, for real captures whose sharp frame
    is not pixel-aligned): pred[y + dy, x + dx] is compared with target[y, x]."""
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(
            f"pred and target must be (3, H, W) of one shape, got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}"
        )
    k, (h, w) = max_shift, pred.shape[-2:]
    if k < 0 or h <= 2 * k or w <= 2 * k:
        raise ValueError(f"max_shift {k} px does not fit an image of {h}x{w} (HxW)")
    t = target[None, :, k : h - k, k : w - k]
    shifts = [(dy, dx) for dy in range(-k, k + 1) for dx in range(-k, k + 1)]
    crops = [pred[None, :, k + dy : h - k + dy, k + dx : w - k + dx] for dy, dx in shifts]
    scores = torch.cat([psnr(c, t) for c in crops])
    best = int(scores.argmax())
    dy, dx = shifts[best]
    return float(scores[best]), float(ssim(crops[best], t)[0]), dy, dx
