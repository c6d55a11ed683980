"""What an evaluate run records besides its metrics and artifacts: the evaluation set and the
fidelity text as its dataset inputs, and one nested run per candidate that logs the candidate's
headline metrics on its LoggedModel, each with the dataset it was measured on, and its answers
as a table.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.data.dataset import Dataset
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST, ErrorCode

from steps.evaluation.evalset import EvalSet
from steps.evaluation.fidelity import FidelityText
from steps.evaluation.report import CANDIDATE_ANSWERS, MODEL_LIST_METRICS
from steps.tracking.models import LoggedChatModel
from steps.tracking.pages import link_models


def log_datasets(eval_set: EvalSet, text: FidelityText) -> tuple[Dataset, Dataset]:
    """The evaluation set and the fidelity text as the run's inputs, returned so that metrics
    can name the one they were measured on."""
    frame = pd.DataFrame(
        [{"id": i.id, "question": i.question, "reference": i.reference} for i in eval_set.items]
    )
    questions = mlflow.data.from_pandas(frame, source=str(eval_set.path), name=eval_set.name)
    _log_input(questions, context="evaluation")
    documents = mlflow.data.from_pandas(
        pd.DataFrame([{"id": d.id, "kind": d.kind, "sha256": text.sha256} for d in text.documents]),
        source=str(text.path),
        name=text.name,
    )
    _log_input(documents, context="fidelity")
    mlflow.set_tags(
        {
            "evaluate.dataset": eval_set.name,
            "evaluate.dataset_sha256": eval_set.sha256,
            "evaluate.fidelity_text": text.name,
            "evaluate.fidelity_text_sha256": text.sha256,
        }
    )
    return questions, documents


def _log_input(dataset: Dataset, context: str) -> None:
    """`mlflow.log_input`, minding pipelines that log one dataset for the first time at once: the
    tracking store looks a dataset up, then inserts it when missing, so the later of two such
    transactions fails on the datasets table's key (SQLite and PostgreSQL alike). By then the
    earlier one has committed the row, so logging again finds it instead."""
    try:
        mlflow.log_input(dataset, context=context)
    except MlflowException as error:
        lost_race = error.error_code == ErrorCode.Name(BAD_REQUEST) and (
            "INSERT INTO datasets" in error.message
        )
        if not lost_race:
            raise
        mlflow.log_input(dataset, context=context)


def log_candidate(
    candidate: LoggedChatModel, summary: dict[str, float], fidelity_keys: frozenset[str],
    answer_rows: list[dict[str, Any]] | None, datasets: tuple[Dataset, Dataset], name: str,
) -> None:  # fmt: skip
    """The candidate's headline metrics on its own LoggedModel, each with the dataset it was
    measured on (so MLflow's model list compares the builds side by side, grouped by dataset),
    and its answers as one table, `eval/answers.json` (the experiment's Evaluation view puts
    the candidates' tables side by side); one nested run per model keeps the unprefixed metrics
    apart. One table upload instead of a trace per item: the per-item logging of
    `mlflow.genai.evaluate` cost more than the asking against a remote server."""
    questions, documents = datasets
    # Nested runs go to the process's current experiment unless told (the evaluate run's own
    # experiment may be another: tracking.experiment).
    parent = mlflow.active_run().info.experiment_id
    with mlflow.start_run(run_name=name, nested=True, experiment_id=parent) as child:
        mlflow.set_tags({"pipeline.step": "evaluate.candidate", "model.label": candidate.label})
        link_models(child.info.run_id, [candidate.model_id])
        shown = {key: summary[key] for key in MODEL_LIST_METRICS if key in summary}
        on_text = {k: v for k, v in shown.items() if k in fidelity_keys}
        on_questions = {k: v for k, v in shown.items() if k not in on_text}
        if on_questions:
            mlflow.log_metrics(on_questions, model_id=candidate.model_id, dataset=questions)
        mlflow.log_metrics(on_text, model_id=candidate.model_id, dataset=documents)
        if answer_rows is not None:
            mlflow.log_table(pd.DataFrame(answer_rows), CANDIDATE_ANSWERS)
