"""Training configuration: ``TrainConfig`` (one field per CLI flag) and its validation.

``TrainConfig.validate()`` checks every field, the data folders (image headers) and the
checkpoint to resume before anything is created; each problem is a ValueError whose one-line
message names the flag to change. The command line (``python -m deblur_lib.train``) is
``deblur_lib.train.__main__``.
"""

from __future__ import annotations

import dataclasses
import filecmp
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import torch

from deblur_lib.data import DatasetError, PairedImageFolder, folder_problem, image_sizes
from deblur_lib.degrade import DEFAULT_PARAMS, DegradeParams
from deblur_lib.metrics import WIN_SIZE
from deblur_lib.models import (
    MODEL_PRESETS,
    WeightsError,
    architecture,
    network_of,
    preset_architecture,
)
from deblur_lib.predict import estimate_memory_mb
from deblur_lib.synth import NATURAL_SHARE, SyntheticPairs
from deblur_lib.train.faults import parse_faults
from deblur_lib.train.threads import parse_threads
from deblur_lib.train.tracking import JSONL, read_jsonl, resolve_tracking_uri
from deblur_lib.weights import load_checkpoint, load_model

SYNTHETIC = "synthetic"  # --train_data value: generated pairs (synth.SyntheticPairs)
SYNTHETIC_MIN_CROP = 32  # px, the smallest crop synth.SyntheticPairs makes

FAULT_HELP = (
    "deterministic fault injection for reproductions and tests: KIND@step=N[,count=M][,rank=R] "
    "(training, 0-based global step; KIND: nan_input inf_input nan_target inf_target "
    "const_input nan_output inf_output nan_loss nan_grad) or KIND@epoch=E[,batches=K|all] "
    "(validation; KIND: val_nan_output val_inf_output val_metric_error); join specs with ';'"
)


SWITCH = ("auto", "true", "false")  # the choices of a setting that ``auto`` decides at run time
COMPILE_MIN_STEPS = 2_000  # --compile auto: the fewest planned steps that compile (build.py)


def is_switch(f: dataclasses.Field) -> bool:
    """A ``TrainConfig`` field whose choices are ``SWITCH`` (``channels_last``, ``compile``)."""
    return f.metadata.get("choices") == SWITCH


