"""The main job: run every notebook in ``notebooks/`` with papermill, in order.

``python -m deblur_lib.notebook`` (what ``make demo`` calls) executes each notebook
with its CPU-sized defaults and writes the executed copies to ``runs/<stamp>/``,
outside git. MLflow logs to ``sqlite:///mlflow.db`` in the repo root, so
``mlflow ui --backend-store-uri sqlite:///mlflow.db`` shows the runs afterwards.

``--smoke`` runs the CI sizes (seconds per notebook); ``-p name=value`` passes a
parameter to every notebook that declares it (values are parsed as YAML, so
``-p device=cuda -p num_epochs=20`` work).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import papermill as pm
import yaml

REPO = Path(__file__).resolve().parents[2]  # the checkout: notebooks/ and mlflow.db live here
NOTEBOOKS = REPO / "notebooks"


def notebook_parameters(path: Path) -> set[str]:
    """Names declared in the notebook's cell tagged ``parameters`` (papermill's own parser)."""
    return set(pm.inspect_notebook(str(path)))


def run_notebooks(
    notebooks: list[Path], out_dir: Path, params: dict[str, object], smoke: bool
) -> list[tuple[str, float]]:
    """Execute ``notebooks`` in order with papermill; return (name, seconds) per notebook.

    Stops at the first notebook that fails (papermill raises
    ``PapermillExecutionError`` naming the cell); the partial copy stays in ``out_dir``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = []
    for path in notebooks:
        declared = notebook_parameters(path)
        given = {k: v for k, v in {**params, "smoke": smoke}.items() if k in declared}
        t0 = time.perf_counter()
        print(f"[demo] {path.name} {given or ''}", flush=True)
        pm.execute_notebook(
            str(path),
            str(out_dir / path.name),
            parameters=given,
            cwd=str(REPO),
            kernel_name="python3",
            progress_bar=False,
        )
        timings.append((path.name, time.perf_counter() - t0))
        print(f"[demo] {path.name} done in {timings[-1][1]:.0f} s", flush=True)
    return timings


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
    timings = run_notebooks(notebooks, out, dict(args.param), args.smoke)
    total = sum(t for _, t in timings)
    print(f"[demo] {len(timings)} notebooks in {total:.0f} s; executed copies in {out}")
    print("[demo] MLflow UI: mlflow ui --backend-store-uri sqlite:///mlflow.db")
    return 0


if __name__ == "__main__":
    sys.exit(main())
