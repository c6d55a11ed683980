"""What the MLflow UI shows on a run's page besides its metrics: its description (MLflow's run
note, Markdown) with links to the runs, models and versions it names, and the logged models the
run used or made; and the model card a registered version carries. Every page is written here:
the evaluate run's, the register run's with its model card, and the pipeline's.

Links are relative to the UI's own page (`#/runs/<id>` is the UI's route to any run), so they
work under `mlflow ui`, a team's server and a server behind a path prefix alike. Images in a
note are the run's own artifacts, served by the UI's `get-artifact` endpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote

from mlflow import MlflowClient
from mlflow.entities import LoggedModel, LoggedModelInput, LoggedModelOutput, Run
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from steps.config.schema import PipelineConfig
from steps.evaluation.report import COMPARISON_CHART, SPEED_CHART, candidates_table
from steps.tracking.models import EvaluatedModel, LoggedChatModel
from steps.tracking.registry import Registered

CUT = "\n\n_(cut here: the note is longer than a tag holds; the run's artifacts have it all)_\n"


def run_link(run_id: str) -> str:
    return f"[{run_id}](#/runs/{run_id})"


def model_link(model: LoggedModel) -> str:
    return f"[{model.name}](#/experiments/{model.experiment_id}/models/{model.model_id})"


def version_link(name: str, version: str | int) -> str:
    return f"[{name} version {version}](#/models/{quote(name)}/versions/{version})"


def artifact_image(run_id: str, path: str, alt: str) -> str:
    return f"![{alt}](get-artifact?path={quote(path)}&run_uuid={run_id})"


def set_note(run_id: str, markdown: str) -> None:
    """The run's description, cut to what one tag holds (MLflow keeps the note in a tag)."""
    if len(markdown) > MAX_TAG_VAL_LENGTH:
        markdown = markdown[: MAX_TAG_VAL_LENGTH - len(CUT)] + CUT
    MlflowClient().set_tag(run_id, MLFLOW_RUN_NOTE, markdown)


def link_models(run_id: str, model_ids: Iterable[str], *, made: bool = False) -> None:
    """List the models on the run's page: as what the run made (outputs) or used (inputs)."""
    client = MlflowClient()
    if made:
        client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0) for model_id in model_ids])
    else:
        client.log_inputs(run_id, models=[LoggedModelInput(model_id) for model_id in model_ids])


def evaluated_table(evaluated: list[EvaluatedModel], reference: str) -> str:
    """Every candidate's row with its verdict and who answered its items."""
    return candidates_table(
        {e.model.label: e.summary for e in evaluated},
        reference,
        {e.model.label: e.verdict for e in evaluated},
        {e.model.label: e.answers for e in evaluated},
    )


@dataclass(frozen=True)
class EvaluatedSets:
    """What an evaluation was measured on, as its page names them."""

    eval_set: str
    items: int
    fidelity_text: str


def evaluation_page(
    cfg: PipelineConfig, evaluated: list[EvaluatedModel], reference: str, chosen: str,
    measured_on: EvaluatedSets, models: dict[str, LoggedModel], run_id: str,
) -> str:  # fmt: skip
    """The evaluate run's description: the choice and why, every candidate's row, the chart, and
    links to the runs and models it evaluated."""
    verdict = next(e.verdict for e in evaluated if e.model.label == chosen)
    lines = [
        f"## {cfg.model.display_name} on {cfg.compute.name}: {chosen}",
        "",
        f"**{chosen}** is what register's fastest_faithful policy chooses: "
        f"{verdict.removeprefix('chosen: ')}. Each candidate was scored "
        f"token by token against the reference **{reference}** on "
        f"`{measured_on.fidelity_text}`; those that can still be chosen then answered "
        f"`{measured_on.eval_set}` ({measured_on.items} questions; the answers column says who "
        "answered).",
        "",
        evaluated_table(evaluated, reference),
        "",
        artifact_image(run_id, SPEED_CHART, "decode rate against fidelity"),
        "",
        "### What it evaluated",
        "",
    ]
    fetch_runs = sorted({m.tags.get("fetch.run_id", "") for m in models.values()} - {""})
    lines += [f"- fetch: {run_link(fetch_run)}" for fetch_run in fetch_runs]
    candidates: list[LoggedChatModel] = [e.model for e in evaluated]
    lines += [
        f"- {c.label}: {model_link(models[c.label])}, logged by "
        f"{run_link(c.wrap_run_id or models[c.label].source_run_id)}"
        for c in candidates
    ]
    lines += [
        "",
        "Per-item answers: `eval/items.json`; every metric: `eval/summary.md`; charts: "
        f"`{COMPARISON_CHART}`, `{SPEED_CHART}` (Artifacts).",
    ]
    return "\n".join(lines)