def switch_value(value: object) -> object:
    """A switch setting's canonical text: True/False and the words 1/yes/on, 0/no/off (any
    case) become ``"true"``/``"false"``, ``"AUTO"`` becomes ``"auto"``; anything else is returned
    as given (``validate`` then names the choices)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return "true"
        if low in ("0", "false", "no", "off"):
            return "false"
        if low == "auto":
            return "auto"
    return value


def _opt(default, help: str, choices: tuple | None = None):  # noqa: A002 (argparse's name)
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    """Every training setting; one CLI flag per field (``--name value``)."""

    train_data: str = _opt(
        "data/train",
        "training pairs: DIR/{blur,sharp}/ or GoPro DIR/<seq>/, or 'synthetic': pairs generated "
        "on the fly (dead leaves + photos, realistic blur; never the same pair twice)",
    )
    test_data: str = _opt("data/test", "validation pairs, full size, same layout")
    allow_test_in_train: bool = _opt(
        False,
        "accept test pairs that are training pairs (same folder, links or copies): a warning "
        "and the MLflow tag test_in_train instead of a usage error",
    )
    registered_model_name: str | None = _opt(None, "register the best model under this name")
    log_model: bool = _opt(
        True, "log the best model to MLflow at the end (false: checkpoints only)"
    )
    batch_size: int = _opt(8, "global batch size (split evenly across DDP ranks)")
    num_epochs: int = _opt(50, "epochs to train")
    learning_rate: float = _opt(1e-4, "AdamW learning rate")
    patience: int = _opt(20, "ReduceLROnPlateau patience, in validated epochs")
    crop_size: int = _opt(256, "random training crop, px (<= the smallest training image)")
    epoch_size: int = _opt(2000, "--train_data synthetic: generated pairs per epoch")
    natural_share: float = _opt(
        NATURAL_SHARE,
        "--train_data synthetic: share in [0, 1] of generated scenes that are crops of the "
        "training photos (the rest: dead leaves)",
    )
    kernel_min: int = _opt(
        DEFAULT_PARAMS.kernel_size[0],
        "--train_data synthetic: smallest side (px, odd, >= 3) of the generated camera-shake "
        f"PSFs; the largest is {DEFAULT_PARAMS.kernel_size[1]} (3 adds mild, nearly sharp pairs)",
    )
    model_size: str = _opt("small", "DeblurNet preset", ("tiny", "small", "base"))
    init_from: str | None = _opt(
        None,
        "start from these weights (anything predict --model takes: a checkpoint, a weights "
        "folder, a shipped name, models:/NAME/VERSION) with a fresh optimizer and schedule",
    )
    model_width: int | None = _opt(None, "override the preset's channel width")
    device: str = _opt("auto", "auto = cuda when available", ("auto", "cpu", "cuda"))
    amp: str = _opt(
        "auto",
        "bf16 autocast for the training step; auto = bf16 where the device computes bf16 natively "
        "(CUDA, CPUs with AVX512-BF16/AMX), else off (emulated bf16 ran 0.15x on an AVX2 CPU, "
        "0.71x on an AVX512 one)",
        ("auto", "off", "bf16"),
    )
    channels_last: str = _opt(
        "auto",
        "channels_last activations (1x1 convs as GEMMs: 1.43x an eager CPU step; GPU convs); "
        "auto = on, except in a step compiled (--compile true) in fp32 on an AVX512 CPU (NCHW "
        "ran faster there); true, false",
        SWITCH,
    )
    compile: str = _opt(
        "auto",
        "torch.compile the training forward (its first steps compile); auto = where it made "
        "the whole loop faster (bf16 + channels_last on a CPU with AVX512-BF16/AMX: step 1.23x, "
        "loop 1.77x vs 1.48x eager; not fp32) and the run plans >= "
        f"{COMPILE_MIN_STEPS} steps to earn the compile back; true, false",
        SWITCH,
    )
    threads: str = _opt(
        "auto", "CPU threads: auto = one per core, fewer while other processes hold cores"
    )
    seed: int = _opt(0, "seeds python, numpy, torch and the data order")
    num_workers: int | None = _opt(None, "DataLoader workers (None = data.make_loader's choice)")
    alpha: float = _opt(0.84, "weight of the (1 - MS-SSIM) term")
    beta: float = _opt(0.16, "weight of the Charbonnier term")
    grad_clip: float = _opt(1.0, "clip the gradient norm at this value, 0 disables")
    ema: float = _opt(
        0.0, "EMA decay of the weights (e.g. 0.999): validated, saved and shipped; 0 disables"
    )
    max_bad_steps: int = _opt(20, "more consecutive skipped steps than this -> roll back")
    max_rollbacks: int = _opt(3, "more rollbacks than this -> stop")
    max_invalid_epochs: int = _opt(3, "this many consecutive invalid validations -> stop")
    out_dir: str = _opt("runs/train", "checkpoints (last.pt, best.pt) and metrics.jsonl")
    resume: str | None = _opt(None, "'auto' (OUT_DIR/last.pt if present) or a checkpoint path")
    experiment: str = _opt("deblur-guard", "MLflow experiment name")
    run_name: str | None = _opt(None, "MLflow run name (None: the out_dir folder's name)")
    system_metrics: bool = _opt(
        True, "log CPU/memory (and GPU) use to the MLflow run every 10 s (system/... metrics)"
    )
    tracking_uri: str | None = _opt(None, "MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite)")
    tracking_retry_s: float = _opt(30.0, "while the tracking server is down, retry every N s")
    guards: str = _opt("on", "off reproduces the original unguarded loop", ("on", "off"))
    detect_anomaly: bool = _opt(False, "torch.autograd anomaly mode (slow; debugging only)")
    inject_fault: str | None = _opt(None, FAULT_HELP)
    scheduler: str = _opt("plateau", "LR schedule", ("plateau", "cosine"))
    warmup_steps: int = _opt(0, "cosine: linear LR warm-up over the first N steps")
    val_every: int = _opt(1, "validate every N epochs")
    log_every: int = _opt(10, "read device-side guard counters every N steps (a sync point)")
    max_steps_per_epoch: int | None = _opt(None, "cap on steps per epoch (smoke runs)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # compile=True (code, old checkpoints) -> "true"
            if is_switch(f):
                setattr(self, f.name, switch_value(getattr(self, f.name)))

    def to_dict(self) -> dict[str, object]:
        """Plain dict (what checkpoints store and MLflow logs as params)."""
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Check every field, the data folders, the output folder and the tracking store's
        URI; ValueError with a one-line fix message.

        Reads image headers only; creates nothing (the output and store folders are probed
        with a temporary folder, removed at once).
        """
        _check_ranges(self)
        parse_threads(self.threads)
        if self.inject_fault:
            try:
                parse_faults(self.inject_fault)
            except ValueError as exc:
                raise ValueError(f"--inject_fault: {exc}") from None
        world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
        if self.batch_size % world:
            raise ValueError(
                f"--batch_size {self.batch_size} is the global batch: it must be "
                f"divisible by the {world} processes"
            )
        _check_resume(self)
        _check_out_dir(Path(self.out_dir))
        _check_data(self)
        initial_weights(self)
        _check_tracking(self)  # last: everything else is known to be fine


