"""Entry point `main`: the whole pipeline as child runs under one parent run.

fetch -> wrap_transformers + one wrap_onnx per `compute.onnx_candidates` build -> evaluate ->
register, with the same model and compute choices and overrides for all, each step handed the
run ids of the steps before it (each wrap_onnx also its build, as `wrap.onnx_build`). Like MLflow's
multistep_workflow example, a step whose inputs match an earlier FINISHED run is reused instead
of rerun: same entry point, same git commit (and local changes), same resolved step config,
which includes the upstream run ids. Reuse is decided here, in the parent, with one search per
step, before any child process starts. `main.rerun=true` reruns everything; `main.steps` runs a
subset (the others resolve to their latest runs, as when a step is run alone).

Where the steps run is compute.backend: child processes here (local), or one Kubernetes Job per
step through MLflow's Kubernetes backend (compute=k8s-cpu, k8s-cuda), checked before the first
step. The wraps need only fetch's run, so they are submitted together and waited for before
evaluate where each gets its own machine (kubernetes), or where main.parallel=true asks for it
locally.

Parent run tags: `main.<step>.run_id` and `main.<step>.reused` per step, where a wrap_onnx step
is named after its build (`main.wrap_onnx.int8.run_id`; the prebuilt export's is plain
`wrap_onnx`), `main.model_uri.<label>` (`transformers-fp32`, `onnx-int8`, ...),
`main.registered` (name, version and alias). The parent lists the models its wraps made as its
outputs, and its description (MLflow's run note) says what was registered and why, with the
candidate table, the evaluation's chart and every step's run.
"""

from __future__ import annotations

import copy
import logging
import os
import shlex
import time
from dataclasses import dataclass, field

import mlflow
import mlflow.projects
from mlflow import MlflowClient
from mlflow.entities import RunTag
from mlflow.projects import ExecutionException, SubmittedRun
from omegaconf import DictConfig, OmegaConf

from steps.backends import kubernetes as kubernetes_backend
from steps.backends.kubernetes import KubernetesTarget
from steps.config.compose import config_digest, project_path, to_typed
from steps.config.onnx_builds import OnnxBuildSpec
from steps.config.schema import (
    STEP_ORDER,
    WRAP_STEPS,
    Backend,
    FetchArtifact,
    MainConfig,
    OnnxSource,
    PipelineConfig,
)
from steps.errors import PipelineError
from steps.evaluation.evalset import load_eval_set
from steps.evaluation.fidelity import check_fills_a_window, load_fidelity_text
from steps.evaluation.report import SPEED_CHART, candidates_table, phase_seconds
from steps.tracking.models import EvaluatedModel, logged_model_id
from steps.tracking.notes import artifact_image, link_models, run_link, set_note, version_link
from steps.tracking.provenance import PROJECT_ROOT, git_diff_sha256, git_state
from steps.tracking.runs import step_run, tracking_uri
from steps.tracking.server import check_tracking_server, redacted

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """One child run of the pipeline: an entry point, and for a wrap_onnx its build (None: the
    prebuilt export)."""

    name: str  # as the parent's tags name it: fetch, wrap_onnx.int8, ...
    entry: str  # the MLproject entry point
    build: OnnxBuildSpec | None = None


def upstream_settings(step: Step, upstream: dict[str, str]) -> dict[str, str | list[str]]:
    """The config keys that hand a step what it builds on: the run ids of this pipeline run's
    earlier steps, and for a wrap_onnx its source and build."""
    settings: dict[str, str | list[str]] = {}
    if step.name == "fetch_onnx":
        settings["fetch.artifact"] = FetchArtifact.prebuilt_onnx.value
    elif step.entry == "wrap_transformers" and "fetch" in upstream:
        settings["wrap.fetch_run_id"] = upstream["fetch"]
    elif step.entry == "wrap_onnx":
        # Each wrap_onnx run makes one model: a build of the weights, or the prebuilt export.
        fetched = upstream.get("fetch" if step.build else "fetch_onnx")
        if fetched:
            settings["wrap.fetch_run_id"] = fetched
        if step.build is not None:
            settings["wrap.onnx_source"] = OnnxSource.build.value
            settings["wrap.onnx_build"] = step.build.spec
        else:
            settings["wrap.onnx_source"] = OnnxSource.prebuilt.value
    elif step.entry == "evaluate":
        wraps = [run_id for name, run_id in upstream.items() if _entry_of(name) in WRAP_STEPS]
        if wraps:
            settings["evaluate.wrap_run_ids"] = wraps
    elif step.entry == "register" and "evaluate" in upstream:
        settings["register.evaluate_run_id"] = upstream["evaluate"]
    return settings