def model_card(
    cfg: PipelineConfig, chosen: EvaluatedModel, table: str, reference: str, evaluate_run: Run,
    commit: str,
) -> str:  # fmt: skip
    """A registered version's description: where the model came from, how it was chosen and
    measured, and every candidate it was chosen from."""
    source = cfg.model.source
    where = source.repo_id or source.path or source.package
    s = chosen.summary
    tags = evaluate_run.data.tags
    return "\n".join(
        [
            f"# {cfg.model.display_name} ({chosen.model.label}, {cfg.compute.name})",
            "",
            f"- Source: {source.kind.value} `{where}` at revision `{source.revision}`",
            f"- Runtime: {chosen.model.runtime.value}, precision {chosen.model.precision}; "
            f"license {cfg.model.license}",
            f"- Chosen by register.choose={cfg.register.choose.value} against the reference "
            f"{reference}",
            f"- Evaluation: `{tags.get('evaluate.dataset')}` "
            f"(sha256 {tags.get('evaluate.dataset_sha256', '')[:12]}), fidelity text "
            f"`{tags.get('evaluate.fidelity_text')}` "
            f"(sha256 {tags.get('evaluate.fidelity_text_sha256', '')[:12]}), "
            f"run {run_link(evaluate_run.info.run_id)}",
            f"- Accuracy {s['accuracy']:.3f}; latency p50 {s['latency_p50_s']:.2f} s, "
            f"p95 {s['latency_p95_s']:.2f} s; {s['tokens_per_s']:.1f} output tokens/s; "
            f"peak RSS {s['peak_rss_mb']:.0f} MiB",
            f"- Git commit `{commit}`",
            "",
            "## Candidates",
            "",
            table,
        ]
    )


def register_page(
    cfg: PipelineConfig, chosen: str, why: str, gate: str, table: str, evaluate_run: Run,
    model: LoggedModel, registered: Registered | None,
) -> str:  # fmt: skip
    """The register run's description: what was registered where and why (or that nothing was,
    `registered` None), the candidates, and links to the evaluation and the model."""
    if registered is None:
        headline = f"## Nothing registered: {chosen} failed the quality gate"
        outcome = f"Gate: {gate}. The champion, if any, is untouched."
    else:
        headline = f"## {registered.name} version {registered.version} is {registered.alias}"
        version = version_link(registered.name, registered.version)
        before = f"version {registered.champion_before}" if registered.champion_before else "none"
        how = "Registered now as" if registered.created else "Already registered (same model) as"
        outcome = (
            f"{how} {version}; gate {gate}; champion before: {before}. Load it with "
            f"`models:/{registered.name}@{registered.alias}`."
        )
    return "\n".join(
        [
            headline,
            "",
            f"**{chosen}** chosen by register.choose={cfg.register.choose.value}: {why}. {outcome}",
            "",
            table,
            "",
            f"- Evaluation: {run_link(evaluate_run.info.run_id)}",
            f"- Model: {model_link(model)}, logged by {run_link(model.source_run_id)}",
        ]
    )


def pipeline_page(
    cfg: PipelineConfig, run_ids: dict[str, str], reused: list[str],
    evaluated: list[EvaluatedModel], reference: str, register_tags: dict[str, str] | None,
) -> str:  # fmt: skip
    """The pipeline run's description: what it registered and why, the candidates side by side,
    the evaluation's chart, and every step's run (`run_ids`: step name -> run)."""
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
            evaluated_table(evaluated, reference),
            "",
            artifact_image(run_ids["evaluate"], SPEED_CHART, "decode rate against fidelity"),
        ]
    lines += ["", "| step | run | ran or reused |", "|---|---|---|"]
    lines += [
        f"| {step} | {run_link(run_id)} | {'reused' if step in reused else 'ran'} |"
        for step, run_id in run_ids.items()
    ]
    return "\n".join(lines)
