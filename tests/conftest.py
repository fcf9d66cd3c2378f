"""Shared fixtures for the training tests, and the fault-matrix table in the terminal summary.

``tiny_data``: one synthetic 64 px dataset (8 train, 4 test pairs) for the whole session.
``mlflow_store``: one sqlite MLflow store for the session (creating its tables costs seconds).
``one_thread``: torch at one intra-op thread for a module of small-tensor tests.
``cpu_is``: make the CPU report the instruction sets of an AVX2, AVX512, AVX512-BF16 or
AMX machine (what the speed defaults decide on).
``fault_matrix``: rows appended by tests/test_faults.py; ``pytest_terminal_summary`` prints
them as a table after the run (also without ``-s``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

_MATRIX = pytest.StashKey[list]()


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one intra-op thread is faster, and immune to other processes on the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from deblur_lib.data import synthesize

    root = tmp_path_factory.mktemp("tiny_data")
    synthesize(root, n_train=8, n_test=4, size=64, seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def fault_matrix(request) -> list[dict[str, str]]:
    return request.config.stash.setdefault(_MATRIX, [])


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    rows = config.stash.get(_MATRIX, [])
    if not rows:
        return
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    tr = terminalreporter
    tr.write_sep("=", f"fault matrix ({len(rows)} rows)")
    tr.write_line(" | ".join(c.ljust(widths[c]) for c in columns))
    tr.write_line("-+-".join("-" * widths[c] for c in columns))
    for row in rows:
        tr.write_line(" | ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


CPUS = {  # what torch.cpu reports: (AVX512, AVX512-BF16, AMX)
    "avx2": (False, False, False),
    "avx512": (True, False, False),  # bf16 converted to fp32 there: 0.71x an fp32 step
    "avx512_bf16": (True, True, False),
    "amx": (True, True, True),
}


@pytest.fixture
def cpu_is(monkeypatch):
    """cpu_is(kind): make this process's CPU report the instruction sets of ``CPUS[kind]``."""
    import torch  # here: most test modules of the session never need it

    def set_cpu(kind: str) -> None:
        avx512, avx512_bf16, amx = CPUS[kind]
        monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: avx512)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)

    return set_cpu
