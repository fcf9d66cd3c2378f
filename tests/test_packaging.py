"""The set-up promises of the README: env.yml and pyproject agree, torch is pinned first."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pyproject_requirements() -> list[Requirement]:
    """The core dependencies and every extra's, without the extras' references to the project
    itself (``deblur-guard[train]``)."""
    project = _pyproject()["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return [Requirement(r) for r in reqs if not r.startswith(project["name"])]


def _env_yml_requirements() -> list[Requirement]:
    env = yaml.safe_load((REPO / "env.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    return [Requirement(r) for r in pip_section if not r.startswith("-")]


def test_env_yml_and_pyproject_list_the_same_packages():
    ours = {canonicalize_name(r.name) for r in _pyproject_requirements()}
    theirs = {canonicalize_name(r.name) for r in _env_yml_requirements()}
    assert ours == theirs, f"only in pyproject: {ours - theirs}; only in env.yml: {theirs - ours}"


def test_env_yml_versions_satisfy_pyproject_ranges():
    ranges = {canonicalize_name(r.name): r.specifier for r in _pyproject_requirements()}
    for req in _env_yml_requirements():
        pins = [s.version for s in req.specifier if s.operator == "=="]
        for version in pins:
            assert ranges[canonicalize_name(req.name)].contains(version), (req, version)


def test_env_yml_python_is_311():
    env = yaml.safe_load((REPO / "env.yml").read_text())
    assert "python=3.11" in env["dependencies"]


def test_user_packages_are_declared():
    names = {canonicalize_name(r.name) for r in _pyproject_requirements()}
    user = {"torch", "jupyterlab", "papermill", "pytorch-msssim", "scikit-image", "mlflow"}
    assert user | {"matplotlib", "tqdm", "ipykernel", "pytest", "ruff"} <= names


def test_setup_installs_pinned_torch_before_the_project():
    """An unpinned torch would pull a multi-GB CUDA build on a CPU machine."""
    makefile = (REPO / "Makefile").read_text()
    torch_at = makefile.index("pip install --quiet torch==2.13.0")
    project_at = makefile.index("pip install --quiet -e '.[dev]'")
    assert torch_at < project_at
    torch_range = next(r for r in _pyproject_requirements() if r.name == "torch").specifier
    assert torch_range.contains("2.13.0")


def test_ci_calls_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", readme, re.M), "README must show `make test`"
    assert re.search(r"^make test$", ci, re.M)


def test_large_and_generated_paths_are_ignored():
    ignored = (REPO / ".gitignore").read_text().split()
    for path in ["data/", "runs/", "mlruns/", "mlflow.db", ".venv/", "*.pt"]:
        assert path in ignored, path
