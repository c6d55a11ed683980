"""Entry point `evaluate`: ask the wrapped models every item of the evaluation set, side by side.

Candidates are wrap runs: by default the latest finished wrap_transformers and wrap_onnx runs
of this model variant and compute target, or any list in `evaluate.wrap_run_ids`. Each is
loaded through `mlflow.pyfunc.load_model` and measured on quality and speed.

Run artifacts: `eval/items.json` (per item: question, each model's answer, correct or not,
latency), `eval/summary.json` and `eval/summary.md` (per model), `eval/comparison.png`,
`eval/candidates.json` (what register reads), `config.yaml`. The evaluation set is the run's
dataset input. Metrics, per candidate label (`transformers-fp32`, `onnx-fp32`, ...):
`<label>.accuracy`, `.latency_mean_s`, `.latency_p50_s`, `.latency_p95_s`, `.ttft_mean_s`
(streaming models), `.tokens_per_s`, `.prompt_tokens`, `.completion_tokens`, `.peak_rss_mb`,
`.load_seconds`, `.errors`, and `parity` (share of items where all models gave the same
answer). The per-item scores also go through `mlflow.genai.evaluate`, so they show in the
MLflow UI's evaluation view.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from steps.config.schema import WRAP_STEPS, PipelineConfig
from steps.errors import PipelineError
from steps.evaluation.evalset import EvalSet, answer_matches, load_eval_set
from steps.evaluation.measure import CandidateResult, evaluate_candidate
from steps.evaluation.report import (
    comparison_chart,
    genai_rows,
    parity,
    per_item_rows,
    summarize,
    summary_markdown,
)
from steps.tracking.lineage import finished_run, latest_finished_run
from steps.tracking.models import EvaluatedModel, LoggedChatModel
from steps.tracking.provenance import PROJECT_ROOT
from steps.tracking.runs import step_run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateResult:
    eval_set: EvalSet
    candidates: list[LoggedChatModel]
    results: list[CandidateResult]  # per candidate, in the same order
    summaries: dict[str, dict[str, float]]  # label -> summary

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
        return [EvaluatedModel(c, self.summaries[c.label]) for c in self.candidates]

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
        found = [latest_finished_run(cfg, experiment_id, step) for step in WRAP_STEPS]
        runs = [run for run in found if run is not None]
    if not runs:
        raise PipelineError(
            f"no finished wrap runs of model={cfg.model.name} compute={cfg.compute.name} in "
            f"experiment {experiment_id}: run wrap_transformers and wrap_onnx first, or set "
            "evaluate.wrap_run_ids"
        )
    return with_unique_labels([LoggedChatModel.from_run(run) for run in runs])


def dataset_path(cfg: PipelineConfig) -> Path:
    """evaluate.dataset, relative to the repository root unless absolute."""
    path = Path(cfg.evaluate.dataset)
    return path if path.is_absolute() else PROJECT_ROOT / path


def run(cfg: PipelineConfig, candidates: list[LoggedChatModel]) -> EvaluateResult:
    """Ask every candidate the evaluation set and summarize; needs the store that holds the
    models, not an open run."""
    eval_set = load_eval_set(dataset_path(cfg), cfg.evaluate.max_items)
    log.info(
        "evaluating %s on %s (%d items)",
        ", ".join(c.label for c in candidates),
        eval_set.name,
        len(eval_set.items),
    )
    results = [
        evaluate_candidate(c.label, c.model_uri, eval_set, cfg.evaluate.max_new_tokens)
        for c in candidates
    ]
    summaries = {result.label: summarize(result) for result in results}
    log.info("evaluation summary:\n%s", summary_markdown(summaries))
    return EvaluateResult(eval_set, candidates, results, summaries)


def log_dataset(eval_set: EvalSet) -> None:
    frame = pd.DataFrame(
        [{"id": i.id, "question": i.question, "reference": i.reference} for i in eval_set.items]
    )
    dataset = mlflow.data.from_pandas(frame, source=str(eval_set.path), name=eval_set.name)
    mlflow.log_input(dataset, context="evaluation")
    mlflow.set_tags({"evaluate.dataset": eval_set.name, "evaluate.dataset_sha256": eval_set.sha256})


def log_genai_evaluation(eval_set: EvalSet, result: CandidateResult, model_uri: str) -> None:
    """The per-item verdicts through MLflow's own evaluation, so they show in the UI's
    evaluation view and on the LoggedModel; one nested run per model keeps metrics apart."""
    # The default 10 workers overflow SQLite's connection pool and drop trace links.
    os.environ.setdefault("MLFLOW_GENAI_EVAL_MAX_WORKERS", "1")
    with mlflow.start_run(run_name=f"genai-evaluate-{result.label}", nested=True):
        mlflow.set_tag("pipeline.step", "evaluate.genai")
        mlflow.genai.evaluate(
            data=genai_rows(eval_set, result),
            scorers=[answer_matches],
            model_id=model_uri.removeprefix("models:/"),
        )


def log_result(result: EvaluateResult) -> None:
    log_dataset(result.eval_set)
    mlflow.log_metrics(result.metrics)
    mlflow.log_table(pd.DataFrame(result.item_rows()), "eval/items.json")
    summary_frame = pd.DataFrame(result.summaries).T.rename_axis("model").reset_index()
    mlflow.log_table(summary_frame, "eval/summary.json")
    mlflow.log_text(summary_markdown(result.summaries), "eval/summary.md")
    mlflow.log_dict([e.to_dict() for e in result.evaluated], "eval/candidates.json")
    with tempfile.TemporaryDirectory() as scratch:
        chart = Path(scratch) / "comparison.png"
        comparison_chart(result.summaries, chart)
        mlflow.log_artifact(str(chart), "eval")
    for candidate, measured in zip(result.candidates, result.results, strict=True):
        log_genai_evaluation(result.eval_set, measured, candidate.model_uri)


def main(cfg: PipelineConfig) -> EvaluateResult:
    with step_run("evaluate", cfg) as active:
        result = run(cfg, find_candidates(cfg, active.info.experiment_id))
        log_result(result)
        return result
