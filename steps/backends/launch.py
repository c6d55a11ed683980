"""Starting main's child runs on the configured backend and waiting for them, through MLflow
Projects' public API: `mlflow.projects.run(synchronous=False)` returns a SubmittedRun, whose
`wait()` and `cancel()` do the rest. A child that fails, or is interrupted, is marked FAILED
(as a synchronous `mlflow.projects.run` would) and linked to the pipeline's run as its parent.
"""

from __future__ import annotations

import os
import shlex

import mlflow
import mlflow.projects
from mlflow import MlflowClient
from mlflow.projects import ExecutionException, SubmittedRun

from steps.backends import kubernetes as kubernetes_backend
from steps.backends.kubernetes import KubernetesTarget
from steps.config.plan import Step
from steps.config.schema import PipelineConfig
from steps.errors import PipelineError
from steps.tracking.provenance import PROJECT_ROOT
from steps.tracking.server import check_tracking_server


def submit(
    step: Step,
    cfg: PipelineConfig,
    overrides: list[str],
    experiment_id: str,
    target: KubernetesTarget | None,
) -> SubmittedRun:
    """Start the step's run (a local `mlflow run` process, or a Kubernetes Job where `target`
    is set) with the pipeline's model and compute and these Hydra overrides; return without
    waiting."""
    # MLflow's client would retry a vanished server for minutes before the child starts.
    check_tracking_server(mlflow.get_tracking_uri())
    parameters = {
        "model": cfg.model.name,
        "compute": cfg.compute.name,
        "overrides": shlex.join(overrides),
    }
    try:
        if target is None:
            # MLflow starts an asynchronous local run as an `mlflow run --experiment-id ...`
            # subprocess, which refuses to start while MLFLOW_EXPERIMENT_NAME is also set; the
            # child gets the experiment by id (MLFLOW_EXPERIMENT_ID) either way.
            os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
            return mlflow.projects.run(
                uri=str(PROJECT_ROOT),
                entry_point=step.entry,
                parameters=parameters,
                env_manager="local",
                experiment_id=experiment_id,
                synchronous=False,
            )
        return kubernetes_backend.submit(target, step.entry, parameters, experiment_id)
    except ExecutionException as error:
        raise PipelineError(f"step {step.name} could not start: {error}") from None


def _end_if_running(run_id: str, status: str) -> None:
    """Where the child could not end its own run (it crashed, or was cancelled)."""
    client = MlflowClient()
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status)


def wait(step: Step, submitted: SubmittedRun, parent_id: str) -> str:
    """Wait for a submitted step and return its run id; a failed child is a PipelineError."""
    run_id = submitted.run_id
    try:
        succeeded = submitted.wait()
    except KeyboardInterrupt:
        submitted.cancel()
        _end_if_running(run_id, "FAILED")
        raise
    _end_if_running(run_id, "FINISHED" if succeeded else "FAILED")
    if not succeeded:
        raise PipelineError(f"step {step.name} failed (run {run_id}); its log above says why")
    # Linked the way MLflow nests runs, so the UI shows the pipeline as one tree.
    MlflowClient().set_tag(run_id, "mlflow.parentRunId", parent_id)
    return run_id
