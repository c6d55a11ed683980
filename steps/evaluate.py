"""Entry point `evaluate`: every candidate side by side, on task accuracy, speed and fidelity to
a reference.

Candidates are wrap runs: by default the latest finished wrap_transformers run and, for each
`compute.onnx_candidates` build, the latest finished wrap_onnx run of that build, of this model
variant and compute target; or any list in `evaluate.wrap_run_ids`. The reference
(`evaluate.reference`, default the transformers model) is one of them. Each candidate is asked
the evaluation set through `mlflow.pyfunc.load_model` (steps.evaluation.measure), and scored
teacher-forced against the reference on the fidelity text (steps.evaluation.fidelity).

Run artifacts: `eval/items.json` (per item: question, each model's answer, correct or not,
latency), `eval/summary.json` and `eval/summary.md` (per model, with the register policy's
verdict), `eval/comparison.png`, `eval/speed_vs_fidelity.png`, `eval/candidates.json` (what
register reads), `config.yaml`. The evaluation set and the fidelity text are the run's dataset
inputs; tag `evaluate.reference` names the reference. Metrics, per candidate label
(`transformers-fp32`, `onnx-int4-k_quant_last`, ...): `<label>.accuracy` with
`.accuracy_ci_low`/`_high` (95% Wilson), `.flips_lost`, `.flips_gained`, `.mcnemar_p` (against
the reference), `.kld_mean`, `.kld_p99`, `.kld_max`, `.top1_agreement` (with its interval),
`.ppl`, `.ppl_ratio`, `.delta_p_rms`, `.latency_p50_s`, `.latency_p95_s`, `.ttft_mean_s`,
`.tokens_per_s`, `.peak_rss_mb`, ..., and `parity` (share of items where all models gave the
same answer).

In MLflow's UI: the candidates are the run's model inputs; each has a nested run
(`evaluate <variant> <label> <compute>`) that logs its headline metrics on its LoggedModel,
with the dataset each was measured on (report.MODEL_LIST_METRICS: the experiment's model list
compares the builds on them), and its per-item scores through `mlflow.genai.evaluate`. The
run's description says which build fastest_faithful chooses and why, with every candidate's
row, the speed-against-fidelity chart and links to the runs and models it evaluated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.data.dataset import Dataset
from mlflow.entities import LoggedModel

from steps.config.compose import project_path
from steps.config.schema import WRAP_STEPS, PipelineConfig
from steps.errors import PipelineError
from steps.evaluation import fidelity
from steps.evaluation.evalset import EvalSet, answer_matches, load_eval_set
from steps.evaluation.fidelity import FidelityText, load_fidelity_text
from steps.evaluation.measure import CandidateResult, evaluate_candidate
from steps.evaluation.report import (
    COMPARISON_CHART,
    MODEL_LIST_METRICS,
    SPEED_CHART,
    candidates_table,
    comparison_chart,
    flips,
    genai_rows,
    parity,
    per_item_rows,
    speed_fidelity_chart,
    summarize,
    summary_markdown,
)
from steps.evaluation.selection import Selection, fastest_faithful
from steps.tracking.lineage import finished_run, latest_finished_run
from steps.tracking.models import EvaluatedModel, LoggedChatModel
from steps.tracking.notes import artifact_image, link_models, model_link, run_link, set_note
from steps.tracking.runs import run_name, step_run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateResult:
    eval_set: EvalSet
    fidelity_text: FidelityText
    reference: str  # the label of the candidate the others are compared with
    candidates: list[LoggedChatModel]
    results: list[CandidateResult]  # per candidate, in the same order
    summaries: dict[str, dict[str, float]]  # label -> summary
    selection: Selection  # what register's fastest_faithful policy would choose
    fidelity_keys: frozenset[str]  # the summaries' keys measured on the fidelity text

    @property
    def metrics(self) -> dict[str, float]:
        metrics = {
            f"{label}.{key}": value
            for label, summary in self.summaries.items()
            for key, value in summary.items()
        }
        if len(self.results) > 1:
            metrics["parity"] = parity(self.results)
        return metrics

    @property
    def evaluated(self) -> list[EvaluatedModel]:
        return [
            EvaluatedModel(c, self.summaries[c.label], self.selection.reasons[c.label])
            for c in self.candidates
        ]

    def item_rows(self) -> list[dict[str, Any]]:
        return per_item_rows(self.eval_set, self.results)


def with_unique_labels(models: list[LoggedChatModel]) -> list[LoggedChatModel]:
    """Two candidates of one label (two runs of one build) are told apart by their run ids."""
    seen: set[str] = set()
    unique = []
    for model in models:
        label = model.label
        if label in seen:
            label = f"{label}-{(model.wrap_run_id or model.model_uri)[-8:]}"
        seen.add(label)
        unique.append(dataclasses.replace(model, label=label))
    return unique


def find_candidates(cfg: PipelineConfig, experiment_id: str) -> list[LoggedChatModel]:
    if cfg.evaluate.wrap_run_ids:
        runs = [
            finished_run(run_id, WRAP_STEPS, "evaluate.wrap_run_ids")
            for run_id in cfg.evaluate.wrap_run_ids
        ]
    else:
        scope = (
            f"tags.`pipeline.model` = '{cfg.model.name}' and "
            f"tags.`pipeline.compute` = '{cfg.compute.name}'"
        )
        found = [
            latest_finished_run(
                cfg, experiment_id, f"wrap_{runtime.value}",
                f"{scope} and tags.`model.label` = '{label}'",
            )
            for runtime, label in cfg.planned_candidates
        ]  # fmt: skip
        runs = [run for run in found if run is not None]
    if not runs:
        raise PipelineError(
            f"no finished wrap runs of model={cfg.model.name} compute={cfg.compute.name} in "
            f"experiment {experiment_id}: run wrap_transformers and wrap_onnx first, or set "
            "evaluate.wrap_run_ids"
        )
    return with_unique_labels([LoggedChatModel.from_run(run) for run in runs])


def dataset_path(cfg: PipelineConfig) -> Path:
    return project_path(cfg.evaluate.dataset)


def reference_of(cfg: PipelineConfig, candidates: list[LoggedChatModel]) -> LoggedChatModel:
    wanted = cfg.reference_label
    for candidate in candidates:
        if candidate.label == wanted:
            return candidate
    raise PipelineError(
        f"evaluate.reference={wanted} is not among the candidates "
        f"({', '.join(c.label for c in candidates)}): wrap it, or name one of those"
    )


def score_fidelity(
    cfg: PipelineConfig, text: FidelityText, reference: LoggedChatModel,
    candidates: list[LoggedChatModel],
) -> dict[str, dict[str, float]]:  # fmt: skip
    """All candidates loaded at once, so that the reference runs each window once."""
    with contextlib.ExitStack() as stack:
        models = {
            c.label: stack.enter_context(fidelity.loaded(c.runtime.value, c.model_uri))
            for c in candidates
        }
        stream = fidelity.token_stream(text, models[reference.label])
        windows = fidelity.windows(
            stream, cfg.evaluate.fidelity.window, cfg.evaluate.fidelity.scored_tokens
        )
        log.info(
            "fidelity: %d windows of %d tokens from %s (%d tokens), against %s",
            len(windows), cfg.evaluate.fidelity.window, text.name, len(stream), reference.label,
        )  # fmt: skip
        return fidelity.score(models[reference.label], models, windows)


def run(cfg: PipelineConfig, candidates: list[LoggedChatModel]) -> EvaluateResult:
    """Ask every candidate the evaluation set, score it against the reference and summarize;
    needs the store that holds the models, not an open run."""
    eval_set = load_eval_set(dataset_path(cfg), cfg.evaluate.max_items)
    text = load_fidelity_text(project_path(cfg.evaluate.fidelity.text))
    reference = reference_of(cfg, candidates)
    log.info(
        "evaluating %s on %s (%d items), against %s",
        ", ".join(c.label for c in candidates), eval_set.name, len(eval_set.items),
        reference.label,
    )  # fmt: skip
    # Fidelity first: it checks the text against the tokenizer before minutes of asking.
    scores = score_fidelity(cfg, text, reference, candidates)
    evaluation = cfg.evaluate
    results = [
        evaluate_candidate(
            c.label, c.model_uri, eval_set, evaluation.max_new_tokens, evaluation.timed_items,
            evaluation.batch_size,
        )
        for c in candidates
    ]  # fmt: skip
    by_label = {result.label: result for result in results}
    summaries = {
        label: summarize(result) | flips(by_label[reference.label], result) | scores[label]
        for label, result in by_label.items()
    }
    selection = fastest_faithful(summaries, reference.label, cfg.register)
    log.info("evaluation summary:\n%s", summary_markdown(summaries, selection))
    fidelity_keys = frozenset(key for score in scores.values() for key in score)
    return EvaluateResult(
        eval_set, text, reference.label, candidates, results, summaries, selection, fidelity_keys
    )


def log_datasets(eval_set: EvalSet, text: FidelityText) -> tuple[Dataset, Dataset]:
    """The evaluation set and the fidelity text as the run's inputs, returned so that metrics
    can name the one they were measured on."""
    frame = pd.DataFrame(
        [{"id": i.id, "question": i.question, "reference": i.reference} for i in eval_set.items]
    )
    questions = mlflow.data.from_pandas(frame, source=str(eval_set.path), name=eval_set.name)
    mlflow.log_input(questions, context="evaluation")
    documents = mlflow.data.from_pandas(
        pd.DataFrame([{"id": d.id, "kind": d.kind, "sha256": text.sha256} for d in text.documents]),
        source=str(text.path),
        name=text.name,
    )
    mlflow.log_input(documents, context="fidelity")
    mlflow.set_tags(
        {
            "evaluate.dataset": eval_set.name,
            "evaluate.dataset_sha256": eval_set.sha256,
            "evaluate.fidelity_text": text.name,
            "evaluate.fidelity_text_sha256": text.sha256,
        }
    )
    return questions, documents


def log_candidate(
    result: EvaluateResult, candidate: LoggedChatModel, measured: CandidateResult,
    datasets: tuple[Dataset, Dataset], name: str,
) -> None:  # fmt: skip
    """The candidate's headline metrics on its own LoggedModel, each with the dataset it was
    measured on (so MLflow's model list compares the builds side by side, grouped by dataset),
    and its per-item verdicts through MLflow's own evaluation (the UI's evaluation view); one
    nested run per model keeps the unprefixed metrics apart."""
    # The default 10 workers overflow SQLite's connection pool and drop trace links.
    os.environ.setdefault("MLFLOW_GENAI_EVAL_MAX_WORKERS", "1")
    questions, documents = datasets
    summary = result.summaries[candidate.label]
    # Nested runs go to the process's current experiment unless told (the evaluate run's own
    # experiment may be another: tracking.experiment).
    parent = mlflow.active_run().info.experiment_id
    with mlflow.start_run(run_name=name, nested=True, experiment_id=parent) as child:
        mlflow.set_tags({"pipeline.step": "evaluate.genai", "model.label": candidate.label})
        link_models(child.info.run_id, [candidate.model_id])
        shown = {key: summary[key] for key in MODEL_LIST_METRICS if key in summary}
        on_text = {k: v for k, v in shown.items() if k in result.fidelity_keys}
        on_questions = {k: v for k, v in shown.items() if k not in on_text}
        mlflow.log_metrics(on_questions, model_id=candidate.model_id, dataset=questions)
        mlflow.log_metrics(on_text, model_id=candidate.model_id, dataset=documents)
        mlflow.genai.evaluate(
            data=genai_rows(result.eval_set, measured),
            scorers=[answer_matches],
            model_id=candidate.model_id,
        )


def log_charts(result: EvaluateResult) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        speed, comparison = (
            Path(scratch) / Path(chart).name for chart in (SPEED_CHART, COMPARISON_CHART)
        )
        speed_fidelity_chart(result.summaries, result.selection, speed)
        comparison_chart(result.summaries, comparison)
        for chart in (speed, comparison):
            mlflow.log_artifact(str(chart), "eval")


def evaluation_note(
    cfg: PipelineConfig, result: EvaluateResult, models: dict[str, LoggedModel], run_id: str
) -> str:
    """The evaluate run's description: the choice and why, every candidate's row, the chart, and
    links to the runs and models it evaluated."""
    chosen = result.selection.chosen
    text = result.fidelity_text
    lines = [
        f"## {cfg.model.display_name} on {cfg.compute.name}: {chosen}",
        "",
        f"**{chosen}** is what register's fastest_faithful policy chooses: "
        f"{result.selection.reasons[chosen].removeprefix('chosen: ')}. Each candidate answered "
        f"`{result.eval_set.name}` ({len(result.eval_set.items)} questions) and was scored "
        f"token by token against the reference **{result.reference}** on `{text.name}`.",
        "",
        candidates_table(result.summaries, result.reference, result.selection.reasons),
        "",
        artifact_image(run_id, SPEED_CHART, "decode rate against fidelity"),
        "",
        "### What it evaluated",
        "",
    ]
    fetch_runs = sorted({m.tags.get("fetch.run_id", "") for m in models.values()} - {""})
    lines += [f"- fetch: {run_link(fetch_run)}" for fetch_run in fetch_runs]
    lines += [
        f"- {c.label}: {model_link(models[c.label])}, logged by "
        f"{run_link(c.wrap_run_id or models[c.label].source_run_id)}"
        for c in result.candidates
    ]
    lines += [
        "",
        "Per-item answers: `eval/items.json`; every metric: `eval/summary.md`; charts: "
        f"`{COMPARISON_CHART}`, `{SPEED_CHART}` (Artifacts).",
    ]
    return "\n".join(lines)


def log_result(cfg: PipelineConfig, result: EvaluateResult, run_id: str) -> None:
    datasets = log_datasets(result.eval_set, result.fidelity_text)
    mlflow.set_tag("evaluate.reference", result.reference)
    mlflow.log_metrics(result.metrics)
    mlflow.log_table(pd.DataFrame(result.item_rows()), "eval/items.json")
    summary_frame = pd.DataFrame(result.summaries).T.rename_axis("model").reset_index()
    summary_frame["verdict"] = summary_frame["model"].map(result.selection.reasons)
    mlflow.log_table(summary_frame, "eval/summary.json")
    mlflow.log_text(summary_markdown(result.summaries, result.selection), "eval/summary.md")
    mlflow.log_dict([e.to_dict() for e in result.evaluated], "eval/candidates.json")
    log_charts(result)
    client = MlflowClient()
    models = {c.label: client.get_logged_model(c.model_id) for c in result.candidates}
    link_models(run_id, [m.model_id for m in models.values()])
    for candidate, measured in zip(result.candidates, result.results, strict=True):
        log_candidate(
            result, candidate, measured, datasets, run_name("evaluate", cfg, candidate.label)
        )
    set_note(run_id, evaluation_note(cfg, result, models, run_id))


def main(cfg: PipelineConfig) -> EvaluateResult:
    with step_run("evaluate", cfg) as active:
        result = run(cfg, find_candidates(cfg, active.info.experiment_id))
        log_result(cfg, result, active.info.run_id)
        return result