def as_overrides(settings: dict[str, str | list[str]]) -> list[str]:
    """Hydra override strings; values quoted so a run id never parses as a number."""

    def quoted(value: str) -> str:
        return "'" + value + "'"

    return [
        f"{key}=[{','.join(map(quoted, value))}]"
        if isinstance(value, list)
        else f"{key}={quoted(value)}"
        for key, value in settings.items()
    ]


def child_base_config(cfg: PipelineConfig) -> DictConfig:
    """The config every child composes before its upstream run ids: main's own, with the
    `main` group back at its defaults (children never get main's options). Derived from the
    already validated config instead of a second, slower Hydra compose."""
    base = OmegaConf.structured(cfg)
    base.main = OmegaConf.structured(MainConfig())
    return base


def step_config_sha256(base: DictConfig, settings: dict[str, str | list[str]]) -> str:
    """The config.sha256 tag the child run will carry (composing once and updating a copy is
    much cheaper than a Hydra compose per step)."""
    node = copy.deepcopy(base)
    for key, value in settings.items():
        OmegaConf.update(node, key, value, merge=False)
    return config_digest(to_typed(node))


def reusable_run(step: str, config_sha256: str, experiment_id: str) -> str | None:
    """A FINISHED run of this step with the same code and the same resolved config."""
    commit, dirty = git_state()
    if commit == "unknown":
        return None
    clauses = [
        f"tags.`pipeline.step` = '{step}'",
        "attributes.status = 'FINISHED'",
        f"tags.`config.sha256` = '{config_sha256}'",
        f"tags.`git.commit` = '{commit}'",
        f"tags.`git.dirty` = '{str(dirty).lower()}'",
    ]
    if dirty:
        clauses.append(f"tags.`git.diff_sha256` = '{git_diff_sha256()}'")
    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=" and ".join(clauses),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def step_batches(steps: list[Step], parallel: bool) -> list[list[Step]]:
    """The steps in order, grouped into what runs at the same time."""
    batches: list[list[Step]] = []
    for step in steps:
        if parallel and step.entry in WRAP_STEPS and batches and batches[-1][0].entry in WRAP_STEPS:
            batches[-1].append(step)
        else:
            batches.append([step])
    return batches


def submit_child(
    step: Step,
    cfg: PipelineConfig,
    overrides: list[str],
    experiment_id: str,
    target: KubernetesTarget | None,
) -> SubmittedRun:
    """Start the step's run on the configured backend and return without waiting."""
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


def wait_for_child(step: str, submitted: SubmittedRun, parent_id: str) -> str:
    """Wait for a submitted step as `mlflow.projects.run(synchronous=True)` does (a failed or
    interrupted child is marked FAILED), and link it to the pipeline's run."""
    try:
        mlflow.projects._wait_for(submitted)
    except ExecutionException:
        raise PipelineError(
            f"step {step} failed (run {submitted.run_id}); its log above says why"
        ) from None
    # Linked the way MLflow nests runs, so the UI shows the pipeline as one tree.
    MlflowClient().set_tag(submitted.run_id, "mlflow.parentRunId", parent_id)
    return submitted.run_id


@dataclass(frozen=True)
class MainResult:
    run_ids: dict[str, str]  # step -> the run it ran or reused (fetch_onnx: the export's fetch)
    reused: list[str]  # the steps whose earlier runs were reused
    # step -> wall seconds from its submission to its end, process start included (steps that
    # ran together share their start)
    seconds: dict[str, float] = field(default_factory=dict)


def pipeline_steps(cfg: PipelineConfig) -> list[Step]:
    """main.steps in pipeline order: one wrap_onnx per ONNX build, and where the export is a
    candidate (wrap.onnx_source prebuilt or both) its fetch and its wrap_onnx."""
    steps: list[Step] = []
    for entry in (s for s in STEP_ORDER if s in cfg.main.steps):
        if entry != "wrap_onnx":
            steps.append(Step(entry, entry))
            continue
        steps += [Step(f"{entry}.{b.name}", entry, b) for b in cfg.onnx_candidates]
        if cfg.uses_prebuilt_onnx:
            # Before every wrap, so that the wraps stay side by side when they run together.
            first_wrap = next((i for i, s in enumerate(steps) if s.entry in WRAP_STEPS), len(steps))
            steps.insert(first_wrap, Step("fetch_onnx", "fetch"))
            steps.append(Step(entry, entry))
    return steps


