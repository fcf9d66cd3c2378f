"""The main job's report and terminal: HTML pages and index.html built from small synthetic
executed notebooks, MLflow runs matched by execution window, and one real (tiny) run of the
runner for the progress, verdict and failure lines and the exit status."""

from __future__ import annotations

import html
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from deblur_lib.notebook import report

PNG = (  # a 1x1 PNG, as a kernel would send a figure: base64 in the output's data
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.IGNORECASE)


def _executed(
    name: str,
    verdicts: list[str],
    *,
    error: tuple[str, str] | None = None,
    start: datetime = T0,
    seconds: float = 3.5,
    tracking_uri: str | None = None,
) -> nbformat.NotebookNode:
    """An executed notebook as papermill leaves it: a parameters cell, a cell that prints its
    verdicts and shows a figure, and optionally a cell that raised."""
    params = new_code_cell("smoke: bool = False  # CI sizes", metadata={"tags": ["parameters"]})
    if tracking_uri is not None:
        params.source += f'\ntracking_uri: str = "{tracking_uri}"  # MLflow store'
    printed = "".join(f"{v}\n" for v in verdicts)
    result = new_code_cell(
        "show(figure)\nprint(verdicts)",
        outputs=[
            new_output("display_data", data={"image/png": PNG, "text/plain": "<Figure>"}),
            new_output("stream", name="stdout", text=f"evidence: 3 < 4\n{printed}"),
        ],
    )
    cells = [new_markdown_cell(f"# {name}"), params, result]
    if error:
        ename, evalue = error
        cells.append(
            new_code_cell(
                "\nraise_it()  # the failing cell\nmore()",
                outputs=[new_output("error", ename=ename, evalue=evalue, traceback=[ename])],
            )
        )
    end = start + timedelta(seconds=seconds)
    meta = {"start_time": start.isoformat(), "end_time": end.isoformat(), "duration": seconds}
    meta |= {"parameters": {"smoke": True}, "exception": bool(error) or None}
    kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return new_notebook(cells=cells, metadata={"kernelspec": kernelspec, "papermill": meta})


