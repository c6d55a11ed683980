"""Entry point `evaluate`: ask the wrapped models every item of the evaluation set, side by side.

Candidates are wrap runs: by default the latest finished wrap_transformers and wrap_onnx runs
of this model variant and compute target, or any list in `evaluate.wrap_run_ids`. Each is
loaded through `mlflow.pyfunc.load_model` and measured on quality and speed.

Run artifacts: `eval/items.json` (per item: question, each model's answer, correct or not,
latency), `eval/summary.json` and `eval/summary.md` (per model), `eval/comparison.png`,
`eval/candidates.json` (what register reads), `config.yaml`. The evaluation set is the run's
dataset input. Metrics: `<label>.accuracy`, `.latency_mean_s`, `.latency_p50_s`,
`.latency_p95_s`, `.ttft_mean_s` (streaming models), `.tokens_per_s`, `.prompt_tokens`,
`.completion_tokens`, `.peak_rss_mb`, `.load_seconds`, `.errors`, and `parity` (share of items
where all models gave the same answer). The per-item scores also go through
`mlflow.genai.evaluate`, so they show in the MLflow UI's evaluation view.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd

from steps.core.config import PipelineConfig
from steps.core.errors import PipelineError
from steps.core.evaluation import (
    CandidateResult,
    EvalSet,
    answer_matches,
    comparison_chart,
    evaluate_candidate,
    genai_rows,
    load_eval_set,
    parity,
    per_item_rows,
    summarize,
    summary_markdown,
)
from steps.core.lineage import finished_run, latest_finished_run
from steps.core.provenance import PROJECT_ROOT
from steps.core.tracking import step_run

log = logging.getLogger(__name__)
WRAP_STEPS = ("wrap_transformers", "wrap_onnx")


@dataclass(frozen=True)
class Candidate:
    label: str  # "transformers", "onnx-fp32", ...
    runtime: str
    wrap_run_id: str
    model_uri: str


def _label(run) -> str:
    tags = run.data.tags
    if tags["pipeline.step"] == "wrap_transformers":
        return "transformers"
    return f"onnx-{tags.get('onnx.precision', 'unknown')}"


def find_candidates(cfg: PipelineConfig, experiment_id: str) -> list[Candidate]:
    if cfg.evaluate.wrap_run_ids:
        runs = [
            finished_run(run_id, WRAP_STEPS, "evaluate.wrap_run_ids")
            for run_id in cfg.evaluate.wrap_run_ids
        ]
    else:
        found = [latest_finished_run(cfg, experiment_id, step) for step in WRAP_STEPS]
        runs = [run for run in found if run is not None]
    candidates, seen = [], set()
    for run in runs:
        tags = run.data.tags
        label = _label(run)
        if label in seen:
            label = f"{label}-{run.info.run_id[:8]}"
        seen.add(label)
        candidates.append(
            Candidate(label, tags["model.runtime"], run.info.run_id, tags["model.uri"])
        )
    if not candidates:
        raise PipelineError(
            f"no finished wrap runs of model={cfg.model.name} compute={cfg.compute.name} in "
            f"experiment {experiment_id}: run wrap_transformers and wrap_onnx first, or set "
            "evaluate.wrap_run_ids"
        )
    return candidates


def dataset_path(cfg: PipelineConfig) -> Path:
    path = Path(cfg.evaluate.dataset)
    return path if path.is_absolute() else PROJECT_ROOT / path


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


def main(cfg: PipelineConfig) -> None:
    with step_run("evaluate", cfg) as run:
        eval_set = load_eval_set(dataset_path(cfg), cfg.evaluate.max_items)
        candidates = find_candidates(cfg, run.info.experiment_id)
        log_dataset(eval_set)
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
        metrics = {
            f"{label}.{key}": value
            for label, summary in summaries.items()
            for key, value in summary.items()
        }
        if len(results) > 1:
            metrics["parity"] = parity(results)
        mlflow.log_metrics(metrics)
        mlflow.log_table(pd.DataFrame(per_item_rows(eval_set, results)), "eval/items.json")
        summary_frame = pd.DataFrame(summaries).T.rename_axis("model").reset_index()
        mlflow.log_table(summary_frame, "eval/summary.json")
        mlflow.log_text(summary_markdown(summaries), "eval/summary.md")
        mlflow.log_dict(
            [c.__dict__ | {"summary": summaries[c.label]} for c in candidates],
            "eval/candidates.json",
        )
        with tempfile.TemporaryDirectory() as scratch:
            chart = Path(scratch) / "comparison.png"
            comparison_chart(summaries, chart)
            mlflow.log_artifact(str(chart), "eval")
        for candidate, result in zip(candidates, results, strict=True):
            log_genai_evaluation(eval_set, result, candidate.model_uri)
        log.info("evaluation summary:\n%s", summary_markdown(summaries))
        log.info("candidates: %s", json.dumps({c.label: c.model_uri for c in candidates}))
