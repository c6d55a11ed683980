"""Where runs go and what every run records.

Zero set-up: with no MLFLOW_TRACKING_URI the store is a SQLite file in the project (mlflow.db,
artifacts under mlruns/), so the Model Registry works out of the box. An exported
MLFLOW_TRACKING_URI wins; `tracking.uri` in the config wins over both. Under `mlflow run` the
run already exists (MLFLOW_RUN_ID) and is reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf

from steps.config.compose import config_digest, resolved_config_yaml
from steps.config.plan import run_name
from steps.config.schema import PipelineConfig
from steps.tracking.provenance import (
    PROJECT_ROOT,
    git_diff_sha256,
    git_repo,
    git_state,
    package_versions,
)
from steps.tracking.server import check_tracking_server, redacted, tracking_errors

log = logging.getLogger(__name__)
DEFAULT_STORE = PROJECT_ROOT / "mlflow.db"
DEFAULT_EXPERIMENT = "llm-to-mlflow"


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE}"


def tracking_uri(cfg: PipelineConfig) -> str:
    return cfg.tracking.uri or default_tracking_uri()


def flat_params(cfg: PipelineConfig) -> dict[str, str]:
    """`model.source.repo_id`-style keys; non-string values as JSON."""
    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node if isinstance(node, str) else json.dumps(node)

    walk(OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True), "")
    return flat


def run_tags(step: str, cfg: PipelineConfig) -> dict[str, str]:
    """What every step run records about itself: step, variant, compute, code (repository,
    commit, local changes), config hash and package versions."""
    commit, dirty = git_state()
    tags = {
        "git.repo": git_repo(),
        "pipeline.step": step,
        "pipeline.model": cfg.model.name,
        "pipeline.compute": cfg.compute.name,
        "git.commit": commit,
        "git.dirty": "unknown" if dirty is None else str(dirty).lower(),
        "config.sha256": config_digest(cfg),
    }
    if dirty:
        tags["git.diff_sha256"] = git_diff_sha256()
    tags.update({f"versions.{name}": v for name, v in package_versions().items()})
    return tags


def model_key(cfg: PipelineConfig, model_tags: dict[str, str]) -> str | None:
    """What makes two wrap runs log the same model: the same code (commit and local changes),
    weights (the snapshot's content id), label, and the settings that reach the model: model,
    compute target, wrap and generation, but not which fetch run found the weights nor which
    other ONNX builds the pipeline swept. Two pipelines that wrap at once log one model twice
    under one key, and register keeps one version of it. None outside a git checkout, where
    code cannot be told apart."""
    commit, dirty = git_state()
    if commit == "unknown":
        return None
    settings = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    for group, key in (("compute", "onnx_candidates"), ("compute", "backend"),
                       ("wrap", "fetch_run_id")):  # fmt: skip
        settings[group].pop(key)
    parts = {
        "commit": commit,
        "diff": git_diff_sha256() if dirty else "",
        "snapshot": model_tags["fetch.snapshot_id"],
        "label": model_tags["model.label"],
        "settings": {g: settings[g] for g in ("model", "compute", "wrap", "generation")},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def step_run(step: str, cfg: PipelineConfig) -> Iterator[mlflow.ActiveRun]:
    """The MLflow run of one step, with the resolved config, params and provenance logged. The
    server's refusals and disappearance, here or in the step, end as one line."""
    uri = tracking_uri(cfg)
    check_tracking_server(uri)
    mlflow.set_tracking_uri(uri)
    experiment = experiment_name(cfg)
    with tracking_errors(uri, needs=f"EDIT permission on experiment {experiment!r}"):
        name = run_name(step, cfg)
        if os.environ.get("MLFLOW_RUN_ID"):
            run_context = mlflow.start_run()  # created by `mlflow run`, with a random name
        else:
            run_context = mlflow.start_run(
                experiment_id=_experiment_id(experiment, uri), run_name=name
            )
        with run_context as run:
            if run.info.run_name != name:
                MlflowClient().update_run(run.info.run_id, name=name)
            log.info("tracking %s run %s at %s", step, run.info.run_id, redacted(uri))
            mlflow.log_text(resolved_config_yaml(cfg), "config.yaml")
            mlflow.log_params(flat_params(cfg))
            mlflow.set_tags(run_tags(step, cfg))
            yield run


def experiment_name(cfg: PipelineConfig) -> str:
    """tracking.experiment, else $MLFLOW_EXPERIMENT_NAME (what `mlflow run` reads), else the
    project's own experiment."""
    return cfg.tracking.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def _experiment_id(name: str, uri: str) -> str:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri))
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id  # a step beside us made it


def artifact_location(uri: str) -> str | None:
    """For a SQLite store, artifacts go beside the database file (MLflow's default is
    ./mlruns under whatever directory the process runs in); servers choose their own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").resolve().as_uri()
