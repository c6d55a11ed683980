"""conda.yaml (what conda users get from `mlflow run .`) and pyproject.toml (what the venv and CI
install) must name the same runtime dependencies at compatible versions."""

from __future__ import annotations

import tomllib

from conftest import PROJECT_ROOT, conda_env, conda_pip_requirements
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def _requirements(lines: list[str]) -> dict[str, Requirement]:
    reqs = [Requirement(line) for line in lines]
    return {canonicalize_name(req.name): req for req in reqs}


def test_conda_and_pyproject_pin_the_same_runtime_dependencies() -> None:
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    project = _requirements(pyproject["project"]["dependencies"])
    conda = _requirements(conda_pip_requirements(conda_env()))
    assert project.keys() == conda.keys(), (
        f"only in pyproject: {sorted(project.keys() - conda.keys())}; "
        f"only in conda.yaml: {sorted(conda.keys() - project.keys())}"
    )
    for name, req in project.items():
        other = conda[name]
        for pinned, spec in ((req, other), (other, req)):
            exact = [s.version for s in pinned.specifier if s.operator == "=="]
            assert exact, f"{name} is not pinned exactly: {pinned}"
            assert spec.specifier.contains(exact[0], prereleases=True), (
                f"{name}: conda.yaml says {other.specifier}, pyproject says {req.specifier}"
            )


def test_conda_env_pins_python_311_and_the_cpu_torch_release() -> None:
    conda = conda_env()
    assert "python=3.11" in conda["dependencies"]
    assert "torch==2.13.0" in conda_pip_requirements(conda)
