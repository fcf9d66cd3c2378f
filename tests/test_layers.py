"""The package's three layers import one way (notebook -> train -> core), with no cycles, and
the core needs only its four dependencies (README, "Layout")."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "deblur_lib"
LAYER = {"core": 0, "train": 1, "notebook": 2}
# third-party packages of the [train] and [notebooks] extras: never imported by the core
NOT_CORE = ("mlflow", "matplotlib", "skimage", "scipy", "tqdm", "yaml", "pandas", "papermill")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYER.get(parts[1], 0) if len(parts) > 1 else 0


def _imports() -> dict[str, set[str]]:
    """deblur_lib module -> the deblur_lib modules it imports (anywhere in the file)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("deblur_lib")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deblur_lib"):
                for alias in node.names:  # `from deblur_lib.train import loop` names a module
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in modules else node.module)
        graph[name] = found - {name}
    return graph


def test_imports_point_from_notebook_to_train_to_core():
    backward = [
        f"{a} ({_layer(a)}) imports {b} ({_layer(b)})"
        for a, targets in _imports().items()
        for b in targets
        if _layer(b) > _layer(a)
    ]
    assert backward == []


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_layer_check_catches_a_backward_import(tmp_path, monkeypatch):
    """The check above can fail: a core module that imports the harness is reported."""
    fake = tmp_path / "deblur_lib"
    (fake / "train").mkdir(parents=True)
    (fake / "metrics.py").write_text("from deblur_lib.train import loop\n")
    (fake / "train" / "loop.py").write_text("import torch\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    with pytest.raises(AssertionError, match="deblur_lib.metrics"):
        test_imports_point_from_notebook_to_train_to_core()


def test_core_imports_without_the_extras():
    """Every core module imports with mlflow, matplotlib, scikit-image, scipy, tqdm, yaml,
    pandas and papermill made unimportable."""
    core = sorted(_module_name(p) for p in PACKAGE.glob("*.py"))
    code = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {NOT_CORE!r}:
                    raise ImportError(f"blocked: {{name}} is not a core dependency")
        sys.meta_path.insert(0, Block())
        for name in {core!r}:
            importlib.import_module(name)
        from deblur_lib import CombinedLoss, evaluate, psnr, ssim
        print("ok", len({core!r}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_core_installs_and_imports_in_a_venv_with_only_its_dependencies(tmp_path):
    """`pip install .` without extras, in a fresh venv: the README's core import works and no
    extra got installed. torch comes from the same pinned wheel as `make` installs."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    venv = tmp_path / "core"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    subprocess.run([*pip, "torch==2.13.0"], check=True, env=env, timeout=900)
    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ behind
    shutil.copytree(PACKAGE, src / "deblur_lib", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([*pip, str(src)], check=True, env=env, timeout=900, cwd=tmp_path)
    code = (
        "import deblur_lib; from deblur_lib import CombinedLoss, psnr, ssim, evaluate; "
        "import importlib.util as u; "
        f"print([m for m in {NOT_CORE!r} if u.find_spec(m)])"
    )
    proc = subprocess.run([py, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]", f"installed beyond the core {deps}: {proc.stdout}"