def degradation(kernel_min: int = DEFAULT_PARAMS.kernel_size[0]) -> DegradeParams:
    """The degradation of ``--train_data synthetic``: the documented defaults
    (``degrade.DEFAULT_PARAMS``) with PSF sides from ``kernel_min`` px up."""
    return dataclasses.replace(
        DEFAULT_PARAMS, kernel_size=(kernel_min, DEFAULT_PARAMS.kernel_size[1])
    )


def initial_weights(cfg: TrainConfig) -> dict[str, torch.Tensor] | None:
    """The state dict ``--init_from`` names (None without it), read weights-only; ValueError
    when it cannot be loaded or its architecture is not ``--model_size``/``--model_width``'s."""
    if cfg.init_from is None:
        return None
    try:
        model, _ = load_model(cfg.init_from, tracking_uri=cfg.tracking_uri)
    except WeightsError as exc:
        raise ValueError(f"--init_from: {exc}") from None
    have = network_of(architecture(model))
    want = network_of(preset_architecture(cfg.model_size, cfg.model_width))
    if have != want:
        raise ValueError(
            f"--init_from {cfg.init_from}: its architecture {have} is not --model_size "
            f"{cfg.model_size}'s {want}; pass the matching --model_size/--model_width"
        )
    return model.state_dict()


