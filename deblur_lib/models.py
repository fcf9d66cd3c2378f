"""DeblurNet: a small NAFNet-style residual U-Net (Chen et al. 2022, "Simple Baselines for
Image Restoration").

Input and output are model space: (N, 3, H, W) float in [-1, 1] (the output is not clamped).
The net predicts a residual that is added to the input; the residual scales (beta, gamma) and
the last convolution start at zero, so an untrained net is exactly the identity. Any H, W >= 1
works: the input is padded (reflect, or replicate when the image is too small to reflect) to
a multiple of 2**levels and the output cropped back. No batch statistics: each sample's
output depends on that sample only. Works with `memory_format=torch.channels_last`, and is
faster there: in that layout (the training default on every device, `train.config`) the 1x1
convolutions run as matrix products over the contiguous channels (`F.linear`) and LayerNorm2d
as `F.layer_norm` over them, with the same parameters and the same result to float rounding
(measured on this project's 2-core AVX2 CPU, small preset, batch 8, 128 px, fp32: a training
step 1.43x faster than NCHW, where channels_last with stock convolutions gave 1.04x).

Presets (parameter counts measured with `count_parameters`, checked by the tests):

=======  =====  ============  ======  ============  ==========  =========================
preset   width  enc_blocks    middle  dec_blocks    parameters  use (pad multiple)
=======  =====  ============  ======  ============  ==========  =========================
tiny         8  (1, 1)             1  (1, 1)            19,899  tests, smoke runs (4)
small       16  (1, 1, 2)          2  (1, 1, 1)        438,387  CPU demo (8)
base        32  (1, 1, 1, 2)       2  (1, 1, 1, 1)   6,816,611  GPU training (16)
=======  =====  ============  ======  ============  ==========  =========================

Weights files: ``save_weights`` writes ``weights.pt`` (a CPU state dict, ``torch.save``) and
``config.json`` = ``{"format": WEIGHTS_FORMAT, "architecture": {...}, "sha256": <hex digest of
weights.pt>, "train_crop_size": int or null, ...}`` (more keys, such as a model card's, are
allowed and ignored). An architecture is ``{"preset": "tiny"|"small"|"base"|null, "width": int,
"enc_blocks": [int, ...], "middle_blocks": int, "dec_blocks": [int, ...]}``; explicit keys
override the preset's. ``load_from_files`` checks the file's SHA-256 before ``torch.load``
(``weights_only=True``: never unpickled) reads it, and refuses non-finite weights.
``DeblurNet.from_pretrained(NAME)`` does that for the weights shipped in
``deblur_lib/pretrained/`` (``NAME.pt`` + its model card ``NAME.json``). Other sources (the
MLflow registry, training checkpoints) are ``deblur_lib.weights.load_model``. Every problem
raises ``WeightsError`` (a ValueError) naming the source.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
DEFAULT_MODEL = "deblur-guard-small"  # the shipped weights: predict's default --model
WEIGHTS_FORMAT = "deblur-guard-weights/1"
WEIGHTS_FILE, CONFIG_FILE = "weights.pt", "config.json"
ARCH_KEYS = ("preset", "width", "enc_blocks", "middle_blocks", "dec_blocks")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"width": 8, "enc_blocks": (1, 1), "middle_blocks": 1, "dec_blocks": (1, 1)},
    "small": {"width": 16, "enc_blocks": (1, 1, 2), "middle_blocks": 2, "dec_blocks": (1, 1, 1)},
    "base": {
        "width": 32,
        "enc_blocks": (1, 1, 1, 2),
        "middle_blocks": 2,
        "dec_blocks": (1, 1, 1, 1),
    },
}


def _channels_last(x: torch.Tensor) -> bool:
    """(N, C, H, W) stored as NHWC (and not trivially so: C > 1)."""
    return x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last)


def pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a 1x1, ungrouped, unstrided convolution. On a channels_last ``x``
    (N, C, H, W) it is computed as ``F.linear`` over the contiguous channels (one GEMM; oneDNN's
    NCHW and NHWC 1x1 convolutions are several times slower on the CPU at these small channel
    counts); the result is channels_last too."""
    if _channels_last(x):
        w = conv.weight.view(conv.out_channels, conv.in_channels)
        return F.linear(x.permute(0, 2, 3, 1), w, conv.bias).permute(0, 3, 1, 2)
    return conv(x)


