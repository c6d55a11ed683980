"""main's child runs through MLflow Projects' public API (steps.backends.launch): a child that
fails ends main with one line naming the step and its run, and both runs end FAILED."""

from __future__ import annotations

import mlflow
import pytest
from conftest import mlflow_run, project_env

pytestmark = pytest.mark.slow


def test_a_failed_child_fails_main_naming_its_step_and_run(tracking_uri: str) -> None:
    # register alone, with no evaluate run to read: the child fails after it started its run.
    result = mlflow_run("-P", "steps=register", env=project_env(tracking_uri), bound=300)
    assert result.returncode != 0
    mlflow.set_tracking_uri(tracking_uri)
    runs = {
        run.data.tags["pipeline.step"]: run
        for run in mlflow.search_runs(experiment_names=["e2e"], output_format="list")
    }
    assert set(runs) == {"main", "register"}
    child = runs["register"]
    assert f"error: main: step register failed (run {child.info.run_id})" in result.stderr
    assert "Traceback" not in result.stderr
    assert child.info.status == "FAILED" and runs["main"].info.status == "FAILED"