# --resume with settings other than the checkpoint's, flag by flag:
#   same:  refused (exit 2 naming the flag): another value makes it another experiment;
#   apply: the resumed run uses the new value from its first step on, and the change is
#          tagged in MLflow as resume_changed.<flag> = "old -> new" (num_epochs: not below the
#          epochs already done; a cosine schedule is laid out again over the new total);
#   free:  not a setting of the run (where to resume from).
# The checkpoint's config is always what ran after it: the new values.
RESUME_POLICY = {
    "train_data": "same",
    "test_data": "same",
    "allow_test_in_train": "apply",
    "registered_model_name": "apply",
    "log_model": "apply",
    "batch_size": "same",
    "num_epochs": "apply",
    "learning_rate": "apply",  # the optimizer's lr (cosine: its base lr) is set to it
    "patience": "apply",  # ReduceLROnPlateau's patience is set to it
    "crop_size": "same",
    "epoch_size": "same",
    "natural_share": "same",
    "kernel_min": "same",
    "model_size": "same",
    "init_from": "same",
    "model_width": "same",
    "device": "apply",
    "amp": "apply",
    "channels_last": "apply",
    "compile": "apply",
    "threads": "apply",
    "seed": "same",
    "num_workers": "apply",
    "alpha": "same",
    "beta": "same",
    "grad_clip": "same",
    "ema": "same",
    "max_bad_steps": "apply",
    "max_rollbacks": "apply",
    "max_invalid_epochs": "apply",
    "out_dir": "apply",
    "resume": "free",
    "experiment": "same",
    "run_name": "apply",  # the MLflow run is renamed
    "system_metrics": "apply",
    "tracking_uri": "same",
    "tracking_retry_s": "apply",
    "guards": "same",
    "detect_anomaly": "apply",
    "inject_fault": "apply",
    "scheduler": "same",
    "warmup_steps": "same",
    "val_every": "apply",
    "log_every": "apply",
    "max_steps_per_epoch": "same",
}
_PATH_FLAGS = ("train_data", "test_data", "out_dir")  # compared as resolved paths
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def resume_changes(
    saved: dict[str, object], cfg: TrainConfig, epochs_done: int, where: str
) -> dict[str, tuple[object, object]]:
    """``{flag: (old, new)}``: the settings of ``cfg`` that differ from a checkpoint's
    ``saved`` config and are applied on resume (``RESUME_POLICY``). ValueError naming the
    first flag whose change is refused. ``where``: the checkpoint, for the message."""
    changes = {}
    for name, policy in RESUME_POLICY.items():
        if policy == "free" or name not in saved:  # older checkpoints lack newer flags
            continue
        old, new = saved[name], getattr(cfg, name)
        if is_switch(_FIELDS[name]):
            old = switch_value(old)  # a checkpoint from before auto: compile False
        if name in _PATH_FLAGS and SYNTHETIC not in (old, new):
            same = Path(str(old)).resolve() == Path(new).resolve()
        else:
            same = old == new
        if same:
            continue
        if policy == "same":
            raise ValueError(
                f"--resume {where}: it was trained with --{name} {old}, not {new}; pass "
                f"--{name} {old} (another value makes it another experiment: start a new run)"
            )
        if name == "num_epochs" and new < epochs_done:
            raise ValueError(
                f"--resume {where}: {epochs_done} epochs are done already; pass --num_epochs "
                f"{epochs_done} or more (it was {old})"
            )
        changes[name] = (old, new)
    return changes


def _check_resume(cfg: TrainConfig) -> None:
    """The checkpoint to resume must load, its settings must allow ``cfg``'s
    (``resume_changes``), and the metrics.jsonl files a resume reads (in ``out_dir`` and
    beside the checkpoint) must be whole but for a torn last line."""
    if cfg.resume is None:
        return
    path = Path(cfg.out_dir, "last.pt") if cfg.resume == "auto" else Path(cfg.resume)
    if not path.is_file():
        if cfg.resume == "auto":
            return  # nothing to resume yet: a fresh run
        raise ValueError(f"--resume {cfg.resume}: no such checkpoint; pass 'auto' or a file")
    try:
        state = load_checkpoint(path)
    except ValueError as exc:
        raise ValueError(f"--resume {cfg.resume}: {exc}; pass another file or 'auto'") from None
    resume_changes(state.get("config", {}), cfg, state.get("epoch", -1) + 1, str(path))
    for jsonl in dict.fromkeys([Path(cfg.out_dir, "metrics.jsonl"), path.with_name(JSONL)]):
        if jsonl.is_file():
            try:
                read_jsonl(jsonl)
            except ValueError as exc:
                raise ValueError(
                    f"--resume {cfg.resume}: {exc}; repair the file or move it away"
                ) from None
    old_cosine = "scheduler" in state and "lr_lambdas" not in state["scheduler"]
    if cfg.scheduler == "cosine" and old_cosine:
        raise ValueError(
            f"--resume {path}: written by an older deblur_lib whose cosine schedule stepped "
            "per epoch; it cannot continue on the per-step schedule: start a fresh run"
        )


