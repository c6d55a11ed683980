"""What the MLflow UI shows on a run's page besides its metrics: its description (MLflow's run
note, Markdown) with links to the runs, models and versions it names, and the logged models the
run used or made.

Links are relative to the UI's own page (`#/runs/<id>` is the UI's route to any run), so they
work under `mlflow ui`, a team's server and a server behind a path prefix alike. Images in a
note are the run's own artifacts, served by the UI's `get-artifact` endpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import quote

from mlflow import MlflowClient
from mlflow.entities import LoggedModel, LoggedModelInput, LoggedModelOutput
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

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
