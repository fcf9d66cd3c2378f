"""What a run of the notebooks tells its user: progress and verdicts in the terminal while it
runs, and an HTML report to open when it is done.

The terminal (used by the main job, ``deblur_lib.demo``):

- ``Progress``: nbclient hooks (``on_notebook_start``, ``on_cell_start``) that print one line per
  code cell as it starts: ``00_data cell 3/9 at 2 s: synthesize(...)``. Plain lines, no carriage
  returns, so a terminal and a captured log read the same.
- ``summarize(path)`` reads an executed notebook; ``outcome_lines(summary)`` gives its
  ``Verdict`` lines and one status line, ``ok in 9 s`` or ``FAILED at cell 9/14 `first line`:
  NameError: ...``.

The report (``write_report``): each executed notebook as a self-contained HTML page (figures
are base64 ``data:`` URIs, the CSS is inline, and no script or stylesheet is fetched, so it
renders offline), and ``index.html`` beside them: one row per notebook with its status, its
verdict lines, its run time and links to the MLflow runs it started (the runs whose start time
falls inside the notebook's execution window, in the tracking store that notebook used).

Everything is read from the executed copies (papermill's metadata and the cells' outputs), so
``python -m deblur_lib.notebook.report RUN_DIR`` rebuilds the report of an earlier or
interrupted job.
"""

from __future__ import annotations

import argparse
import ast
import copy
import html
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import nbformat
import papermill as pm
from jinja2 import DictLoader
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from nbconvert import HTMLExporter

MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # the notebooks' default, relative to their cwd
FIRST_LINE_CHARS = 70  # a cell's first line is cut to this many characters in one-line messages
VERDICT = re.compile(r"^Verdict\b")
NEGATIVE_VERDICT = re.compile(r"^Verdict(?: \([^)]*\))?:\s*(does not hold|NOT\b)")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
RUNNER_META = "deblur_guard"  # notebook metadata key for a failure that left no error output


# --- reading an executed notebook -----------------------------------------------------------


def code_cells(nb: nbformat.NotebookNode) -> list[int]:
    """Indices (in ``nb.cells``) of the code cells that execute: code, with non-blank source."""
    return [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.strip()]