SEED_MAX = 2**32 - 1  # numpy's seed range; torch's (2**64 - 1) is wider


def _check_ranges(cfg: TrainConfig) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(
                    f"--{f.name} {os.fsencode(value)!r} is not valid UTF-8 (MLflow stores "
                    "every setting as UTF-8 text): rename it"
                ) from None
    if not cfg.out_dir.strip():
        raise ValueError("--out_dir must not be empty (it would write into the working folder)")
    at_least = {
        "batch_size": 1,
        "num_epochs": 1,
        "crop_size": 8,
        "patience": 0,
        "seed": 0,
        "max_bad_steps": 0,
        "max_rollbacks": 0,
        "max_invalid_epochs": 1,
        "val_every": 1,
        "log_every": 1,
        "model_width": 4,
        "num_workers": 0,
        "max_steps_per_epoch": 1,
        "warmup_steps": 0,
        "epoch_size": 1,
    }
    for name, low in at_least.items():
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or value < low):
            raise ValueError(f"--{name} must be an integer >= {low} (got {value!r})")
    if cfg.seed > SEED_MAX:
        raise ValueError(f"--seed must be an integer <= {SEED_MAX} (got {cfg.seed})")
    cores = os.cpu_count() or 1
    if cfg.num_workers is not None and cfg.num_workers > cores:
        raise ValueError(
            f"--num_workers {cfg.num_workers} is more than the {cores} CPUs: pass at most {cores}"
        )
    lr = cfg.learning_rate
    if not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"--learning_rate must be > 0 (got {lr!r}); the seed used 1e-4")
    if not isinstance(cfg.ema, int | float) or not (cfg.ema == 0 or 0 < cfg.ema < 1):
        raise ValueError(
            f"--ema must be 0 (off) or a decay in (0, 1), e.g. 0.999 (got {cfg.ema!r})"
        )
    for name in ("alpha", "beta", "grad_clip", "tracking_retry_s"):
        value = getattr(cfg, name)
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"--{name} must be a finite number >= 0 (got {value!r})")
    if not cfg.experiment.strip():
        raise ValueError("--experiment must not be empty (default: deblur-guard)")
    if cfg.registered_model_name and not cfg.log_model:
        raise ValueError("--registered_model_name needs --log_model true (or drop the name)")
    if cfg.warmup_steps and cfg.scheduler != "cosine":
        raise ValueError(
            f"--warmup_steps {cfg.warmup_steps} applies to --scheduler cosine only "
            f"(got --scheduler {cfg.scheduler}); pass --warmup_steps 0 or --scheduler cosine"
        )
    share = cfg.natural_share
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
        raise ValueError(f"--natural_share must be a number in [0, 1] (got {share!r})")
    k_min, k_max = cfg.kernel_min, DEFAULT_PARAMS.kernel_size[1]
    if isinstance(k_min, bool) or not isinstance(k_min, int) or not 3 <= k_min <= k_max:
        raise ValueError(f"--kernel_min must be an odd int in [3, {k_max}] (got {k_min!r})")
    if k_min % 2 == 0:
        raise ValueError(f"--kernel_min must be odd: PSFs have a centre pixel (got {k_min})")
    if cfg.alpha + cfg.beta <= 0:
        raise ValueError("--alpha + --beta must be > 0 (defaults: 0.84 and 0.16)")
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise ValueError(
                f"--{f.name} must be one of {', '.join(choices)} (got {getattr(cfg, f.name)!r})"
            )
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible; use --device cpu or auto")


