"""Checkpoints on disk, and every way a model is read back without unpickling.

Both kinds of file are read with ``torch.load(weights_only=True)`` (tensors, numbers,
strings, lists and dicts only: loading one never runs pickled code):

* **Checkpoints** (``save_checkpoint`` / ``load_checkpoint``): a plain dict holding at least
  ``model`` (a state dict); training checkpoints (``deblur_lib.train.checkpoint``) add the
  optimizer, scheduler, RNG and progress. Written atomically (temp file + ``os.replace``).
  Integrity (``CHECKPOINT_FORMAT`` 2): torch's zip reader does not check the CRCs of tensor
  storages, so a flipped bit would load as a silently different weight. ``save_checkpoint``
  therefore stores ``digest``, a SHA-256 (hex) over the whole payload, every key but
  ``digest`` itself: dicts in sorted key order, lists and tuples in order, scalars and strings
  by type and value, and each tensor by dtype, shape and the CRC-32 of its bytes in row-major
  order (its contents, not its layout or device). CRC-32 rather than SHA-256 over the ~80 MB of
  a base-preset model and AdamW state: ~2.5x faster, and it detects every error burst up to 32
  bits and all other corruption but one in 2**32. ``load_checkpoint`` recomputes it; a
  mismatch raises the same ValueError as an unreadable file. ``CHECKPOINT_FORMAT`` 1 files (no
  digest) load with a logged warning; a format 2 file without its digest is refused.
* **Weights files** (``weights.pt`` + ``config.json``): see ``deblur_lib.models``, which
  writes and reads them (``save_weights``, ``load_from_files``, ``DeblurNet.from_pretrained``).

``load_model(spec)`` rebuilds a ``DeblurNet`` from any source:

* ``models:/NAME/VERSION``, ``models:/NAME/latest`` (highest version) or ``models:/NAME@ALIAS``:
  the MLflow model registry at ``tracking_uri`` (default ``$MLFLOW_TRACKING_URI``, else
  ``sqlite:///mlflow.db``). The version is resolved with ``MlflowClient`` and only the two
  files ``artifacts/config.json`` and ``artifacts/weights.pt`` that the training side logged
  (``deblur_lib.train.tracking``) are downloaded; MLflow's ``load_model`` is never called. A
  model logged another way (``mlflow.pytorch.log_model`` pickles the module) is refused.
  mlflow is imported only there: it is optional for the core.
* a training checkpoint (``best.pt``, ``last.pt``): the architecture comes from its
  ``config`` (``model_size``, ``model_width``); the weights are its ``ema`` average when the
  run kept one (``--ema``), else its ``model``.
* a folder holding ``config.json`` + ``weights.pt`` (what ``save_weights`` writes).
* a shipped name: ``deblur_lib/pretrained/NAME.pt`` with its model card ``NAME.json``.

Every problem (missing file, digest mismatch, a pickle payload, non-finite weights, a state
dict that does not fit the architecture, an unknown registry entry) raises ``WeightsError``
(a ``ValueError``) naming the source.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import re
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from deblur_lib import models
from deblur_lib.models import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    DeblurNet,
    ModelInfo,
    WeightsError,
    load_from_files,
    model_from_state,
    preset_architecture,
    shipped_models,
)

CHECKPOINT_FORMAT = 2  # 1: no digest; 2: ``digest`` (see the module docstring)
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow's own default
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+|latest)|@(?P<alias>.+))$")
_LOGGED_MODEL_URI = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]{32})$")  # MLflow 3 model id
_MLFLOW_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
# What torch.load raises on a truncated or garbage file (zip reader, then the legacy unpickler)
_UNREADABLE = (
    RuntimeError, EOFError, OSError, pickle.UnpicklingError, KeyError, IndexError, ValueError
)  # fmt: skip
log = logging.getLogger(__name__)


class NotACheckpointError(ValueError):
    """A readable file holding something other than a training checkpoint (no ``model`` entry):
    e.g. weights exported by ``train.export`` and moved without their card."""


# --- checkpoints ------------------------------------------------------------------------------
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
    payload = {k: v for k, v in state.items() if k != "digest"} | {"format": CHECKPOINT_FORMAT}
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

    Raises ValueError naming the file when it is not such a checkpoint (``NotACheckpointError``
    when it reads but has no ``model`` entry), or when its contents do not match its digest
    (corrupted after it was written). A ``CHECKPOINT_FORMAT`` 1 file (no digest) loads with a
    logged warning.
    """
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except _UNREADABLE as exc:
        raise ValueError(f"{path}: not a readable checkpoint ({exc})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise NotACheckpointError(f"{path}: not a deblur-guard checkpoint (no 'model' entry)")
    stored, fmt = state.pop("digest", None), state.get("format", 1)
    if not isinstance(fmt, int) or fmt > CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path}: checkpoint format {fmt!r}; this deblur_lib reads 1 to {CHECKPOINT_FORMAT}"
        )
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


