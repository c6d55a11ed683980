"""Which upstream run feeds a step: the fetch run whose snapshot a wrap step turns into a model.

A step either gets a run id (`wrap.fetch_run_id`) or takes the latest FINISHED fetch run of the
same model variant and source revision in the current experiment, found with a filter string
on the params every fetch run logs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from steps.config.schema import FetchArtifact, PipelineConfig
from steps.errors import FetchError, PipelineError
from steps.sources.snapshots import FetchOutcome, materialize
from steps.store.manifest import Manifest
from steps.store.snapshot_store import SnapshotStore
from steps.tracking.runs import flat_params

log = logging.getLogger(__name__)


def manifest_of_run(run_id: str) -> Manifest:
    """The manifest a fetch run logged (from whichever tracking store is current)."""
    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/manifest.json")
    except (MlflowException, OSError) as error:
        raise FetchError(
            f"run {run_id} has no readable manifest.json ({type(error).__name__}): pass the id "
            "of a finished fetch run"
        ) from None
    return Manifest.from_json(text)


def fetch_run_filter(cfg: PipelineConfig, artifact: FetchArtifact) -> str:
    """The params that make a fetch run's snapshot the one this config asks for."""
    params = flat_params(cfg)
    keys = ["model.name", "fetch.artifact"]
    if artifact is FetchArtifact.prebuilt_onnx:
        keys += [f"model.prebuilt_onnx.{cfg.compute.target}.{k}" for k in ("repo_id", "revision")]
        keys += [f"model.prebuilt_onnx.{cfg.compute.target}.subfolder"]
    else:
        keys += [f"model.source.{k}" for k in ("kind", "repo_id", "revision", "path", "sha256")]
    wanted = {key: params[key] for key in keys} | {"fetch.artifact": artifact.value}
    return " and ".join(f"params.`{key}` = '{value}'" for key, value in wanted.items())


def finished_run(run_id: str, steps: tuple[str, ...], setting: str) -> Run:
    """The run a setting names, checked to be a FINISHED run of one of these steps."""
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        raise PipelineError(f"{setting}={run_id} is not a run in this tracking store") from None
    if run.data.tags.get("pipeline.step") not in steps or run.info.status != "FINISHED":
        raise PipelineError(
            f"{setting}={run_id} is not a finished {' or '.join(steps)} run "
            f"(step {run.data.tags.get('pipeline.step')!r}, status {run.info.status})"
        )
    return run


def latest_finished_run(
    cfg: PipelineConfig, experiment_id: str, step: str, filter_string: str | None = None
) -> Run | None:
    """The newest FINISHED run of a step for this model variant and compute target (or for a
    filter of its own)."""
    default = (
        f"tags.`pipeline.model` = '{cfg.model.name}' and "
        f"tags.`pipeline.compute` = '{cfg.compute.name}'"
    )
    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`pipeline.step` = '{step}' and attributes.status = 'FINISHED' and "
            + (filter_string or default)
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def resolve_fetch_run(cfg: PipelineConfig, experiment_id: str, artifact: FetchArtifact) -> str:
    if cfg.wrap.fetch_run_id:
        run = finished_run(cfg.wrap.fetch_run_id, ("fetch",), "wrap.fetch_run_id")
        if run.data.params.get("fetch.artifact") != artifact.value:
            raise PipelineError(
                f"wrap.fetch_run_id={cfg.wrap.fetch_run_id} fetched "
                f"{run.data.params.get('fetch.artifact')}, but this step needs {artifact.value}"
            )
        return run.info.run_id
    run = latest_finished_run(cfg, experiment_id, "fetch", fetch_run_filter(cfg, artifact))
    if run is None:
        extra = " -P overrides=fetch.artifact=prebuilt_onnx" if artifact.value != "weights" else ""
        raise PipelineError(
            f"no finished fetch run of model={cfg.model.name} ({artifact.value}) with this "
            f"source in experiment {experiment_id}: run `mlflow run . -e fetch -P model="
            f"{cfg.model.name} -P compute={cfg.compute.name}{extra}` first, or set "
            "wrap.fetch_run_id"
        )
    log.info("using fetch run %s", run.info.run_id)
    return run.info.run_id


@dataclass(frozen=True)
class FetchedSnapshot:
    """A fetch run and the verified snapshot it recorded, on this machine."""

    run_id: str
    snapshot: FetchOutcome


def fetched_snapshot(
    cfg: PipelineConfig, experiment_id: str, artifact: FetchArtifact = FetchArtifact.weights
) -> FetchedSnapshot:
    run_id = resolve_fetch_run(cfg, experiment_id, artifact)
    outcome = materialize(manifest_of_run(run_id), SnapshotStore.open(cfg.fetch.cache_dir))
    return FetchedSnapshot(run_id, outcome)