def preflight(cfg: PipelineConfig) -> None:
    """What would fail a later step, checked before any step starts: builds named outside the
    sweep, and evaluate's files (read now, so that a missing or broken one fails in seconds
    instead of after the builds)."""
    if cfg.wrap.onnx_builder_options or cfg.wrap.onnx_build:
        raise PipelineError(
            "main builds every compute.onnx_candidates entry, so wrap.onnx_builder_options and "
            "wrap.onnx_build are for a wrap_onnx run alone: put the build in "
            "compute.onnx_candidates instead (e.g. 'compute.onnx_candidates=[fp32,"
            '"int4:algo_config=k_quant_last"]\')'
        )
    if "evaluate" in cfg.main.steps:
        load_eval_set(project_path(cfg.evaluate.dataset))
        text = load_fidelity_text(project_path(cfg.evaluate.fidelity.text))
        check_fills_a_window(text, cfg.evaluate.fidelity.window)


def run(
    cfg: PipelineConfig,
    forwarded: list[str],
    parent: mlflow.entities.Run,
    target: KubernetesTarget | None,
) -> MainResult:
    """Run or reuse each step as a child of the parent run, recording the lineage on it as each
    batch of steps finishes."""
    experiment_id, parent_id = parent.info.experiment_id, parent.info.run_id
    parallel = cfg.main.parallel if cfg.main.parallel is not None else target is not None
    upstream: dict[str, str] = {}
    reused_steps: list[str] = []
    # Children get the user's overrides (minus main's own) and model/compute as params.
    forwarded = [o for o in forwarded if not o.lstrip("+~").startswith("main.")]
    base = child_base_config(cfg)
    seconds: dict[str, float] = {}
    for batch in step_batches(pipeline_steps(cfg), parallel):
        batch_started = time.monotonic()
        submitted: dict[str, SubmittedRun] = {}
        for step in batch:
            settings = upstream_settings(step, upstream)
            digest = step_config_sha256(base, settings)
            reused = None if cfg.main.rerun else reusable_run(step.entry, digest, experiment_id)
            if reused:
                log.info(
                    "step %s: reusing run %s (same commit, config, upstream)", step.name, reused
                )
                upstream[step.name] = reused
                reused_steps.append(step.name)
            else:
                log.info("step %s: running (%s backend)", step.name, cfg.compute.backend.name.value)
                overrides = forwarded + as_overrides(settings)
                submitted[step.name] = submit_child(step, cfg, overrides, experiment_id, target)
        failures = []
        for name, child in submitted.items():
            try:
                upstream[name] = wait_for_child(name, child, parent_id)
                seconds[name] = time.monotonic() - batch_started
            except PipelineError as error:
                failures.append(str(error))
        if failures:
            raise PipelineError("; ".join(failures))
        lineage = {
            tag: value
            for step in batch
            for tag, value in (
                (f"main.{step.name}.run_id", upstream[step.name]),
                (f"main.{step.name}.reused", str(step.name in reused_steps).lower()),
            )
        }
        MlflowClient().log_batch(
            parent_id, tags=[RunTag(tag, value) for tag, value in lineage.items()]
        )
    return MainResult(upstream, reused_steps, seconds)


def main(cfg: PipelineConfig, forwarded: list[str]) -> MainResult:
    target = None
    if cfg.compute.backend.name is Backend.kubernetes:
        target = kubernetes_backend.load_target(cfg.compute.backend)
        kubernetes_backend.check_can_submit(target, tracking_uri(cfg))
    preflight(cfg)
    with step_run("main", cfg) as parent:
        started = time.monotonic()
        result = run(cfg, forwarded, parent, target)
        mlflow.log_metric("main_seconds", time.monotonic() - started)
        summarize(cfg, result, parent.info.run_id)
        return result


def _entry_of(name: str) -> str:
    """The entry point of a step named in the parent's tags (wrap_onnx.int8 -> wrap_onnx)."""
    return "fetch" if name == "fetch_onnx" else name.partition(".")[0]