def _check_data(cfg: TrainConfig) -> None:
    folders = [("train_data", cfg.train_data), ("test_data", cfg.test_data)]
    if cfg.train_data == SYNTHETIC:
        if Path(SYNTHETIC).is_dir():
            raise ValueError(
                f"--train_data {SYNTHETIC} is ambiguous: a folder of that name is here; pass "
                f"./{SYNTHETIC} for the folder, or run elsewhere for generated pairs"
            )
        if cfg.crop_size < SYNTHETIC_MIN_CROP:
            raise ValueError(
                f"--crop_size {cfg.crop_size}: --train_data {SYNTHETIC} generates crops of at "
                f"least {SYNTHETIC_MIN_CROP} px"
            )
        # the photos it crops must be installed and large enough (ValueError says which)
        SyntheticPairs(
            cfg.crop_size, 1, cfg.seed, natural_share=cfg.natural_share,
            params=degradation(cfg.kernel_min),
        )  # fmt: skip
        folders = folders[1:]
    found = {}
    for flag, root in folders:
        if not Path(root).is_dir():
            raise ValueError(
                f"--{flag} {root}: no such folder; create it with "
                "`python -m deblur_lib.data synth --out data`"
            )
        try:
            ds = PairedImageFolder(root)
            ds.validate()  # headers only: unreadable files, blur/sharp size mismatches
        except DatasetError as exc:
            raise ValueError(f"--{flag} {root}: {one_line(exc.problem)}") from None
        if len(ds) == 0:
            raise ValueError(f"--{flag} {root}: no image pairs found (expected blur/ and sharp/)")
        sizes = image_sizes(ds)
        smallest = min(min(size) for size in sizes)
        if flag == "train_data" and cfg.crop_size > smallest:
            raise ValueError(
                f"--crop_size {cfg.crop_size} is larger than the smallest "
                f"training image ({smallest} px); use --crop_size {smallest}"
            )
        if flag == "test_data" and smallest < WIN_SIZE:
            name = ds.pairs[[min(size) for size in sizes].index(smallest)][1]
            raise ValueError(
                f"--test_data {root}: {name} is {smallest} px on a side; SSIM needs "
                f"validation images of at least {WIN_SIZE} px (remove or enlarge it)"
            )
        found[flag] = ds
    _check_val_memory(cfg, found["test_data"])
    if "train_data" in found and not cfg.allow_test_in_train:
        overlap = shared_test_pairs(found["train_data"], found["test_data"])
        if overlap:
            raise ValueError(
                f"--test_data {cfg.test_data}: {overlap}, so validation would measure "
                "memorisation; pass other test data (or --allow_test_in_train true if meant)"
            )


def shared_test_pairs(train: PairedImageFolder, test: PairedImageFolder) -> str:
    """ "" when no test pair is a training pair, else what overlaps ("N of M test pairs are
    training pairs, e.g. FILE"): a test pair whose sharp image is a training sharp image, the
    same file (same folder, links) or a byte-identical copy. Sizes first: only files of equal
    size are compared."""
    by_size: dict[int, list[Path]] = {}
    for _, sharp in train.pairs:
        by_size.setdefault(sharp.stat().st_size, []).append(sharp)
    shared = [
        sharp
        for _, sharp in test.pairs
        if any(
            os.path.samefile(other, sharp) or filecmp.cmp(other, sharp, shallow=False)
            for other in by_size.get(sharp.stat().st_size, ())
        )
    ]
    if not shared:
        return ""
    return f"{len(shared)} of {len(test)} test pairs are training pairs (e.g. {shared[0]})"


VAL_MEMORY_FRACTION = 0.5  # of the device's memory, for one validation batch's activations


def device_memory_mb(device: str) -> tuple[float, str]:
    """(MiB, what) of the memory training runs in: the GPU's (``LOCAL_RANK``'s) for cuda, else
    the RAM this process may use (physical, or less under a cgroup v2 limit)."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        index = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.cuda.get_device_properties(index).total_memory / 2**20, "GPU memory"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        limit = ""
    if limit.isdigit():
        total = min(total, int(limit))
    return total / 2**20, "RAM"


def _check_val_memory(cfg: TrainConfig, test: PairedImageFolder) -> None:
    """Validation runs each test image whole: refuse, before anything starts, a test set whose
    largest image (times the validation batch) needs more activation memory than
    ``VAL_MEMORY_FRACTION`` of the device's (``predict.estimate_memory_mb``, measured on
    DeblurNet; the other half is for the weights, the training state and the metrics)."""
    preset = MODEL_PRESETS[cfg.model_size]
    width, multiple = cfg.model_width or preset["width"], 2 ** len(preset["enc_blocks"])
    sizes = image_sizes(test)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch = cfg.batch_size // world if len(set(sizes)) == 1 else 1  # as build_loaders does
    i = max(range(len(sizes)), key=lambda k: sizes[k][0] * sizes[k][1])
    h, w = sizes[i]
    need = estimate_memory_mb(width, h, w, multiple) * batch
    total, what = device_memory_mb(cfg.device)
    limit = VAL_MEMORY_FRACTION * total
    if need > limit:
        batched = f" in batches of {batch}" if batch > 1 else ""
        raise ValueError(
            f"--test_data {cfg.test_data}: {test.pairs[i][1]} is {h}x{w} px; validating it"
            f"{batched} with --model_size {cfg.model_size} needs about {need / 1024:.1f} GiB of "
            f"activations, over the limit of {limit / 1024:.1f} GiB ({VAL_MEMORY_FRACTION:.0%} "
            f"of the {total / 1024:.1f} GiB of {what}); crop or downscale the validation images"
        )


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out_dir {out_dir} is a file; pass a folder")
    if problem := folder_problem(out_dir):
        raise ValueError(f"--out_dir {out_dir}: {problem}; pass another folder")


def _check_tracking(cfg: TrainConfig) -> None:
    """The tracking URI names a store MLflow has, and a local store (sqlite, file) can be
    created where it points. Nothing is created and no server is asked: one that does not
    answer is an outage, which training survives (``tracking.Tracker``). Rank 0 only: the
    other DDP ranks never track (nor import mlflow)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    from mlflow.exceptions import MlflowException  # heavy: only when every other check passed
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    uri = resolve_tracking_uri(cfg.tracking_uri)
    flag = "--tracking_uri" if cfg.tracking_uri else "--tracking_uri (from $MLFLOW_TRACKING_URI)"
    try:
        _tracking_store_registry.get_store_builder(uri)
    except MlflowException:
        raise ValueError(
            f"{flag} {uri}: MLflow has no tracking store for the scheme "
            f"{urlsplit(uri).scheme!r}; use sqlite:///PATH.db, file:FOLDER or http(s)://HOST"
        ) from None
    scheme = urlsplit(uri).scheme
    if scheme == "sqlite":
        db = uri[len("sqlite:///") :].split("?")[0] if uri.startswith("sqlite:///") else ""
        if db and not db.startswith(":memory:"):
            problem = _db_file_problem(Path(db))
            if problem:
                raise ValueError(f"{flag} {uri}: {problem}; pass another path")
    elif scheme in ("", "file"):
        folder = Path(urlsplit(uri).path if scheme else uri)
        if problem := folder_problem(folder):
            raise ValueError(f"{flag} {uri}: {problem}; pass another folder")


def _db_file_problem(db: Path) -> str | None:
    """Why sqlite cannot open or create ``db`` (its runs' artifacts go beside it, in mlruns/)."""
    if db.is_dir():
        return f"{db} is a folder, not a database file"
    if db.exists():
        try:
            with open(db, "r+b"):  # opened for writing, nothing written
                pass
        except OSError as exc:
            return f"{db} cannot be written ({exc.strerror})"
        return None
    return folder_problem(db.parent)


def one_line(exc: BaseException | str) -> str:
    """``exc``'s message with every run of whitespace (newlines too) as one space."""
    return " ".join(str(exc).split())
