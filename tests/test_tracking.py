"""Run set-up shared by every step: where runs go, what they record, fast failure."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import PROJECT_ROOT
from servers import clean_env, free_port

from steps.errors import PipelineError
from steps.tracking.runs import DEFAULT_STORE, flat_params, step_run, tracking_uri


def test_zero_setup_store_is_sqlite_in_the_project(compose, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(compose()) == f"sqlite:///{DEFAULT_STORE}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking_uri(compose()) == "http://tracking:5000"
    assert tracking_uri(compose("tracking.uri=sqlite:////x.db")) == "sqlite:////x.db"


def test_params_are_flat_keys_of_the_resolved_config(compose) -> None:
    params = flat_params(compose("model=phi3-mini-4k", "compute=cuda"))
    assert params["model.source.repo_id"] == "microsoft/Phi-3-mini-4k-instruct"
    assert params["compute.torch_dtype"] == "float16"
    assert params["model.context_length"] == "4096"
    assert params["model.prebuilt_onnx.cuda.subfolder"] == "cuda/cuda-int4-rtn-block-32"
    assert all(len(value) < 6000 for value in params.values())


def test_a_step_outside_mlflow_run_opens_its_own_run(compose, tracking_uri) -> None:
    cfg = compose("tracking.experiment=own-run")
    with step_run("fetch", cfg) as run:
        run_id = run.info.run_id
    finished = mlflow.get_run(run_id)
    assert finished.info.status == "FINISHED"
    experiment = mlflow.get_experiment(finished.info.experiment_id)
    assert experiment.name == "own-run"
    # Artifacts beside the database, not in whatever directory the test runs from.
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    assert experiment.artifact_location == (database.parent / "mlruns").as_uri()
    assert finished.info.run_name == "fetch-smollm2-135m-cpu"
    assert finished.data.tags["pipeline.step"] == "fetch"
    assert finished.data.tags["versions.hydra-core"] == "1.3.8"
    config = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml"))
    assert config["tracking"]["experiment"] == "own-run"


def test_unreachable_tracking_server_fails_in_seconds(compose) -> None:
    port = free_port()  # nobody listens on it
    started = time.monotonic()
    run = step_run("fetch", compose(f"tracking.uri=http://127.0.0.1:{port}"))
    with pytest.raises(PipelineError, match=f"tracking server at http://127.0.0.1:{port} is not"):
        run.__enter__()
    assert time.monotonic() - started < 15


def test_a_step_against_a_down_server_stops_with_one_line_before_any_work() -> None:
    port = free_port()
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "steps", "fetch"],
        env=clean_env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}"),
        cwd=PROJECT_ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert time.monotonic() - started < 30
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: fetch: the MLflow tracking server at http://127.0.0.1:{port} is not reachable "
        "(ConnectionError); start it or point MLFLOW_TRACKING_URI at a running one"
    )
    assert "Traceback" not in result.stderr
