"""Entry point `main`: the whole pipeline as child runs under one parent run.

fetch -> wrap_transformers + one wrap_onnx per `compute.onnx_candidates` build -> evaluate ->
register (the steps steps.config.plan lays out), with the same model and compute choices and
overrides for all, each step handed the run ids of the steps before it (each wrap_onnx also its
build, as `wrap.onnx_build`). Like MLflow's
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

import logging
import time
from dataclasses import dataclass, field

import mlflow
from mlflow import MlflowClient
from mlflow.entities import RunTag
from mlflow.projects import SubmittedRun

from steps.backends import kubernetes as kubernetes_backend
from steps.backends import launch
from steps.backends.kubernetes import KubernetesTarget
from steps.config import plan
from steps.config.compose import child_base_config, child_config_digest, project_path
from steps.config.plan import Step
from steps.config.schema import WRAP_STEPS, Backend, PipelineConfig
from steps.errors import PipelineError
from steps.evaluation.evalset import load_eval_set
from steps.evaluation.fidelity import check_fills_a_window, load_fidelity_text
from steps.evaluation.report import phase_seconds
from steps.tracking.lineage import reusable_run
from steps.tracking.models import evaluated_models, logged_model_id
from steps.tracking.pages import link_models, pipeline_page, set_note
from steps.tracking.runs import step_run, tracking_uri
from steps.tracking.server import redacted

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MainResult:
    run_ids: dict[str, str]  # step -> the run it ran or reused (fetch_onnx: the export's fetch)
    reused: list[str]  # the steps whose earlier runs were reused
    # step -> wall seconds from its submission to its end, process start included (steps that
    # ran together share their start)
    seconds: dict[str, float] = field(default_factory=dict)
    wrap_run_ids: list[str] = field(default_factory=list)  # the runs that made the candidates


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
    upstream: dict[Step, str] = {}
    reused_steps: list[str] = []
    # Children get the user's overrides (minus main's own) and model/compute as params.
    forwarded = [o for o in forwarded if not o.lstrip("+~").startswith("main.")]
    base = child_base_config(cfg)
    seconds: dict[str, float] = {}
    for batch in plan.step_batches(plan.pipeline_steps(cfg), parallel):
        batch_started = time.monotonic()
        submitted: dict[Step, SubmittedRun] = {}
        for step in batch:
            settings = plan.upstream_settings(step, upstream)
            digest = child_config_digest(base, settings)
            reused = None if cfg.main.rerun else reusable_run(step.entry, digest, experiment_id)
            if reused:
                log.info(
                    "step %s: reusing run %s (same commit, config, upstream)", step.name, reused
                )
                upstream[step] = reused
                reused_steps.append(step.name)
            else:
                log.info("step %s: running (%s backend)", step.name, cfg.compute.backend.name.value)
                overrides = forwarded + plan.as_overrides(settings)
                submitted[step] = launch.submit(step, cfg, overrides, experiment_id, target)
        failures = []
        for step, child in submitted.items():
            try:
                upstream[step] = launch.wait(step, child, parent_id)
                seconds[step.name] = time.monotonic() - batch_started
            except PipelineError as error:
                failures.append(str(error))
        if failures:
            raise PipelineError("; ".join(failures))
        lineage = {
            tag: value
            for step in batch
            for tag, value in (
                (f"main.{step.name}.run_id", upstream[step]),
                (f"main.{step.name}.reused", str(step.name in reused_steps).lower()),
            )
        }
        MlflowClient().log_batch(
            parent_id, tags=[RunTag(tag, value) for tag, value in lineage.items()]
        )
    return MainResult(
        {step.name: run_id for step, run_id in upstream.items()},
        reused_steps,
        seconds,
        [run_id for step, run_id in upstream.items() if step.entry in WRAP_STEPS],
    )


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
        record_lineage(cfg, result, parent.info.run_id)
        return result


def record_lineage(cfg: PipelineConfig, result: MainResult, parent_id: str) -> None:
    """Record the lineage on the parent run (tags, the models its children made, a description)
    and say where to look."""
    upstream = result.run_ids
    client = MlflowClient()
    tags = {}
    models = []
    for run_id in result.wrap_run_ids:
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
        evaluated = evaluated_models(upstream["evaluate"])
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
    page = pipeline_page(cfg, upstream, result.reused, evaluated, reference, register_tags)
    set_note(parent_id, page)
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
