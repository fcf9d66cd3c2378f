"""The main job: run every notebook in ``notebooks/`` with papermill, in order.

``python -m deblur_lib.notebook`` (what ``make demo`` calls) executes each notebook
with its CPU-sized defaults and writes the executed copies to ``runs/<stamp>/``,
outside git. MLflow logs to ``sqlite:///mlflow.db`` in the repo root, so
``mlflow ui --backend-store-uri sqlite:///mlflow.db`` shows the runs afterwards.

``--smoke`` runs the CI sizes (seconds per notebook); ``-p name=value`` passes a
parameter to every notebook that declares it (values are parsed as YAML, so
``-p device=cuda -p num_epochs=20`` work).

While a notebook runs, the terminal shows one line per code cell as it starts; when it ends,
its ``Verdict`` lines and its status. The job stops at the first failing notebook (the failing
cell and its error in one line), writes the report for what ran (``index.html`` beside the
executed copies, see ``deblur_lib.notebook.report``) and exits 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import papermill as pm
import yaml
from nbclient.exceptions import CellTimeoutError, DeadKernelError
from papermill.exceptions import PapermillExecutionError

from deblur_lib.notebook import report

REPO = Path(__file__).resolve().parents[2]  # the checkout: notebooks/ and mlflow.db live here
NOTEBOOKS = REPO / "notebooks"


def notebook_parameters(path: Path) -> set[str]:
    """Names declared in the notebook's cell tagged ``parameters`` (papermill's own parser)."""
    return set(pm.inspect_notebook(str(path)))


# The kernel's own log: at WARNING it prints "Kernel is running over TCP without encryption"
# for every notebook (a local kernel on localhost); its errors still reach the terminal.
QUIET_KERNEL = ["--IPKernelApp.log_level=ERROR"]


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def notebook_failures() -> tuple[type[BaseException], ...]:
    """What ends a notebook: an error in a cell (papermill), a dead kernel, a cell timeout,
    Ctrl-C. Anything else is a bug of the runner and propagates."""
    return PapermillExecutionError, DeadKernelError, CellTimeoutError, KeyboardInterrupt


def run_notebook(path: Path, out_dir: Path, params: dict[str, object], smoke: bool) -> float:
    """Execute one notebook with papermill into ``out_dir``; return its wall time in seconds.

    Prints a line as each code cell starts, then the notebook's ``Verdict`` lines and its
    status. A failure (``PapermillExecutionError``, nbclient's ``DeadKernelError`` or
    ``CellTimeoutError``, ``KeyboardInterrupt``) is printed as one line naming the cell and
    re-raised; the partial copy stays in ``out_dir`` with the failure recorded in it.
    """
    logging.getLogger("papermill").setLevel(logging.WARNING)  # its INFO lines are per-run chatter
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / path.name
    declared = notebook_parameters(path)
    given = {k: v for k, v in {**params, "smoke": smoke}.items() if k in declared}
    say(f"{path.name} {given or ''}")
    progress = report.Progress(path.stem, write=say)
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(
            str(path),
            str(out),
            parameters=given,
            cwd=str(REPO),
            kernel_name="python3",
            progress_bar=False,
            on_notebook_start=progress.notebook_start,
            on_cell_start=progress.cell_start,
            extra_arguments=QUIET_KERNEL,
        )
    except notebook_failures() as exc:
        if not isinstance(exc, pm.PapermillExecutionError) and out.is_file():
            # no error output in the copy: write one, so the report shows where it stopped
            report.record_failure(out, progress.cell_index, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if out.is_file():
            for line in report.outcome_lines(report.summarize(out)):
                say(line)
    return time.perf_counter() - t0


def run_notebooks(
    notebooks: list[Path], out_dir: Path, params: dict[str, object], smoke: bool
) -> list[tuple[str, float]]:
    """Execute ``notebooks`` in order (``run_notebook``); return (name, seconds) per notebook.

    Stops at the first notebook that fails (the exception propagates, papermill's
    ``PapermillExecutionError`` for an error in a cell); the partial copy stays in ``out_dir``.
    """
    return [(path.name, run_notebook(path, out_dir, params, smoke)) for path in notebooks]


def run_job(notebooks: list[Path], out_dir: Path, params: dict[str, object], smoke: bool) -> int:
    """The main job: run ``notebooks`` in order until one fails, write the HTML report of what
    ran, print where it is; return the exit status (0 all ok, 1 a notebook failed, 130 Ctrl-C)."""
    ran, status = [], 0
    for path in notebooks:
        ran.append(path)
        try:
            run_notebook(path, out_dir, params, smoke)
        except notebook_failures() as exc:
            status = 130 if isinstance(exc, KeyboardInterrupt) else 1
            break
    executed = [out_dir / p.name for p in ran if (out_dir / p.name).is_file()]
    not_run = [p.stem for p in notebooks[len(ran) :]]
    result = report.write_report(executed, out_dir, not_run=not_run, cwd=REPO)
    say(f"{report.tally(result.notebooks)}; executed copies in {out_dir}")
    say(f"report: {result.index.resolve()}")
    for uri in result.tracking_uris or [report.DEFAULT_TRACKING_URI]:
        relative = report.resolve_tracking_uri(uri, REPO) != uri
        say(f"MLflow UI: {report.mlflow_ui_command(uri)}" + (f"  (in {REPO})" if relative else ""))
    return status


def parse_param(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    return name, yaml.safe_load(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deblur_lib.notebook", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="CI sizes: tiny data, 1-2 epochs")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/<timestamp>")
    parser.add_argument("--only", nargs="*", default=None, help="name prefixes: 00 05")
    parser.add_argument("-p", "--param", type=parse_param, action="append", default=[])
    args = parser.parse_args(argv)

    notebooks = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [p for p in notebooks if any(p.name.startswith(o) for o in args.only)]
    if not notebooks:
        parser.error(f"no notebooks match in {NOTEBOOKS}")
    out = args.out or REPO / "runs" / time.strftime("%Y%m%d-%H%M%S")
    return run_job(notebooks, out, dict(args.param), args.smoke)


if __name__ == "__main__":
    sys.exit(main())
