"""MLflow tracking that never logs a non-finite or sentinel metric and survives an outage.

* Tracking URI: ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else
  ``sqlite:///mlflow.db`` (MLflow's own default; relative to the working directory).
  New experiments in a sqlite store keep their artifacts in ``mlruns/`` next to the
  database file (so ``./mlruns`` for the default URI).
* Metrics: a value is *invalid* when it is NaN/inf, a 999.0/-999.0 sentinel, or exactly
  0.0 for a quality metric (name ending in ``psnr``/``ssim``, optionally ``_db``/``_mean``/
  ``_y``/``_partial``: ``val_psnr``, ``val_ssim_partial``, not the counter
  ``msssim_fallbacks``). Invalid values
  are not sent to MLflow (``raw=True`` sends them anyway: the seed's behaviour, for "before"
  runs); a warning is logged once per name and ``.dropped`` counts them.
  ``out_dir/metrics.jsonl`` gets every record: ``{"step", "time", <name>: value or null,
  "dropped": [names not sent], "invalid": {name: reason}}``, invalid values as null.
* Outage: a connection error, timeout or exhausted retries from the tracking server logs
  one warning, marks the tracker offline and queues the call; the queue is replayed (in
  order) on the next call at most every ``retry_interval_s`` seconds and at ``end()``.
  Training never stops for tracking. ``log_model`` is skipped while offline (returns None).
  To fail fast, ``Tracker`` sets (``os.environ.setdefault``, so user values win; read by
  MLflow per request, process-wide) ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=1``,
  ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT=10`` (MLflow's
  defaults, 7 retries with backoff 2 and 120 s, make a dead server cost minutes per call).
* Models: weights-only artifacts (``config.json`` + ``weights.pt``, SHA-256 checked), logged
  as a models-from-code pyfunc (``mlflow_model.py``) and registered; nothing is pickled, and
  ``deblur_lib.weights.load_model("models:/NAME/VERSION")`` rebuilds the net without MLflow's
  loader (``predict`` and notebook 06 load it that way).

``import deblur_lib.train.tracking`` does not import mlflow (heavy: seconds); it is imported
on first use, so DDP ranks other than 0 (``enabled=False``) never import it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist

from deblur_lib.models import save_weights

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
JSONL = "metrics.jsonl"  # every logged record, in out_dir
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
SENTINELS = (999.0, -999.0)
QUALITY_METRIC = re.compile(r"(psnr|ssim)(_db|_mean|_y|_partial)?$", re.IGNORECASE)
RESERVED_KEYS = ("step", "time", "dropped", "invalid")
_PARAM_MAX = 6000
SYSTEM_METRICS_INTERVAL_S = 10.0  # s between samples of CPU/memory/GPU use (system_metrics=True)


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else :data:`DEFAULT_TRACKING_URI`."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def invalid_reason(name: str, value: float | None) -> str | None:
    """Why ``value`` must not be logged as metric ``name`` ("nan", "inf", "-inf",
    "missing", "sentinel 999.0", "sentinel 0.0"), or None when it is a real value."""
    if value is None:
        return "missing"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value in SENTINELS or (value == 0.0 and QUALITY_METRIC.search(name)):
        return f"sentinel {value!r}"
    return None


def read_jsonl(path: str | Path) -> tuple[list[dict[str, Any]], str]:
    """The records of a ``metrics.jsonl`` and its torn tail: ``(records, tail)``.

    A crash in the middle of a write leaves a last line without its newline; when that line is
    not a whole record it is the ``tail`` (returned as text, not parsed; "" when there is
    none). Any other damage (a line that is not a JSON object with an integer ``step``, bytes
    that are not UTF-8) raises ValueError naming the file and the line.
    """
    path = Path(path)
    data = path.read_bytes()
    body, newline, tail = data.rpartition(b"\n")
    if not newline:
        body, tail = b"", data
    lines = body.split(b"\n") if body else []
    if tail.strip() and _record(tail) is not None:
        lines, tail = [*lines, tail], b""  # whole, only its newline is missing
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = _record(line)
        if record is None:
            text = line[:80].decode("utf-8", "backslashreplace")
            raise ValueError(
                f"{path}: line {number} of {len(lines) + bool(tail)} is damaged ({text!r}): not "
                "a metrics record; only a torn last line, as a crash leaves it, is dropped"
            )
        records.append(record)
    return records, tail.decode("utf-8", "backslashreplace")


def _record(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)  # bytes: decoded as UTF-8
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    if not isinstance(record, dict) or type(record.get("step")) is not int:
        return None
    return record


def repair_jsonl(path: str | Path) -> str:
    """Make ``metrics.jsonl`` safe to append to: drop a torn last line (``read_jsonl``) and
    end a whole last record with its newline. Returns the dropped text ("" when none);
    ValueError (nothing changed) on any other damage."""
    path = Path(path)
    _, tail = read_jsonl(path)
    data = path.read_bytes()
    if tail:
        data = data[: data.rfind(b"\n") + 1]
    elif data and not data.endswith(b"\n"):
        data += b"\n"
    else:
        return ""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return tail


def _is_outage(exc: BaseException) -> bool:
    """True when ``exc`` (or what it wraps) is a connection error, timeout or retry exhaustion."""
    import requests  # heavy: on first use

    exc_types = requests.exceptions
    kinds = (exc_types.ConnectionError, exc_types.Timeout, exc_types.RetryError)
    seen: set[int] = set()
    err: BaseException | None = exc
    while err is not None and id(err) not in seen:
        if isinstance(err, kinds):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


@contextlib.contextmanager
def _quiet(logger_name: str, prefix: str) -> Iterator[None]:
    """Drop one known, expected message of another library's logger while inside."""
    logger = logging.getLogger(logger_name)

    def drop(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(prefix)

    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


_MONITOR_THREAD = "SystemMetricsMonitor"  # the name MLflow gives its sampler thread
_MONITOR_LOGGERS = ("mlflow.system_metrics.system_metrics_monitor", "urllib3.connectionpool")


def _default_write_jsonl() -> bool:
    """Only one process of a DDP job writes metrics.jsonl: global rank 0."""
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


class Tracker:
    """Metric/param/model logging to MLflow plus ``out_dir/metrics.jsonl`` (see module doc).

    ``enabled=False``: jsonl only, mlflow is never imported. ``write_jsonl=None``: write it
    unless this is a DDP rank other than 0. ``artifact_location``: for a new experiment
    (default: ``mlruns/`` next to a sqlite database, else MLflow's default).
    ``system_metrics``: sample CPU/memory (and GPU) use into the run while it is open.
    """

    def __init__(
        self,
        experiment: str = "deblur-guard",
        tracking_uri: str | None = None,
        out_dir: str | Path = Path(),
        enabled: bool = True,
        *,
        artifact_location: str | Path | None = None,
        retry_interval_s: float = 30.0,
        write_jsonl: bool | None = None,
        system_metrics: bool = False,
    ) -> None:
        self.experiment = experiment
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.out_dir = Path(out_dir)
        self.jsonl_path = self.out_dir / JSONL
        self.enabled = enabled
        self.artifact_location = artifact_location
        self.retry_interval_s = retry_interval_s
        self.system_metrics, self._monitor = system_metrics, None
        self.write_jsonl = _default_write_jsonl() if write_jsonl is None else write_jsonl
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.dropped: dict[str, int] = {}
        self.offline = False
        self.outages = 0
        self._pending: deque[tuple[str, Any]] = deque()
        self._last_try = -math.inf
        self._client = None
        self._run_params: dict[str, str] = {}
        if enabled:
            for key, value in HTTP_ENV_DEFAULTS.items():
                os.environ.setdefault(key, value)

    # --- public API -------------------------------------------------------------------
    @property
    def started(self) -> bool:
        """True once ``start`` was called with tracking enabled (a run exists or is queued)."""
        return self._client is not None

    def start(
        self,
        run_name: str | None = None,
        params: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> str:
        """Create a run (or resume ``run_id``) and log ``params``; returns the run id ("" when
        the server is unreachable: the run is created, and everything replayed, once it is
        back)."""
        if self.write_jsonl:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if not self.enabled:
            return run_id or ""
        from mlflow import MlflowClient  # heavy: on first use

        self._client = MlflowClient(self.tracking_uri)
        self._submit("start", (run_name, run_id))
        if params:
            self.log_params(params)
        if self.system_metrics and self.run_id:
            self._start_system_metrics()
        return self.run_id or ""

    def _drop_monitor_outage(self, record: logging.LogRecord) -> bool:
        """While the server is unreachable (already said once, by ``_go_offline``), drop the
        retries and failures that MLflow's sampler thread logs about the same outage."""
        return not (self.offline and record.threadName == _MONITOR_THREAD)

    def _start_system_metrics(self) -> None:
        """MLflow's own sampler of CPU, memory, disk and network use (GPU too, through
        nvidia-ml-py, where there is one), every ``SYSTEM_METRICS_INTERVAL_S``, logged to this
        run as ``system/...`` metrics by a background thread until ``end``."""
        from mlflow.system_metrics.system_metrics_monitor import (  # heavy: on first use
            SystemMetricsMonitor,
        )

        for name in _MONITOR_LOGGERS:
            logging.getLogger(name).addFilter(self._drop_monitor_outage)
        with _quiet("mlflow.system_metrics.system_metrics_monitor", "Started monitoring"):
            self._monitor = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                resume_logging=True,
                tracking_uri=self.tracking_uri,
            )
            self._monitor.start()

    def log_metrics(
        self, metrics: Mapping[str, float | None], step: int, *, raw: bool = False
    ) -> list[str]:
        """Log the valid values at ``step``; returns the names not sent to MLflow."""
        values: dict[str, float | None] = {}
        for name, value in metrics.items():
            if name in RESERVED_KEYS:
                raise ValueError(f"metric name {name!r} is reserved in metrics.jsonl")
            if isinstance(value, (str, bytes)) or not (
                value is None or hasattr(value, "__float__")
            ):
                raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}")
            values[name] = None if value is None else float(value)
        invalid = {n: r for n, v in values.items() if (r := invalid_reason(n, v)) is not None}
        dropped = [n for n in invalid if not raw or values[n] is None]
        for name in dropped:
            if name not in self.dropped:
                log.warning(
                    "metric %r = %s at step %d is not logged to MLflow (%s); later drops of "
                    "this metric are only counted",
                    name, values[name], step, invalid[name],
                )  # fmt: skip
            self.dropped[name] = self.dropped.get(name, 0) + 1
        record = {"step": int(step), "time": time.time()}
        record |= {n: (None if n in invalid else v) for n, v in values.items()}
        record |= {"dropped": dropped, "invalid": invalid}
        if self.write_jsonl:
            with self.jsonl_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        sent = {n: v for n, v in values.items() if n not in dropped and v is not None}
        if self.enabled and sent:
            self._submit("metrics", (sent, int(step), int(record["time"] * 1000)))
        return dropped

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (values as str, truncated to MLflow's 6000 chars). MLflow params are
        immutable: a param the run already has with another value (e.g. after a resume) keeps
        it, and the new value goes in tag ``param_changed.<key>`` with a warning."""
        if self.enabled and params:
            self._submit("params", {k: str(v)[:_PARAM_MAX] for k, v in params.items()})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled and tags:
            self._submit("tags", {k: str(v)[:_PARAM_MAX] for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file (the file is read when sent: after an outage, its latest content)."""
        if not Path(path).exists():
            raise FileNotFoundError(f"log_artifact: {path} does not exist")
        if self.enabled:
            self._submit("artifact", (str(path), artifact_path))

    def log_model(
        self,
        model,
        registered_model_name: str | None = None,
        input_example=None,
        *,
        train_crop_size: int | None = None,
        preset: str | None = None,
        description: str | None = None,
    ):
        """Log ``model`` (unwrapped from DDP / torch.compile) to the run as an MLflow pyfunc
        whose artifacts are ``config.json`` + ``weights.pt`` (``weights.save_weights``: a
        weights-only state dict and its SHA-256; nothing pickled), and register it when
        ``registered_model_name`` is given (``description``: the version's text, e.g. its model
        card). ``input_example``: (1, 3, H, W) model-space tensor, cut to 32 x 32 px (MLflow
        stores it as JSON and runs the model on it once). ``weights.load_model("models:/...")``
        reads it back without MLflow's loader. Returns the model URI (``models:/<model_id>``),
        or None when disabled or offline."""
        if not self.enabled:
            return None
        if self.offline:
            self._retry(force=True)
        if self.offline or not self.run_id:
            log.warning("tracking server unreachable: model not logged to MLflow")
            return None
        import mlflow  # heavy: imported on first use (module docstring)

        module = getattr(model, "module", model)
        module = getattr(module, "_orig_mod", module)
        if input_example is not None:
            input_example = input_example[:1, :, :32, :32].detach().float().cpu().numpy()
        try:
            with self._global_uri():
                info = _log_weights_model(
                    self._client, self.experiment_id, self.run_id, module, input_example,
                    registered_model_name, train_crop_size=train_crop_size, preset=preset,
                )  # fmt: skip
                if registered_model_name and description and info.registered_model_version:
                    self._client.update_model_version(
                        registered_model_name, info.registered_model_version, description
                    )
        except (mlflow.exceptions.MlflowException, OSError) as exc:
            if not _is_outage(exc):
                raise
            self._go_offline(exc)
            log.warning("model not logged to MLflow (tracking server unreachable)")
            return None
        self.set_tags({"best_model_uri": info.model_uri})
        return info.model_uri

    def logged_steps(self) -> set[int] | None:
        """The steps at which the run has any metric, as the tracking store says; None when it
        cannot say (disabled, no run yet, or the server is unreachable)."""
        if not self.enabled or self.offline or not self.run_id:
            return None
        from mlflow.exceptions import MlflowException  # heavy: on first use

        steps: set[int] = set()
        try:
            for key in self._client.get_run(self.run_id).data.metrics:
                steps |= {m.step for m in self._client.get_metric_history(self.run_id, key)}
        except (MlflowException, OSError) as exc:
            if not _is_outage(exc):
                raise
            self._go_offline(exc)
            return None
        return steps

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run terminated (FINISHED, FAILED or KILLED) after one last replay."""
        if not self.enabled or self._client is None:
            return
        if self._monitor is not None:
            with _quiet("mlflow.system_metrics.system_metrics_monitor", "Stopping system"):
                self._monitor.finish()
            self._monitor = None
            for name in _MONITOR_LOGGERS:
                logging.getLogger(name).removeFilter(self._drop_monitor_outage)
        self._submit("end", status)
        if self.offline:
            self._retry(force=True)
        if self._pending:
            log.info(
                "tracking server unreachable at the end: %d call(s) not sent to MLflow; "
                "every metric is in %s", len(self._pending), self.jsonl_path,
            )  # fmt: skip

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        status = "FINISHED" if exc_type is None else "FAILED"
        self.end("KILLED" if exc_type is KeyboardInterrupt else status)

    # --- internals --------------------------------------------------------------------
    @contextlib.contextmanager
    def _global_uri(self) -> Iterator[None]:
        """mlflow.pytorch uses the process-wide URI: set it, then restore it and the env var
        (``set_tracking_uri`` writes ``$MLFLOW_TRACKING_URI`` and the restore unsets it)."""
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri  # heavy: on first use

        saved = os.environ.get("MLFLOW_TRACKING_URI")
        try:
            with _use_tracking_uri(self.tracking_uri):
                yield
        finally:
            if saved is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = saved

    def _submit(self, op: str, payload: Any) -> None:
        if self._client is None:
            raise RuntimeError(f"Tracker: call start() before logging ({op})")
        self._pending.append((op, payload))
        if self.offline:
            self._retry()
        else:
            self._flush()

    def _retry(self, force: bool = False) -> None:
        if force or time.monotonic() - self._last_try >= self.retry_interval_s:
            self._flush()
            if not self.offline:
                log.info("MLflow tracking server reachable again: queued calls sent")

    def _flush(self) -> None:
        from mlflow.exceptions import MlflowException  # heavy: on first use

        self._last_try = time.monotonic()
        with _quiet("urllib3.connectionpool", "Retrying"):  # one warning per outage is ours
            while self._pending:
                op, payload = self._pending[0]
                try:
                    self._send(op, payload)
                except (MlflowException, OSError) as exc:
                    if not _is_outage(exc):
                        raise
                    self._go_offline(exc)
                    return
                self._pending.popleft()
        self.offline = False

    def _go_offline(self, exc: BaseException) -> None:
        if not self.offline:
            self.outages += 1
            log.warning(
                "MLflow tracking server %s unreachable (%s); training goes on, metrics are kept "
                "in %s and sent when it is back (retry every %.3g s)",
                self.tracking_uri, type(exc).__name__, self.jsonl_path, self.retry_interval_s,
            )  # fmt: skip
        self.offline = True

    def _send(self, op: str, payload: Any) -> None:
        from mlflow.entities import Metric, Param, RunTag  # heavy: on first use

        client = self._client
        if op == "start":
            self._start_run(*payload)
        elif op == "metrics":
            values, step, stamp = payload
            metrics = [Metric(k, v, stamp, step) for k, v in values.items()]
            client.log_batch(self.run_id, metrics=metrics)
        elif op == "params":
            known = self._run_params
            items = [Param(k, v) for k, v in payload.items() if k not in known]
            for i in range(0, len(items), 100):  # MLflow's batch limit for params
                client.log_batch(self.run_id, params=items[i : i + 100])
            changed = {k: v for k, v in payload.items() if known.get(k, v) != v}
            if changed:
                tags = [RunTag(f"param_changed.{k}", v) for k, v in changed.items()]
                client.log_batch(self.run_id, tags=tags)
            for key, value in changed.items():
                log.warning("param %r is %r in this run, now %r: kept as a tag",
                            key, known[key], value)  # fmt: skip
            known.update({p.key: p.value for p in items})
        elif op == "tags":
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in payload.items()])
        elif op == "artifact":
            client.log_artifact(self.run_id, *payload)
        elif op == "end":
            client.set_terminated(self.run_id, payload)

    def _start_run(self, run_name: str | None, run_id: str | None) -> None:
        from mlflow.exceptions import MlflowException  # heavy: on first use

        client = self._client
        if run_id:
            try:
                run = client.get_run(run_id)
            except MlflowException as exc:
                if _is_outage(exc) or exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("MLflow run %s not found in %s: starting a new run", run_id, exc)
            else:
                client.update_run(run_id, status="RUNNING", name=run_name)
                self.run_id, self.experiment_id = run_id, run.info.experiment_id
                self._run_params = dict(run.data.params)
                return
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            self.experiment_id = client.create_experiment(
                self.experiment, artifact_location=self._artifact_location()
            )
        else:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            self.experiment_id = exp.experiment_id
        self.run_id = client.create_run(self.experiment_id, run_name=run_name).info.run_id

    def _artifact_location(self) -> str | None:
        if self.artifact_location is not None:
            return Path(self.artifact_location).resolve().as_uri()
        prefix = "sqlite:///"
        db = self.tracking_uri[len(prefix) :] if self.tracking_uri.startswith(prefix) else ""
        if not db or db.startswith(":memory:"):
            return None
        return (Path(db).resolve().parent / "mlruns").as_uri()


def _log_weights_model(
    client, experiment_id: str, run_id: str, model, input_example, registered_model_name,
    *, train_crop_size: int | None, preset: str | None,
):  # fmt: skip
    """``mlflow.pyfunc.log_model`` of ``model`` as weights-only artifacts (see
    ``Tracker.log_model``); the pyfunc is models-from-code (``mlflow_model.py``, copied into the
    model), so ``mlflow.pyfunc.load_model`` unpickles nothing either. Returns MLflow's
    ``ModelInfo``. The caller sets the process-wide tracking URI."""
    import mlflow.pyfunc  # heavy: imported on first use (module docstring)
    import numpy as np
    from mlflow.models.signature import ModelSignature  # heavy: on first use
    from mlflow.types.schema import Schema, TensorSpec  # heavy: on first use

    spec = Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))])
    with tempfile.TemporaryDirectory(prefix="deblur_log_model_") as tmp:
        weights_path, config_path = save_weights(
            model, tmp, train_crop_size=train_crop_size, preset=preset
        )
        logged = client.create_logged_model(experiment_id, name="model", source_run_id=run_id)
        saved_bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # no bar in training logs
        try:
            return mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).with_name("mlflow_model.py")),
                artifacts={"weights": str(weights_path), "config": str(config_path)},
                signature=ModelSignature(inputs=spec, outputs=spec),
                input_example=input_example,
                registered_model_name=registered_model_name,
                pip_requirements=_pip_requirements(),
                model_id=logged.model_id,
            )
        finally:
            if saved_bar is None:
                os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
            else:
                os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = saved_bar


def _pip_requirements() -> list[str]:
    """What serving the logged pyfunc needs: the versions installed here."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in ("torch", "numpy", "pillow")] + [
        "deblur-guard"
    ]