def _write(folder: Path, name: str, nb: nbformat.NotebookNode) -> Path:
    path = folder / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A report of three notebooks: one ok, one failed, one the job did not reach."""
    out = tmp_path_factory.mktemp("report")
    ok = _write(out, "00_ok", _executed("00_ok", ["Verdict: holds: x < 1 <b>"]))
    two = ["Verdict (NaN path): reproduced: 3 NaN", "Verdict (metric path): NOT reproduced: 0"]
    error = ("ValueError", "crop 48 px < 161 px\nsecond line")
    failed = _write(out, "01_failed", _executed("01_failed", two, error=error))
    rep = report.write_report([ok, failed], out, not_run=["02_later"], title="test run")
    return rep, out, rep.index.read_text()


def test_index_lists_every_notebook_with_its_status(built):
    rep, out, index = built
    assert [(s.name, s.status) for s in rep.notebooks] == [
        ("00_ok", "ok"), ("01_failed", "failed"), ("02_later", "not run")
    ]  # fmt: skip
    assert not rep.ok
    for name in ("00_ok", "01_failed"):
        assert f'<a href="{name}.html">{name}</a>' in index
        assert (out / f"{name}.html").is_file()
    assert "02_later" in index and "02_later.html" not in index
    assert '<span class="failed">failed</span>' in index and "not run" in index


def test_index_shows_every_verdict_line_escaped(built):
    _, _, index = built
    assert "Verdict: holds: x &lt; 1 &lt;b&gt;" in index  # printed text, not markup
    assert "Verdict (NaN path): reproduced: 3 NaN" in index
    assert '<li class="neg">Verdict (metric path): NOT reproduced: 0</li>' in index
    assert "evidence" not in index  # only the Verdict lines


def test_failed_notebook_names_the_cell_and_the_error(built):
    rep, _, index = built
    failure = rep.notebooks[1].failure
    assert (failure.index, failure.total) == (3, 3)  # code cells: parameters, result, raise
    assert failure.first_line == "raise_it()  # the failing cell"
    assert failure.error == "ValueError: crop 48 px < 161 px"
    assert html.escape(str(failure)) in index
    assert "3.5 s" in index


def test_pages_embed_figures_and_fetch_nothing(built):
    _, out, index = built
    for name in ("00_ok", "01_failed"):
        page = (out / f"{name}.html").read_text()
        assert f'src="data:image/png;base64,{PNG}"' in page
        assert not EXTERNAL.findall(page), "the page fetches something from the network"
        assert "<script src" not in page
        assert "Verdict" in page and 'href="index.html"' in page
    banner = "01_failed FAILED at cell 3/3 `raise_it()  # the failing cell`: ValueError: crop"
    assert html.escape(banner) in (out / "01_failed.html").read_text()
    assert not EXTERNAL.findall(index)  # no tracking store: no MLflow links


def test_widget_progress_bars_become_their_final_text():
    nb = _executed("w", [])
    view = {"model_id": "box", "version_major": 2, "version_minor": 0}
    nb.cells[2].outputs.append(
        new_output("display_data", data={report.WIDGET_VIEW: view, "text/plain": "0%| | 0/2"})
    )
    state = {
        "box": {"model_name": "HBoxModel", "state": {"children": ["IPY_MODEL_a", "IPY_MODEL_b"]}},
        "a": {"model_name": "HTMLModel", "state": {"value": "epoch 0: 100%"}},
        "b": {"model_name": "FloatProgressModel", "state": {"value": 2, "max": 2}},
    }
    nb.metadata["widgets"] = {report.WIDGET_STATE: {"state": state, "version_major": 2}}
    page = report.notebook_html(nb)
    assert "epoch 0: 100%|" + "\u2588" * 10 + "|" in page and "0/2" not in page


def test_a_failure_without_an_error_output_is_recorded(tmp_path):
    path = _write(tmp_path, "dead", _executed("dead", ["Verdict: holds: y"]))
    report.record_failure(path, 2, "DeadKernelError: Kernel died")
    summary = report.summarize(path)
    assert summary.status == "failed" and summary.verdicts == ["Verdict: holds: y"]
    assert str(summary.failure) == "at cell 2/2 `show(figure)`: DeadKernelError: Kernel died"
    report.record_failure(path := _write(tmp_path, "x", _executed("x", [])), None, "E: early")
    assert str(report.summarize(path).failure) == "before the first cell: E: early"


def test_sys_exit_zero_is_not_a_failure_as_in_papermill():
    nb = _executed("exit", ["Verdict: holds: e"], error=("SystemExit", "0"))
    assert report.find_failure(nb) is None
    nb.cells[-1].outputs[0].evalue = "2"
    assert report.find_failure(nb).error == "SystemExit: 2"


def test_verdict_lines_are_those_starting_with_verdict():
    nb = _executed("v", [])
    nb.cells[2].outputs[1].text = "a Verdict: no\nevidence \nVerdict: holds: z\n  Verdict (p): x\n"
    assert report.verdict_lines(nb) == ["Verdict: holds: z", "Verdict (p): x"]


def test_mlflow_runs_started_in_the_notebooks_window_are_linked(tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_store)
    exp = client.create_experiment(f"report-{tmp_path.name}")
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)  # no other test's runs
    ms = int(start.timestamp() * 1000)
    inside = client.create_run(exp, start_time=ms + 1000, run_name="01_nan_path").info.run_id
    client.create_run(exp, start_time=ms - 1000, run_name="before")
    client.create_run(exp, start_time=ms + 61_000, run_name="after")
    nb = _executed("05_train", ["Verdict: holds: t"], start=start, seconds=60.0)
    nb.metadata.papermill.parameters["tracking_uri"] = mlflow_store
    rep = report.write_report([_write(tmp_path, "05_train", nb)], tmp_path)
    (summary,) = rep.notebooks
    assert [r.run_name for r in summary.runs] == ["01_nan_path"]
    index = rep.index.read_text()
    assert (
        f'href="http://127.0.0.1:5000/#/experiments/{exp}/runs/{inside}">01_nan_path</a>' in index
    )
    assert rep.tracking_uris == [mlflow_store]
    assert report.mlflow_ui_command(mlflow_store) in index


def test_a_missing_store_is_noted_not_created(tmp_path):
    nb = _executed("05_train", ["Verdict: holds: t"], tracking_uri="sqlite:///nothing-here.db")
    rep = report.write_report([_write(tmp_path, "05_train", nb)], tmp_path, cwd=tmp_path)
    assert rep.notebooks[0].runs_note.startswith("no MLflow store at")
    assert not (tmp_path / "nothing-here.db").exists()
    assert report.resolve_tracking_uri("sqlite:///m.db", tmp_path) == f"sqlite:///{tmp_path}/m.db"
    assert report.resolve_tracking_uri("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"


def test_the_runner_prints_progress_verdicts_and_the_failing_cell(tmp_path, capfd):
    """A real kernel: two code cells, the second raises; the next notebook is not run."""
    from deblur_lib.notebook.demo import run_job

    tiny = new_notebook(
        cells=[
            new_markdown_cell("# tiny"),
            new_code_cell('print("evidence\\nVerdict: holds: tiny")'),
            new_code_cell('raise ValueError("boom")'),
        ],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}},
    )
    first = _write(tmp_path, "90_tiny", tiny)
    second = _write(tmp_path, "91_next", new_notebook(cells=[new_code_cell("1")]))
    status = run_job([first, second], tmp_path / "out", {}, smoke=True)
    captured = capfd.readouterr()
    lines = captured.out.splitlines()
    assert status == 1
    progress = [line for line in lines if line.startswith("[demo]   90_tiny cell ")]
    assert [line.split(" at ")[0] for line in progress] == [
        "[demo]   90_tiny cell 1/2", "[demo]   90_tiny cell 2/2"
    ]  # fmt: skip
    assert progress[0].endswith(' s: print("evidence\\nVerdict: holds: tiny")')
    assert "[demo]   Verdict: holds: tiny" in lines
    assert '[demo] 90_tiny FAILED at cell 2/2 `raise ValueError("boom")`: ValueError: boom' in lines
    assert lines[-2] == f"[demo] report: {(tmp_path / 'out' / 'index.html').resolve()}"
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in lines[-1]
    assert "IPKernelApp" not in captured.err and "WARNING" not in captured.err, captured.err
    index = (tmp_path / "out" / "index.html").read_text()
    assert "90_tiny" in index and "not run" in index and "Verdict: holds: tiny" in index