class LayerNorm2d(nn.Module):
    """LayerNorm over channels at each pixel of (N, C, H, W); statistics in float32 (so fp16
    activations cannot overflow the variance), output in the input dtype."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _channels_last(x):  # the channels are the contiguous dim: one fused layer_norm
            y = F.layer_norm(
                x.permute(0, 2, 3, 1).float(), (x.shape[1],), self.weight.view(-1),
                self.bias.view(-1), self.eps,
            )  # fmt: skip
            return y.permute(0, 3, 1, 2).to(x.dtype)
        x32 = x.float()
        mean = x32.mean(dim=1, keepdim=True)
        var = (x32 - mean).square().mean(dim=1, keepdim=True)
        y = (x32 - mean) * torch.rsqrt(var + self.eps)
        return (y * self.weight + self.bias).to(x.dtype)


class SimpleGate(nn.Module):
    """Split channels in two halves and multiply them: (N, 2C, H, W) -> (N, C, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class NAFBlock(nn.Module):
    """NAFNet block: LN -> 1x1 -> 3x3 depthwise -> SimpleGate -> simplified channel attention
    -> 1x1, then LN -> 1x1 -> SimpleGate -> 1x1; both branches scaled by zero-initialised
    beta/gamma, so a fresh block is the identity. (N, C, H, W) -> (N, C, H, W)."""

    def __init__(self, c: int, dw_expand: int = 2, ffn_expand: int = 2) -> None:
        super().__init__()
        dw, ffn = c * dw_expand, c * ffn_expand
        self.norm1 = LayerNorm2d(c)
        self.conv1 = nn.Conv2d(c, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, 3, padding=1, groups=dw)
        self.gate = SimpleGate()
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw // 2, dw // 2, 1))
        self.conv3 = nn.Conv2d(dw // 2, c, 1)
        self.norm2 = LayerNorm2d(c)
        self.conv4 = nn.Conv2d(c, ffn, 1)
        self.conv5 = nn.Conv2d(ffn // 2, c, 1)
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = self.gate(self.conv2(pointwise(self.conv1, self.norm1(inp))))
        x = pointwise(self.conv3, x * self.sca(x))
        y = inp + x * self.beta
        x = pointwise(self.conv5, self.gate(pointwise(self.conv4, self.norm2(y))))
        return y + x * self.gamma


class DeblurNet(nn.Module):
    """NAFNet-style U-Net: (N, 3, H, W) model space -> input + residual, same shape.

    `width` channels at full resolution, doubled at each of len(enc_blocks) 2x2-stride
    downsamplings; `enc_blocks[i]`/`dec_blocks[i]` NAFBlocks per level, `middle_blocks` at
    the bottom; PixelShuffle upsampling and additive skips.
    """

    def __init__(
        self,
        width: int = 32,
        enc_blocks: Sequence[int] = (1, 1, 1, 2),
        middle_blocks: int = 2,
        dec_blocks: Sequence[int] = (1, 1, 1, 1),
    ) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        if len(enc_blocks) != len(dec_blocks):
            raise ValueError(
                f"enc_blocks {tuple(enc_blocks)} and dec_blocks {tuple(dec_blocks)} "
                "must have the same length (one decoder level per encoder level)"
            )
        if min((middle_blocks, *enc_blocks, *dec_blocks)) < 0:
            raise ValueError("block counts must be >= 0")
        self.width = width
        self.multiple = 2 ** len(enc_blocks)
        self.intro = nn.Conv2d(3, width, 3, padding=1)
        self.encoders, self.downs = nn.ModuleList(), nn.ModuleList()
        self.ups, self.decoders = nn.ModuleList(), nn.ModuleList()
        c = width
        for n in enc_blocks:
            self.encoders.append(nn.Sequential(*[NAFBlock(c) for _ in range(n)]))
            self.downs.append(nn.Conv2d(c, 2 * c, 2, stride=2))
            c *= 2
        self.middle = nn.Sequential(*[NAFBlock(c) for _ in range(middle_blocks)])
        for n in dec_blocks:
            self.ups.append(nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.PixelShuffle(2)))
            c //= 2
            self.decoders.append(nn.Sequential(*[NAFBlock(c) for _ in range(n)]))
        self.ending = nn.Conv2d(width, 3, 3, padding=1)
        nn.init.zeros_(self.ending.weight)  # residual starts at 0: the untrained net is identity
        nn.init.zeros_(self.ending.bias)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        if not isinstance(inp, torch.Tensor):
            raise TypeError(f"DeblurNet expects a torch.Tensor, got {type(inp).__name__}")
        if inp.ndim != 4 or inp.shape[1] != 3 or not inp.is_floating_point() or inp.numel() == 0:
            raise ValueError(
                f"DeblurNet expects a non-empty float (N, 3, H, W) tensor, "
                f"got shape {tuple(inp.shape)} dtype {inp.dtype}"
            )
        h, w = inp.shape[-2:]
        pad_h, pad_w = -h % self.multiple, -w % self.multiple
        x = inp
        if pad_h or pad_w:  # pad right/bottom; reflect needs pad < size, else replicate
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            x = F.pad(inp, (0, pad_w, 0, pad_h), mode=mode)
        x = self.intro(x)
        skips = []
        for encoder, down in zip(self.encoders, self.downs, strict=True):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        x = self.middle(x)
        for decoder, up, skip in zip(self.decoders, self.ups, reversed(skips), strict=True):
            x = decoder(up(x) + skip)
        residual = self.ending(x)
        if pad_h or pad_w:
            residual = residual[..., :h, :w]
        return inp + residual

    @classmethod
    def from_pretrained(
        cls, name: str = DEFAULT_MODEL, map_location: str | torch.device = "cpu"
    ) -> DeblurNet:
        """The shipped weights ``name`` (``deblur_lib/pretrained/NAME.pt`` + its model card
        ``NAME.json``), in eval mode: the file's SHA-256 is checked against the card, then it is
        read with ``torch.load(weights_only=True)`` (never unpickled). WeightsError (a
        ValueError) names what is wrong; ``shipped_models()`` lists the names."""
        if name not in shipped_models():
            raise WeightsError(
                f"no shipped weights {name!r}; shipped: {shipped_models() or 'none'}"
            )
        path = PRETRAINED_DIR / f"{name}.pt"
        model, _ = load_from_files(
            path, path.with_suffix(".json"), source=name, kind="shipped", map_location=map_location
        )
        return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_model(preset: str = "base", width: int | None = None) -> DeblurNet:
    """A DeblurNet from `MODEL_PRESETS[preset]`, with `width` overriding the preset's width."""
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(MODEL_PRESETS)}")
    kwargs = dict(MODEL_PRESETS[preset])
    if width is not None:
        kwargs["width"] = width
    return DeblurNet(**kwargs)


class WeightsError(ValueError):
    """A model source cannot be loaded safely; the message names the source and the problem."""


@dataclass(frozen=True)
class ModelInfo:
    """Where a model came from. ``kind``: registry, checkpoint, folder or shipped; ``sha256``:
    of the weights file (None for a checkpoint, which carries its own digest);
    ``train_crop_size``: px, the training crop (for ``predict``'s TLC), None when unknown."""

    source: str
    kind: str
    architecture: dict[str, Any]
    sha256: str | None
    train_crop_size: int | None


# --- architecture -----------------------------------------------------------------------------
def architecture(model: DeblurNet, preset: str | None = None) -> dict[str, Any]:
    """The architecture config of ``model`` (explicit widths and block counts), JSON-ready."""
    if not isinstance(model, DeblurNet):
        raise TypeError(f"architecture() needs a DeblurNet, got {type(model).__name__}")
    return {
        "preset": preset,
        "width": model.width,
        "enc_blocks": [len(e) for e in model.encoders],
        "middle_blocks": len(model.middle),
        "dec_blocks": [len(d) for d in model.decoders],
    }


def network_of(arch: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of an architecture config that fix the network (all but the preset's name),
    per-level block counts as lists: two configs describe the same net when these are equal."""
    return {k: list(v) if isinstance(v := arch[k], tuple | list) else v for k in ARCH_KEYS[1:]}


def preset_architecture(preset: str, width: int | None = None) -> dict[str, Any]:
    """The architecture config of ``models.build_model(preset, width)``."""
    if preset not in MODEL_PRESETS:
        raise WeightsError(
            f"unknown model preset {preset!r}; choose one of {sorted(MODEL_PRESETS)}"
        )
    arch = dict(MODEL_PRESETS[preset], preset=preset)
    if width is not None:
        arch["width"] = width
    arch["enc_blocks"], arch["dec_blocks"] = list(arch["enc_blocks"]), list(arch["dec_blocks"])
    return {k: arch[k] for k in ARCH_KEYS}


def build_from_architecture(arch: Mapping[str, Any]) -> DeblurNet:
    """A freshly initialised DeblurNet from an architecture config (see the module docstring)."""
    if not isinstance(arch, Mapping):
        raise WeightsError(f"architecture must be a JSON object, got {type(arch).__name__}")
    unknown = sorted(set(arch) - set(ARCH_KEYS))
    if unknown:
        raise WeightsError(f"unknown architecture keys {unknown}; expected some of {ARCH_KEYS}")
    preset = arch.get("preset")
    kwargs = dict(preset_architecture(preset)) if preset is not None else {}
    kwargs.update({k: v for k, v in arch.items() if v is not None})
    kwargs.pop("preset", None)
    missing = [k for k in ARCH_KEYS[1:] if k not in kwargs]
    if missing:
        raise WeightsError(f"architecture {dict(arch)} lacks {missing} (and names no preset)")
    try:
        return DeblurNet(
            width=kwargs["width"],
            enc_blocks=tuple(kwargs["enc_blocks"]),
            middle_blocks=kwargs["middle_blocks"],
            dec_blocks=tuple(kwargs["dec_blocks"]),
        )
    except (ValueError, TypeError) as exc:
        raise WeightsError(f"invalid architecture {dict(arch)}: {exc}") from None


# --- weights files --------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_weights(
    path: str | os.PathLike, sha256: str, map_location: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """A state dict from a weights-only file, after checking its SHA-256 against ``sha256``.

    The digest is checked before ``torch.load`` reads a byte, and ``torch.load`` runs with
    ``weights_only=True``: a file holding pickled objects (code) is refused either way.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if not isinstance(sha256, str) or not _SHA256.match(sha256):
        raise WeightsError(f"{path}: expected sha256 is not a 64-digit hex string: {sha256!r}")
    computed = file_sha256(path)
    if computed != sha256:
        raise WeightsError(
            f"{path}: SHA-256 mismatch (expected {sha256}, file has {computed}): "
            "the weights file is not the one its config describes"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).splitlines()[0][:200]
        raise WeightsError(
            f"{path}: refused: not a weights-only file (torch.load(weights_only=True) found "
            f"pickled objects and did not run them: {first})"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise WeightsError(f"{path}: unreadable weights file ({exc})") from None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise WeightsError(f"{path}: not a state dict (a mapping of names to tensors)")
    return dict(state)


def model_from_state(
    arch: Mapping[str, Any], state: Mapping[str, torch.Tensor], source: str
) -> DeblurNet:
    """Build ``arch`` and load ``state`` into it (strict; every weight must be finite)."""
    model = build_from_architecture(arch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise WeightsError(
            f"{source}: weights do not fit architecture {dict(arch)}: {first}"
        ) from None
    bad = [n for n, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise WeightsError(f"{source}: non-finite weights in {bad[:5]} ({len(bad)} tensors)")
    return model.eval()


def save_weights(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    train_crop_size: int | None = None,
    preset: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``folder/weights.pt`` (the CPU state dict, ``torch.save``) and ``folder/config.json``
    (architecture, SHA-256 of weights.pt, ``train_crop_size``, ``extra`` keys); returns both
    paths. ``model``: a DeblurNet, also wrapped in DDP or ``torch.compile``."""
    net = getattr(model, "module", model)
    net = getattr(net, "_orig_mod", net)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights_path, config_path = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    torch.save(state, weights_path)
    config = {
        **(extra or {}),
        "format": WEIGHTS_FORMAT,
        "architecture": architecture(net, preset),
        "sha256": file_sha256(weights_path),
        "train_crop_size": train_crop_size,
    }
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return weights_path, config_path


def _read_config(path: Path, source: str) -> dict[str, Any]:
    if not path.is_file():
        raise WeightsError(f"{source}: {path.name} not found ({path})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{source}: {path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or "architecture" not in config or "sha256" not in config:
        raise WeightsError(f"{source}: {path} lacks 'architecture' and 'sha256'")
    if config.get("format", WEIGHTS_FORMAT) != WEIGHTS_FORMAT:
        raise WeightsError(
            f"{source}: {path} has format {config['format']!r}, expected {WEIGHTS_FORMAT}"
        )
    return config


def load_from_files(
    weights_path: str | os.PathLike,
    config_path: str | os.PathLike,
    *,
    source: str | None = None,
    kind: str = "folder",
    map_location: str | torch.device = "cpu",
) -> tuple[DeblurNet, ModelInfo]:
    """The model described by ``config_path`` (config.json or a model card) with the weights of
    ``weights_path``, SHA-256 checked; in eval mode on ``map_location``."""
    source = source or str(weights_path)
    config = _read_config(Path(config_path), source)
    state = read_weights(weights_path, config["sha256"], map_location)
    model = model_from_state(config["architecture"], state, source)
    crop = config.get("train_crop_size")
    info = ModelInfo(source, kind, dict(config["architecture"]), config["sha256"], crop)
    return model.to(map_location), info


def shipped_models(pretrained_dir: str | os.PathLike | None = None) -> list[str]:
    """Names of the shipped weights (``NAME.pt`` with a ``NAME.json`` card)."""
    folder = Path(pretrained_dir) if pretrained_dir is not None else PRETRAINED_DIR
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.pt") if p.with_suffix(".json").is_file())
