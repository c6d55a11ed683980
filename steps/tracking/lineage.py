"""Which earlier runs a step builds on or reuses, found with one search (`latest_finished_run`):
the newest FINISHED run of a step that matches a filter string.

- A wrap step's fetch run: `wrap.fetch_run_id`, else the latest of the same model variant and
  source revision, matched on the params every fetch run logs.
- evaluate's candidates: `evaluate.wrap_run_ids`, else the latest wrap run of each model the
  plan makes for this variant and compute target.
- register's evaluate run: `register.evaluate_run_id`, else the latest of this variant and
  compute target.
- main's reusable runs: the same step, code (commit and local changes) and resolved config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from steps.config import plan
from steps.config.schema import WRAP_STEPS, FetchArtifact, PipelineConfig
from steps.errors import FetchError, PipelineError
from steps.sources.snapshots import FetchOutcome, materialize
from steps.store.manifest import Manifest
from steps.store.snapshot_store import SnapshotStore
from steps.tracking.models import LoggedChatModel, with_unique_labels
from steps.tracking.provenance import git_diff_sha256, git_state
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


def latest_finished_run(experiment_id: str, step: str, *clauses: str) -> Run | None:
    """The newest FINISHED run of a step (its `pipeline.step` tag) that matches every clause
    (MLflow filter strings)."""
    found = MlflowClient().search_runs(
        [experiment_id],
        filter_string=" and ".join(
            [f"tags.`pipeline.step` = '{step}'", "attributes.status = 'FINISHED'", *clauses]
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found else None


def of_this_variant(cfg: PipelineConfig) -> tuple[str, str]:
    """The clauses that keep a search to this model variant and compute target."""
    return (
        f"tags.`pipeline.model` = '{cfg.model.name}'",
        f"tags.`pipeline.compute` = '{cfg.compute.name}'",
    )


def reusable_run(step: str, config_sha256: str, experiment_id: str) -> str | None:
    """A FINISHED run of this step with the same code and the same resolved config (None
    outside a git checkout, where code cannot be told apart)."""
    commit, dirty = git_state()
    if commit == "unknown":
        return None
    clauses = [
        f"tags.`config.sha256` = '{config_sha256}'",
        f"tags.`git.commit` = '{commit}'",
        f"tags.`git.dirty` = '{str(dirty).lower()}'",
    ]
    if dirty:
        clauses.append(f"tags.`git.diff_sha256` = '{git_diff_sha256()}'")
    found = latest_finished_run(experiment_id, step, *clauses)
    return found.info.run_id if found else None


def evaluate_run_to_register(cfg: PipelineConfig, experiment_id: str) -> Run:
    """register.evaluate_run_id, else the latest finished evaluate run of this variant and
    compute target."""
    if cfg.register.evaluate_run_id:
        return finished_run(cfg.register.evaluate_run_id, ("evaluate",), "register.evaluate_run_id")
    found = latest_finished_run(experiment_id, "evaluate", *of_this_variant(cfg))
    if found is None:
        raise PipelineError(
            f"no finished evaluate run of model={cfg.model.name} compute={cfg.compute.name}: "
            "run evaluate first, or set register.evaluate_run_id"
        )
    return found


def find_candidates(cfg: PipelineConfig, experiment_id: str) -> list[LoggedChatModel]:
    """The models evaluate compares: those of evaluate.wrap_run_ids, else the latest finished
    wrap run of each model the plan makes for this variant and compute target (a model without
    one is left out)."""
    if cfg.evaluate.wrap_run_ids:
        runs = [
            finished_run(run_id, WRAP_STEPS, "evaluate.wrap_run_ids")
            for run_id in cfg.evaluate.wrap_run_ids
        ]
    else:
        found = [
            latest_finished_run(
                experiment_id, f"wrap_{planned.runtime.value}", *of_this_variant(cfg),
                f"tags.`model.label` = '{planned.label}'",
            )
            for planned in plan.planned_models(cfg)
        ]  # fmt: skip
        runs = [run for run in found if run is not None]
    if not runs:
        raise PipelineError(
            f"no finished wrap runs of model={cfg.model.name} compute={cfg.compute.name} in "
            f"experiment {experiment_id}: run wrap_transformers and wrap_onnx first, or set "
            "evaluate.wrap_run_ids"
        )
    return with_unique_labels([LoggedChatModel.from_run(run) for run in runs])


def resolve_fetch_run(cfg: PipelineConfig, experiment_id: str, artifact: FetchArtifact) -> str:
    """The fetch run a wrap step builds on: wrap.fetch_run_id (checked to have fetched
    `artifact`), else the latest finished fetch of this variant's source."""
    if cfg.wrap.fetch_run_id:
        run = finished_run(cfg.wrap.fetch_run_id, ("fetch",), "wrap.fetch_run_id")
        if run.data.params.get("fetch.artifact") != artifact.value:
            raise PipelineError(
                f"wrap.fetch_run_id={cfg.wrap.fetch_run_id} fetched "
                f"{run.data.params.get('fetch.artifact')}, but this step needs {artifact.value}"
            )
        return run.info.run_id
    run = latest_finished_run(experiment_id, "fetch", fetch_run_filter(cfg, artifact))
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
    """The fetch run a wrap step builds on, and its snapshot on this machine (from the store,
    or fetched again from the manifest the run recorded)."""
    run_id = resolve_fetch_run(cfg, experiment_id, artifact)
    outcome = materialize(manifest_of_run(run_id), SnapshotStore.open(cfg.fetch.cache_dir))
    return FetchedSnapshot(run_id, outcome)
