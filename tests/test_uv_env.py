"""`mlflow run --env-manager uv`: MLflow turns conda.yaml into a Python environment spec and
builds an isolated virtual environment with uv, and the step runs inside it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import conda_env, conda_pip_requirements, mlflow_run, project_env
from mlflow import MlflowClient
from packaging.requirements import Requirement

pytestmark = pytest.mark.slow
# uv reads no pip config: where this workplace keeps the CPU build of torch on disk, point uv
# at it, or it downloads the multi-GB CUDA build from PyPI.
LOCAL_WHEELS = Path("/opt/wheels")


def test_fetch_runs_in_a_uv_environment_built_from_conda_yaml(
    bundled_fetch, session_cache: Path, tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    extra = {"MLFLOW_ENV_ROOT": str(tmp_path / "envs")}
    if LOCAL_WHEELS.is_dir():
        extra["UV_FIND_LINKS"] = str(LOCAL_WHEELS)
    command = ["-e", "fetch", "-P", f"overrides=fetch.cache_dir={session_cache}"]
    result = mlflow_run(*command, env=project_env(uri, **extra), env_manager="uv")
    assert result.returncode == 0, result.stderr[-4000:]

    (env_dir,) = (tmp_path / "envs").iterdir()
    assert f"source {env_dir}/bin/activate && python -m steps fetch" in result.stderr
    pins = {
        req.name: str(req.specifier).removeprefix("==")
        for req in map(Requirement, conda_pip_requirements(conda_env()))
    }
    env_torch = subprocess.run(
        [str(env_dir / "bin" / "python"), "-c", "import torch; print(torch.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert env_torch.split("+")[0] == pins["torch"]
    (run,) = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("e2e").experiment_id]
    )
    assert run.data.tags["mlflow.project.env"] == "uv"
    recorded = {
        key.removeprefix("versions."): value
        for key, value in run.data.tags.items()
        if key.startswith("versions.")
    }
    assert all(recorded[name].split("+")[0] == pins[name] for name in recorded if name in pins)