def pipeline_note(
    cfg: PipelineConfig, result: MainResult, evaluated: list[EvaluatedModel], reference: str,
    register_tags: dict[str, str] | None,
) -> str:  # fmt: skip
    """The parent run's description: what the pipeline registered and why, the candidates side
    by side, the evaluation's chart, and every step's run."""
    upstream = result.run_ids
    lines = [f"## {cfg.model.display_name} on {cfg.compute.name}"]
    if register_tags:
        name, version, alias = (
            register_tags[f"register.{k}"] for k in ("model_name", "version", "alias")
        )
        lines[0] += f": {name} version {version} is {alias}"
        lines += [
            "",
            f"**{register_tags['register.chosen']}** chosen by register.choose="
            f"{cfg.register.choose.value}: {register_tags.get('register.why', '')}; gate "
            f"{register_tags['register.gate']}. {version_link(name, version)}, load it with "
            f"`models:/{name}@{alias}`.",
        ]
    if evaluated:
        lines += [
            "",
            candidates_table(
                {e.model.label: e.summary for e in evaluated},
                reference,
                {e.model.label: e.verdict for e in evaluated},
                {e.model.label: e.answers for e in evaluated},
            ),
            "",
            artifact_image(upstream["evaluate"], SPEED_CHART, "decode rate against fidelity"),
        ]
    lines += ["", "| step | run | ran or reused |", "|---|---|---|"]
    lines += [
        f"| {step} | {run_link(run_id)} | {'reused' if step in result.reused else 'ran'} |"
        for step, run_id in upstream.items()
    ]
    return "\n".join(lines)


def summarize(cfg: PipelineConfig, result: MainResult, parent_id: str) -> None:
    """Record the lineage on the parent run (tags, the models its children made, a description)
    and say where to look."""
    upstream = result.run_ids
    client = MlflowClient()
    tags = {}
    models = []
    for name, run_id in upstream.items():
        if _entry_of(name) in WRAP_STEPS:
            child = client.get_run(run_id).data.tags
            tags[f"main.model_uri.{child['model.label']}"] = child["model.uri"]
            if model_id := logged_model_id(child["model.uri"]):
                models.append(model_id)
    if models:
        link_models(parent_id, models, made=True)
    uri = mlflow.get_tracking_uri()
    lines = [
        "pipeline finished. Look at it with:",
        f"  open {redacted(uri)}"
        if uri.startswith("http")
        else f"  mlflow ui --backend-store-uri {uri}",
    ]
    evaluated, reference = [], ""
    phases = {}
    if "evaluate" in upstream:
        evaluate_run = client.get_run(upstream["evaluate"])
        metrics = evaluate_run.data.metrics
        headline = {
            k: round(v, 3)
            for k, v in sorted(metrics.items())
            if k.endswith((".accuracy", ".kld_mean", ".tokens_per_s"))
        }
        lines.append(f"  evaluation ({upstream['evaluate']}): {headline}")
        phases = phase_seconds(metrics)
        evaluated = [
            EvaluatedModel.from_dict(entry)
            for entry in mlflow.artifacts.load_dict(
                f"runs:/{upstream['evaluate']}/eval/candidates.json"
            )
        ]
        reference = evaluate_run.data.tags.get("evaluate.reference", "")
    register_tags = None
    if "register" in upstream:
        register_tags = client.get_run(upstream["register"]).data.tags
        name, version, alias = (
            register_tags["register.model_name"],
            register_tags["register.version"],
            register_tags["register.alias"],
        )
        tags["main.registered"] = f"{name} v{version} @{alias}"
        lines.append(f"  registered: models:/{name}@{alias} (version {version})")
    lines.append("  " + step_times(result, phases))
    mlflow.set_tags(tags)
    mlflow.log_metrics({f"seconds.{step}": seconds for step, seconds in result.seconds.items()})
    set_note(parent_id, pipeline_note(cfg, result, evaluated, reference, register_tags))
    log.info("\n".join(lines))


def step_times(result: MainResult, evaluate_phases: dict[str, float]) -> str:
    """Each step's seconds, `reused` for a reused one; evaluate's split into its phases."""
    parts = []
    for step in result.run_ids:
        if step in result.reused:
            parts.append(f"{step} reused")
            continue
        part = f"{step} {result.seconds.get(step, float('nan')):.1f} s"
        if step == "evaluate" and evaluate_phases:
            inner = ", ".join(f"{phase} {value:.1f}" for phase, value in evaluate_phases.items())
            part += f" ({inner})"
        parts.append(part)
    return "steps: " + ", ".join(parts)
