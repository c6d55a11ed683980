"""Entry point `evaluate`: every candidate side by side, on task accuracy, speed and fidelity to
a reference.

Candidates are wrap runs: by default the latest finished wrap_transformers run and, for each
`compute.onnx_candidates` build, the latest finished wrap_onnx run of that build, of this model
variant and compute target; or any list in `evaluate.wrap_run_ids`. The reference
(`evaluate.reference`, default the transformers model) is one of them. Every candidate is first
scored teacher-forced against the reference on the fidelity text (steps.evaluation.fidelity);
then the reference and, with `evaluate.ask=contenders`, only the candidates that pass the
fidelity gate are asked the evaluation set through `mlflow.pyfunc.load_model`
(steps.evaluation.measure), a twin of the reference (same distribution) taking the faster
twin's answers past the timed items (steps.evaluation.selection.plan_asking).

Run artifacts: `eval/items.json` (per item: question, each model's answer, correct or not,
latency), `eval/summary.json` and `eval/summary.md` (per model, with the register policy's
verdict), `eval/comparison.png`, `eval/speed_vs_fidelity.png`, `eval/candidates.json` (what
register reads), `config.yaml`. The evaluation set and the fidelity text are the run's dataset
inputs; tag `evaluate.reference` names the reference. Metrics, per candidate label
(`transformers-fp32`, `onnx-int4-k_quant_last`, ...): `<label>.accuracy` with
`.accuracy_ci_low`/`_high` (95% Wilson), `.flips_lost`, `.flips_gained`, `.mcnemar_p` (against
the reference), `.kld_mean`, `.kld_p99`, `.kld_max`, `.top1_agreement` (with its interval),
`.ppl`, `.ppl_ratio`, `.delta_p_rms`, `.latency_p50_s`, `.latency_p95_s`, `.ttft_mean_s`,
`.tokens_per_s`, `.peak_rss_mb`, `.items_asked`, `.items_shared`, `.seconds.<phase>`, ...;
`parity` (share of items where all models asked gave the same answer), and the step's
`seconds.loading`, `.fidelity`, `.asking`, `.logging` and `.total`.

In MLflow's UI: the candidates are the run's model inputs; each has a nested run
(`evaluate <variant> <label> <compute>`) that logs its headline metrics on its LoggedModel,
with the dataset each was measured on (report.MODEL_LIST_METRICS: the experiment's model list
compares the builds on them), and its answers as a table (`eval/answers.json`). The
run's description says which build fastest_faithful chooses and why, with every candidate's
row, the speed-against-fidelity chart and links to the runs and models it evaluated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient

from steps.config import plan
from steps.config.compose import project_path
from steps.config.schema import PipelineConfig
from steps.errors import PipelineError
from steps.evaluation.asking import answered_by, ask_candidates
from steps.evaluation.evalset import EvalSet, load_eval_set
from steps.evaluation.fidelity import FidelityText, load_fidelity_text, score_models
from steps.evaluation.measure import CandidateResult, model_folder
from steps.evaluation.report import (
    COMPARISON_CHART,
    SPEED_CHART,
    answer_summary,
    candidate_rows,
    comparison_chart,
    flips,
    parity,
    per_item_rows,
    speed_fidelity_chart,
    summary_markdown,
)
from steps.evaluation.selection import Selection, fastest_faithful, plan_asking
from steps.tracking.evaluation_runs import log_candidate, log_datasets
from steps.tracking.lineage import find_candidates
from steps.tracking.models import CANDIDATES_FILE, EvaluatedModel, LoggedChatModel
from steps.tracking.pages import EvaluatedSets, evaluation_page, link_models, set_note
from steps.tracking.runs import step_run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateResult:
    eval_set: EvalSet
    fidelity_text: FidelityText
    reference: str  # the label of the candidate the others are compared with
    candidates: list[LoggedChatModel]
    results: list[CandidateResult]  # per candidate asked the evaluation set, in asking order
    summaries: dict[str, dict[str, float]]  # label -> summary, in candidate order
    selection: Selection  # what register's fastest_faithful policy would choose
    fidelity_keys: frozenset[str]  # the summaries' keys measured on the fidelity text
    answers: dict[str, str] = dataclasses.field(default_factory=dict)  # label -> who answered
    phases: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds.<phase>

    @property
    def metrics(self) -> dict[str, float]:
        metrics = {
            f"{label}.{key}": value
            for label, summary in self.summaries.items()
            for key, value in summary.items()
        }
        if len(self.results) > 1:
            metrics["parity"] = parity(self.results)
        return metrics | self.phases

    @property
    def evaluated(self) -> list[EvaluatedModel]:
        return [
            EvaluatedModel(
                c, self.summaries[c.label], self.selection.verdicts[c.label],
                self.answers.get(c.label, ""),
            )
            for c in self.candidates
        ]  # fmt: skip

    def item_rows(self) -> list[dict[str, Any]]:
        return per_item_rows(self.eval_set, self.results)


def reference_of(cfg: PipelineConfig, candidates: list[LoggedChatModel]) -> LoggedChatModel:
    wanted = plan.reference_label(cfg)
    for candidate in candidates:
        if candidate.label == wanted:
            return candidate
    raise PipelineError(
        f"evaluate.reference={wanted} is not among the candidates "
        f"({', '.join(c.label for c in candidates)}): wrap it, or name one of those"
    )


def run(cfg: PipelineConfig, candidates: list[LoggedChatModel]) -> EvaluateResult:
    """Score every candidate against the reference on the fidelity text, then ask the
    evaluation set of those that can still be chosen, and summarize; needs the store that holds
    the models, not an open run."""
    eval_set = load_eval_set(project_path(cfg.evaluate.dataset), cfg.evaluate.max_items)
    text = load_fidelity_text(project_path(cfg.evaluate.fidelity.text))
    reference = reference_of(cfg, candidates)
    log.info(
        "evaluating %s on %s (%d items), against %s",
        ", ".join(c.label for c in candidates), eval_set.name, len(eval_set.items),
        reference.label,
    )  # fmt: skip
    with contextlib.ExitStack() as stack:
        # Each model's files once (a download from a server), for the fidelity pass and asking.
        folders, copying = {}, {}
        for c in candidates:
            started = time.perf_counter()
            folders[c.label] = stack.enter_context(model_folder(c.model_uri))
            copying[c.label] = time.perf_counter() - started
        # Fidelity first: it is cheap, it checks the text against the tokenizer before minutes
        # of asking, and it decides who is worth asking.
        started = time.perf_counter()
        runtimes = {c.label: (c.runtime.value, folders[c.label]) for c in candidates}
        scores, fidelity_loading = score_models(
            text, reference.label, runtimes, cfg.evaluate.fidelity.window,
            cfg.evaluate.fidelity.scored_tokens,
        )  # fmt: skip
        fidelity_wall = time.perf_counter() - started
        asking = plan_asking(scores, reference.label, cfg.evaluate, cfg.register)
        for label, why in asking.not_asked.items():
            log.info("%s: %s", label, why)
        started = time.perf_counter()
        results = ask_candidates(cfg.evaluate, eval_set, folders, asking)
        asking_wall = time.perf_counter() - started
    summaries = {}
    for c in candidates:
        loading = copying[c.label] + fidelity_loading[c.label]
        if c.label in results:
            asked = results[c.label]
            summaries[c.label] = (
                answer_summary(asked) | flips(results[reference.label], asked) | scores[c.label]
                | {"seconds.loading": loading + asked.load_seconds}
            )  # fmt: skip
        else:
            summaries[c.label] = scores[c.label] | {"items_asked": 0.0, "seconds.loading": loading}
    selection = fastest_faithful(summaries, reference.label, cfg.register)
    log.info("evaluation summary:\n%s", summary_markdown(summaries, selection))
    fidelity_keys = frozenset(key for score in scores.values() for key in score)
    answers = {
        c.label: answered_by(c.label, asking, results, scores, reference.label) for c in candidates
    }
    # Disjoint phases: the fidelity and asking walls without the loading they include.
    asking_loading = sum(result.load_seconds for result in results.values())
    loading_total = sum(copying.values()) + sum(fidelity_loading.values()) + asking_loading
    phases = {
        "seconds.loading": loading_total,
        "seconds.fidelity": fidelity_wall - sum(fidelity_loading.values()),
        "seconds.asking": asking_wall - asking_loading,
    }
    return EvaluateResult(
        eval_set, text, reference.label, candidates, list(results.values()), summaries,
        selection, fidelity_keys, answers, phases,
    )  # fmt: skip


def log_charts(result: EvaluateResult) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        speed, comparison = (
            Path(scratch) / Path(chart).name for chart in (SPEED_CHART, COMPARISON_CHART)
        )
        speed_fidelity_chart(result.summaries, result.selection, speed)
        comparison_chart(result.summaries, comparison)
        for chart in (speed, comparison):
            mlflow.log_artifact(str(chart), "eval")


def log_result(cfg: PipelineConfig, result: EvaluateResult, run_id: str) -> None:
    datasets = log_datasets(result.eval_set, result.fidelity_text)
    mlflow.set_tag("evaluate.reference", result.reference)
    mlflow.log_metrics(result.metrics)
    mlflow.log_table(pd.DataFrame(result.item_rows()), "eval/items.json")
    summary_frame = pd.DataFrame(result.summaries).T.rename_axis("model").reset_index()
    summary_frame["verdict"] = summary_frame["model"].map(result.selection.verdicts)
    mlflow.log_table(summary_frame, "eval/summary.json")
    mlflow.log_text(summary_markdown(result.summaries, result.selection), "eval/summary.md")
    mlflow.log_dict([e.to_dict() for e in result.evaluated], CANDIDATES_FILE)
    log_charts(result)
    client = MlflowClient()
    models = {c.label: client.get_logged_model(c.model_id) for c in result.candidates}
    link_models(run_id, [m.model_id for m in models.values()])
    measured = {r.label: r for r in result.results}
    logging_seconds = {}
    for candidate in result.candidates:
        started = time.perf_counter()
        answered = measured.get(candidate.label)
        log_candidate(
            candidate, result.summaries[candidate.label], result.fidelity_keys,
            candidate_rows(result.eval_set, answered) if answered else None, datasets,
            plan.run_name("evaluate", cfg, candidate.label),
        )  # fmt: skip
        logging_seconds[f"{candidate.label}.seconds.logging"] = time.perf_counter() - started
    measured_on = EvaluatedSets(
        result.eval_set.name, len(result.eval_set.items), result.fidelity_text.name
    )
    page = evaluation_page(
        cfg, result.evaluated, result.reference, result.selection.chosen, measured_on, models,
        run_id,
    )  # fmt: skip
    set_note(run_id, page)
    mlflow.log_metrics(logging_seconds)


def main(cfg: PipelineConfig) -> EvaluateResult:
    with step_run("evaluate", cfg) as active:
        started = time.perf_counter()
        result = run(cfg, find_candidates(cfg, active.info.experiment_id))
        measured = time.perf_counter()
        log_result(cfg, result, active.info.run_id)
        finished = time.perf_counter()
        mlflow.log_metrics(
            {"seconds.logging": finished - measured, "seconds.total": finished - started}
        )
        log.info(
            "evaluate took %.1f s: %s, logging %.1f s", finished - started,
            ", ".join(f"{k.removeprefix('seconds.')} {v:.1f} s" for k, v in result.phases.items()),
            finished - measured,
        )  # fmt: skip
        return result