def first_line(source: str, limit: int = FIRST_LINE_CHARS) -> str:
    """The first non-blank line of a cell's source, cut to ``limit`` characters."""
    line = next((s.strip() for s in source.splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def verdict_lines(nb: nbformat.NotebookNode) -> list[str]:
    """Every line the notebook printed (stdout/stderr streams) that starts with ``Verdict``."""
    lines = []
    for i in code_cells(nb):
        for out in nb.cells[i].get("outputs", []):
            if out.output_type == "stream":
                lines += [s.strip() for s in out.text.splitlines() if VERDICT.match(s.strip())]
    return lines


@dataclass(frozen=True)
class CellFailure:
    """Where and how a notebook failed. ``index`` counts executing code cells from 1 (the
    progress lines' numbering), ``None`` when it failed before any cell ran."""

    index: int | None
    total: int
    first_line: str
    error: str  # "NameError: name 'x' is not defined": the first line of the error

    def __str__(self) -> str:
        if self.index is None:
            return f"before the first cell: {self.error}"
        return f"at cell {self.index}/{self.total} `{self.first_line}`: {self.error}"


def _error_text(ename: str, evalue: str) -> str:
    lines = str(evalue).strip().splitlines()
    return f"{ename}: {lines[0]}" if lines else ename


def _cell_error(cell: nbformat.NotebookNode) -> str | None:
    """The cell's error as papermill judges it: an error output other than ``sys.exit(0)``, or
    papermill's failure mark on a cell that left no error output."""
    for out in cell.get("outputs", []):
        clean_exit = out.get("ename") == "SystemExit" and out.get("evalue") in ("", "0")
        if out.output_type == "error" and not clean_exit:
            return _error_text(out.ename, out.evalue)
    if cell.metadata.get("papermill", {}).get("exception") is True:
        return "CellExecutionError"
    return None


def find_failure(nb: nbformat.NotebookNode) -> CellFailure | None:
    """The first code cell with an error (``_cell_error``), or the failure the runner recorded in
    the notebook's metadata (kernel died before any cell); ``None`` when nothing failed."""
    cells = code_cells(nb)
    for n, i in enumerate(cells, start=1):
        error = _cell_error(nb.cells[i])
        if error:
            return CellFailure(n, len(cells), first_line(nb.cells[i].source), error)
    recorded = nb.metadata.get(RUNNER_META, {}).get("failure")
    if recorded:
        return CellFailure(None, len(cells), "", recorded)
    return None


def record_failure(path: Path, cell_index: int | None, error: str) -> None:
    """Write a failure that left no error output (kernel died, timeout, interrupt) into the
    executed copy at ``path``: an error output on cell ``cell_index`` (an index into
    ``nb.cells``), or the notebook's metadata when no cell had started."""
    nb = nbformat.read(path, as_version=4)
    ename, _, evalue = error.partition(": ")
    if cell_index is not None and cell_index < len(nb.cells):
        output = nbformat.v4.new_output("error", ename=ename, evalue=evalue, traceback=[error])
        nb.cells[cell_index].setdefault("outputs", []).append(output)
    else:
        nb.metadata.setdefault(RUNNER_META, {})["failure"] = error
    nbformat.write(nb, path)


@dataclass
class MlflowRun:
    """One MLflow run a notebook started, with its link in the MLflow UI."""

    run_id: str
    run_name: str
    experiment_id: str
    experiment: str
    status: str  # FINISHED, FAILED, KILLED, RUNNING
    url: str


@dataclass
class NotebookSummary:
    """One notebook of a job, as the terminal and the report show it."""

    name: str  # the notebook's stem: "00_data"
    status: str  # "ok", "failed" or "not run"
    verdicts: list[str] = field(default_factory=list)
    seconds: float | None = None
    failure: CellFailure | None = None
    start: datetime | None = None  # execution window (papermill's metadata, UTC)
    end: datetime | None = None
    tracking_uri: str | None = None  # the notebook's tracking_uri parameter, None without one
    runs: list[MlflowRun] = field(default_factory=list)
    runs_note: str = ""  # why no runs could be listed, when that is not "there were none"
    page: str | None = None  # file name of the notebook's HTML page


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _tracking_uri(nb: nbformat.NotebookNode, path: Path) -> str | None:
    """The value of the notebook's ``tracking_uri`` parameter: papermill's injected value, else
    the default in the cell tagged ``parameters``; None when it declares none."""
    given = nb.metadata.get("papermill", {}).get("parameters", {})
    if "tracking_uri" in given:
        return str(given["tracking_uri"])

    declared = pm.inspect_notebook(str(path))
    if "tracking_uri" not in declared:
        return None
    return str(ast.literal_eval(declared["tracking_uri"]["default"]))


def summarize(path: Path) -> NotebookSummary:
    """Status, verdict lines, run time, failing cell and tracking store of an executed copy."""
    nb = nbformat.read(path, as_version=4)
    meta = nb.metadata.get("papermill", {})
    failure = find_failure(nb)
    return NotebookSummary(
        name=path.stem,
        status="failed" if failure else "ok",
        verdicts=verdict_lines(nb),
        seconds=meta.get("duration"),
        failure=failure,
        start=_time(meta.get("start_time")),
        end=_time(meta.get("end_time")),
        tracking_uri=_tracking_uri(nb, path),
    )


# --- the terminal -----------------------------------------------------------------------------


class Progress:
    """nbclient hooks that print one line as each code cell starts.

    Pass ``on_notebook_start=progress.notebook_start, on_cell_start=progress.cell_start`` to
    ``papermill.execute_notebook`` (papermill hands them to nbclient). ``cell_index`` is the
    running cell's index in ``nb.cells`` (``None`` before the first), for ``record_failure``.
    """

    def __init__(self, name: str, write: Callable[[str], None] = print):
        self.name, self.write = name, write
        self.cells: list[int] = []
        self.cell_index: int | None = None
        self.t0 = time.monotonic()

    def notebook_start(self, notebook: nbformat.NotebookNode, **_: object) -> None:
        self.cells = code_cells(notebook)
        self.t0 = time.monotonic()

    def cell_start(self, cell: nbformat.NotebookNode, cell_index: int, **_: object) -> None:
        if cell_index not in self.cells:  # markdown or blank: nothing runs
            return
        self.cell_index = cell_index
        n, total = self.cells.index(cell_index) + 1, len(self.cells)
        elapsed = time.monotonic() - self.t0
        self.write(f"  {self.name} cell {n}/{total} at {elapsed:.0f} s: {first_line(cell.source)}")


def outcome_lines(summary: NotebookSummary) -> list[str]:
    """What the terminal prints when a notebook ends: its verdict lines, then one status line."""
    lines = [f"  {v}" for v in summary.verdicts]
    if summary.failure:
        lines.append(f"{summary.name} FAILED {summary.failure}")
    else:
        took = f" in {summary.seconds:.0f} s" if summary.seconds is not None else ""
        lines.append(f"{summary.name} ok{took}")
    return lines


# --- MLflow -----------------------------------------------------------------------------------


def resolve_tracking_uri(uri: str, cwd: Path) -> str:
    """A relative sqlite URI (``sqlite:///mlflow.db``) made absolute against the notebooks' cwd."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((cwd / uri[len(prefix) :]).resolve())
    return uri


def find_mlflow_runs(
    tracking_uri: str, start: datetime, end: datetime, ui: str = MLFLOW_UI
) -> list[MlflowRun]:
    """Runs in every experiment of ``tracking_uri`` that started between ``start`` and ``end``.

    Raises ``FileNotFoundError`` for a sqlite store that does not exist (MLflow would create
    it) and lets ``MlflowException`` through for a store it cannot read.
    """

    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        if not db.is_file():
            raise FileNotFoundError(f"no MLflow store at {db}")
    client = MlflowClient(tracking_uri)
    experiments = {e.experiment_id: e.name for e in client.search_experiments(ViewType.ALL)}
    if not experiments:
        return []
    t0, t1 = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
    runs = client.search_runs(
        list(experiments),
        f"attributes.start_time >= {t0} AND attributes.start_time <= {t1}",
        run_view_type=ViewType.ALL,
        max_results=1000,
        order_by=["attributes.start_time ASC"],
    )
    return [
        MlflowRun(
            run_id=r.info.run_id,
            run_name=r.info.run_name or r.info.run_id[:8],
            experiment_id=r.info.experiment_id,
            experiment=experiments.get(r.info.experiment_id, r.info.experiment_id),
            status=r.info.status,
            url=f"{ui}/#/experiments/{r.info.experiment_id}/runs/{r.info.run_id}",
        )
        for r in runs
    ]


def attach_mlflow_runs(summary: NotebookSummary, cwd: Path, ui: str = MLFLOW_UI) -> None:
    """Fill ``summary.runs`` (or ``runs_note`` when the store cannot be read)."""
    if not (summary.tracking_uri and summary.start and summary.end):
        return

    uri = resolve_tracking_uri(summary.tracking_uri, cwd)
    try:
        summary.runs = find_mlflow_runs(uri, summary.start, summary.end, ui)
    except (FileNotFoundError, MlflowException) as exc:
        summary.runs_note = str(exc).splitlines()[0]


def mlflow_ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}"


# --- HTML -------------------------------------------------------------------------------------

# The lab template without what it fetches from a CDN (require.js, MathJax, mermaid, the widget
# manager): none of it is needed for code, text, tables and figures. Markdown math would show
# as TeX source; the notebooks have none.
_OFFLINE_TEMPLATE = """\
{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block body_header -%}
{{ super() }}
<nav style="font: 14px/1.4 system-ui, sans-serif; padding: 0 0 .6em; margin: 0 0 1em;
border-bottom: 1px solid #ddd"><a href="index.html">&larr; all notebooks of this run</a>
{%- if resources.banner %} &middot; {{ resources.banner | e }}{% endif %}</nav>
{%- endblock body_header -%}
"""


def _widget_text(state: dict, model_id: str) -> str:
    """A text rendering of a stored ipywidgets view (tqdm's notebook bar: label, bar, counts)."""
    model = state.get(model_id, {})
    name, values = model.get("model_name", ""), model.get("state", {})
    if "children" in values:
        parts = (_widget_text(state, c.removeprefix("IPY_MODEL_")) for c in values["children"])
        return "".join(parts)
    if name in ("FloatProgressModel", "IntProgressModel"):
        filled = int(10 * values.get("value", 0) / (values.get("max") or 1))
        return "|" + "\u2588" * filled + " " * (10 - filled) + "| "
    return html.unescape(re.sub(r"<[^>]+>", "", str(values.get("value", ""))))


def _static_widgets(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of ``nb`` whose widget views are replaced by their final state as text (a page
    without the widget manager would show nothing, or the bar's first ``0%`` frame)."""
    nb = copy.deepcopy(nb)
    state = nb.metadata.pop("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    for i in code_cells(nb):
        for out in nb.cells[i].get("outputs", []):
            view = out.get("data", {}).pop(WIDGET_VIEW, None)
            if view and view.get("model_id") in state:
                out.data["text/plain"] = _widget_text(state, view["model_id"])
    return nb


def notebook_html(nb: nbformat.NotebookNode, banner: str = "") -> str:
    """A self-contained HTML page of an executed notebook (figures embedded, nothing fetched);
    ``banner``: a line of text shown at the top, beside the link back to ``index.html``."""

    exporter = HTMLExporter(
        template_name="lab",
        extra_loaders=[DictLoader({"offline.html.j2": _OFFLINE_TEMPLATE})],
        template_file="offline.html.j2",
        embed_images=True,
    )
    body, _ = exporter.from_notebook_node(_static_widgets(nb), resources={"banner": banner})
    return body


_CSS = """\
body { font: 14px/1.45 system-ui, sans-serif; color: #222; margin: 2em auto; max-width: 1400px;
       padding: 0 1.5em; }
h1 { font-size: 1.5em; margin-bottom: .2em; }
p.meta { color: #555; margin-top: 0; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: .55em .7em; text-align: left;
         vertical-align: top; }
th { background: #f3f3f3; }
td.name { white-space: nowrap; font-weight: 600; }
td.time { white-space: nowrap; text-align: right; }
ul { margin: 0; padding-left: 1.1em; }
li { margin: .1em 0; }
li.run { white-space: nowrap; }
.ok { color: #1a7f37; font-weight: 600; }
.failed { color: #c62828; font-weight: 600; }
.notrun { color: #888; }
.neg { color: #c62828; }
.why { color: #c62828; font-size: .92em; margin-top: .3em; }
.small { color: #666; font-size: .9em; }
code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; font-size: .92em; }
"""


def _e(text: object) -> str:
    return html.escape(str(text))


def _row(s: NotebookSummary) -> str:
    name = f'<a href="{_e(s.page)}">{_e(s.name)}</a>' if s.page else _e(s.name)
    status = {"ok": '<span class="ok">ok</span>', "failed": '<span class="failed">failed</span>'}
    cell_status = status.get(s.status, f'<span class="notrun">{_e(s.status)}</span>')
    if s.failure:
        cell_status += f'<div class="why">{_e(s.failure)}</div>'
    verdicts = "".join(
        f'<li class="neg">{_e(v)}</li>' if NEGATIVE_VERDICT.match(v) else f"<li>{_e(v)}</li>"
        for v in s.verdicts
    )
    runs = "".join(
        f'<li class="run"><a href="{_e(r.url)}">{_e(r.run_name)}</a> '
        f'<span class="small">{_e(r.experiment)}, {_e(r.status.lower())}</span></li>'
        for r in s.runs
    )
    if s.runs_note:
        runs += f'<li class="small">{_e(s.runs_note)}</li>'
    if runs:
        runs = f"<ul>{runs}</ul>"
    elif s.tracking_uri and s.status != "not run":
        runs = '<span class="small">none</span>'
    seconds = f"{s.seconds:.1f} s" if s.seconds is not None else ""
    return (
        f'<tr><td class="name">{name}</td><td>{cell_status}</td>'
        f"<td><ul>{verdicts}</ul></td>"
        f'<td class="time">{seconds}</td><td>{runs}</td></tr>'
    )


def tally(summaries: Sequence[NotebookSummary]) -> str:
    """``7 notebooks: 6 ok, 1 failed; 192 s``: the job in one line (time: the notebooks' own)."""
    counts = {k: sum(s.status == k for s in summaries) for k in ("ok", "failed", "not run")}
    total = sum(s.seconds or 0.0 for s in summaries)
    states = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    return f"{len(summaries)} notebooks: {states}; {total:.0f} s"


def index_html(summaries: Sequence[NotebookSummary], title: str, ui_commands: Sequence[str]) -> str:
    """The report's front page: one table row per notebook."""
    commands = " or ".join(f"<code>{_e(c)}</code>" for c in ui_commands)
    footer = (
        f'<p class="small">The MLflow links open in the MLflow UI at {_e(MLFLOW_UI)}; start it '
        f"with {commands}.</p>"
        if ui_commands
        else ""
    )
    rows = "\n".join(_row(s) for s in summaries)
    written = f"{datetime.now():%Y-%m-%d %H:%M}"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{_e(title)}</title>
<style>
{_CSS}</style>
</head>
<body>
<h1>{_e(title)}</h1>
<p class="meta">{_e(tally(summaries))} of notebook time. Written {written}.</p>
<table>
<thead><tr><th>Notebook</th><th>Status</th><th>Verdicts</th><th>Time</th>
<th>MLflow runs</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
{footer}
</body>
</html>
"""


# --- the report -------------------------------------------------------------------------------


@dataclass
class Report:
    index: Path
    notebooks: list[NotebookSummary]
    tracking_uris: list[str]  # as the notebooks gave them (relative to their cwd)

    @property
    def ok(self) -> bool:
        return all(s.status == "ok" for s in self.notebooks)


def write_report(
    executed: Sequence[Path],
    out_dir: Path,
    *,
    not_run: Sequence[str] = (),
    cwd: Path | None = None,
    ui: str = MLFLOW_UI,
    title: str | None = None,
) -> Report:
    """Write ``<name>.html`` for each executed copy and ``index.html`` into ``out_dir``.

    ``executed``: the executed notebooks in run order (a failed one included); ``not_run``:
    names of the notebooks the job did not reach, listed as "not run"; ``cwd``: the notebooks'
    working directory, against which a relative sqlite tracking URI is resolved (default: the
    current directory).
    """
    cwd = cwd or Path.cwd()
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = []
    for path in executed:
        summary = summarize(path)
        attach_mlflow_runs(summary, cwd, ui)
        summary.page = f"{path.stem}.html"
        banner = outcome_lines(summary)[-1]  # "05_train ok in 40 s", or where it failed
        page = notebook_html(nbformat.read(path, as_version=4), banner)
        (out_dir / summary.page).write_text(page, encoding="utf-8")
        summaries.append(summary)
    summaries += [NotebookSummary(name=name, status="not run") for name in not_run]
    uris = list(dict.fromkeys(s.tracking_uri for s in summaries if s.tracking_uri))
    index = out_dir / "index.html"
    title = title or f"deblur-guard notebooks: {out_dir.resolve().name}"
    commands = [
        mlflow_ui_command(u)
        if resolve_tracking_uri(u, cwd) == u
        else f"cd {cwd} && {mlflow_ui_command(u)}"  # the store's path is relative to cwd
        for u in uris
    ]
    index.write_text(index_html(summaries, title, commands), encoding="utf-8")
    return Report(index=index, notebooks=summaries, tracking_uris=uris)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deblur_lib.notebook.report",
        description="Rebuild the HTML report of the executed notebooks in RUN_DIR.",
    )
    parser.add_argument("run_dir", type=Path, help="a job's output folder: runs/<stamp>")
    parser.add_argument("--cwd", type=Path, default=Path.cwd(), help="where the notebooks ran")
    args = parser.parse_args(argv)
    executed = sorted(args.run_dir.glob("*.ipynb"))
    if not executed:
        parser.error(f"no executed notebooks in {args.run_dir}")
    report = write_report(executed, args.run_dir, cwd=args.cwd)
    print(report.index.resolve())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