# --- sources --------------------------------------------------------------------------------
def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def load_model(
    spec: str,
    *,
    tracking_uri: str | None = None,
    map_location: str | torch.device = "cpu",
    pretrained_dir: str | os.PathLike | None = None,
) -> tuple[DeblurNet, ModelInfo]:
    """A DeblurNet (eval mode) and its ``ModelInfo`` from ``spec``: ``models:/NAME/VERSION``,
    ``models:/NAME/latest``, ``models:/NAME@ALIAS``, a checkpoint file, a folder with
    config.json + weights.pt, weights ``NAME.pt`` beside their card ``NAME.json`` (what
    ``train.export`` writes), or a shipped name (``pretrained_dir``, default
    ``deblur_lib/pretrained``). Never unpickles; raises WeightsError naming the source."""
    if not isinstance(spec, str) or not spec:
        raise WeightsError(f"model spec must be a non-empty string, got {spec!r}")
    if spec.startswith("models:/"):
        return _load_registered(spec, resolve_tracking_uri(tracking_uri), map_location)
    path = Path(spec)
    if path.is_dir():
        weights, config = path / WEIGHTS_FILE, path / CONFIG_FILE
        return load_from_files(weights, config, source=spec, map_location=map_location)
    if path.is_file():
        card = path.with_suffix(".json")
        if path.suffix == ".pt" and card.is_file():  # NAME.pt beside its card: what export writes
            return load_from_files(
                path, card, source=spec, kind="shipped", map_location=map_location
            )
        return _load_checkpoint(path, map_location)
    folder = Path(pretrained_dir) if pretrained_dir is not None else models.PRETRAINED_DIR
    if "/" not in spec and os.sep not in spec and (folder / f"{spec}.pt").is_file():
        return load_from_files(
            folder / f"{spec}.pt",
            folder / f"{spec}.json",
            source=spec,
            kind="shipped",
            map_location=map_location,
        )
    shipped = shipped_models(folder)
    raise WeightsError(
        f"model {spec!r} not found: give models:/NAME/VERSION, models:/NAME/latest, "
        "models:/NAME@ALIAS, a checkpoint file (best.pt/last.pt), NAME.pt beside its NAME.json "
        "card, a folder with config.json + weights.pt, or shipped weights "
        f"({', '.join(shipped) if shipped else 'none installed'})"
    )


def _load_checkpoint(path: Path, map_location) -> tuple[DeblurNet, ModelInfo]:
    try:
        state = load_checkpoint(path, map_location=map_location)
    except NotACheckpointError as exc:
        hint = f"weights-only files load with their card beside them ({path.stem}.json)"
        raise WeightsError(f"{exc}; {hint}") from None
    except ValueError as exc:
        raise WeightsError(str(exc)) from None
    config = state.get("config")
    if not isinstance(config, Mapping) or "model_size" not in config:
        raise WeightsError(f"{path}: checkpoint has no config with 'model_size'")
    arch = preset_architecture(config["model_size"], config.get("model_width"))
    weights = state["ema"]["model"] if "ema" in state else state["model"]  # --ema: the average
    model = model_from_state(arch, weights, str(path))
    crop = config.get("crop_size")
    info = ModelInfo(str(path), "checkpoint", arch, None, crop if isinstance(crop, int) else None)
    return model.to(map_location), info


def _sqlite_store_missing(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI when it does not exist (MLflow would create
    it; a lookup must not), else None."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    db = Path(tracking_uri[len(prefix) :].split("?", 1)[0])
    return None if db.is_file() else db


def resolve_registered(spec: str, tracking_uri: str | None = None) -> tuple[str, str, str]:
    """(name, version, artifact URI of that version's MLflow model) for a ``models:/`` spec;
    for ``models:/<model_id>`` (the URI ``Tracker.log_model`` returns) name is the model id
    and version is empty."""
    match, logged = _MODELS_URI.match(spec), _LOGGED_MODEL_URI.match(spec)
    if match is None and logged is None:
        raise WeightsError(
            f"{spec!r}: expected models:/NAME/VERSION, models:/NAME/latest or models:/NAME@ALIAS"
        )
    uri = resolve_tracking_uri(tracking_uri)
    missing = _sqlite_store_missing(uri)
    if missing is not None:
        raise WeightsError(f"{spec}: no MLflow store at {missing} (tracking URI {uri})")
    from mlflow import MlflowClient  # optional dependency: only models:/ specs need it
    from mlflow.exceptions import MlflowException

    if logged is not None:
        try:
            model = MlflowClient(tracking_uri=uri).get_logged_model(logged["model_id"])
        except MlflowException as exc:
            raise WeightsError(f"{spec}: {exc.message} (tracking URI {uri})") from None
        return logged["model_id"], "", model.artifact_location

    name, version, alias = match["name"], match["version"], match["alias"]
    client = MlflowClient(tracking_uri=uri)
    try:
        if alias is not None:
            version = client.get_model_version_by_alias(name, alias).version
        elif version == "latest":
            escaped = name.replace("'", "\\'")
            found = client.search_model_versions(f"name = '{escaped}'")
            if not found:
                raise WeightsError(f"{spec}: registered model {name!r} has no versions ({uri})")
            version = max(found, key=lambda mv: int(mv.version)).version
        else:
            client.get_model_version(name, version)
        artifact_uri = client.get_model_version_download_uri(name, version)
    except MlflowException as exc:
        raise WeightsError(f"{spec}: {exc.message} (tracking URI {uri})") from None
    return name, str(version), artifact_uri


def _load_registered(spec: str, uri: str, map_location) -> tuple[DeblurNet, ModelInfo]:
    name, version, artifact_uri = resolve_registered(spec, uri)
    import mlflow.artifacts  # optional dependency: only models:/ specs need it
    from mlflow.exceptions import MlflowException

    resolved = f"models:/{name}/{version}"
    source = spec if spec == resolved else f"{spec} ({resolved})"
    with tempfile.TemporaryDirectory(prefix="deblur_model_") as tmp, _env(_MLFLOW_BAR_ENV, "false"):
        local = {}
        for file in (CONFIG_FILE, WEIGHTS_FILE):
            try:
                local[file] = mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{artifact_uri.rstrip('/')}/artifacts/{file}",
                    dst_path=tmp,
                    tracking_uri=uri,
                )
            except (MlflowException, OSError) as exc:
                raise WeightsError(
                    f"{source}: no artifacts/{file} in the logged model ({exc}); only models "
                    "logged by deblur_lib.train.tracking load without unpickling"
                ) from None
        return load_from_files(
            local[WEIGHTS_FILE],
            local[CONFIG_FILE],
            source=source,
            kind="registry",
            map_location=map_location,
        )


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    """Set (or, with None, unset) an environment variable for the block, then restore it."""
    saved = os.environ.get(name)
    try:
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved
