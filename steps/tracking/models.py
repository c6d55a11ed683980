"""The chat models the wrap steps log, as the runs record them and later steps read them back.

A wrap run's tags are the single record of what it logged: `model.runtime` (transformers or
onnx), `model.precision`, `model.label`, `model.uri` and the fetch run it built on. evaluate
finds its candidates from those tags and register reads the evaluated candidates from
evaluate's `eval/candidates.json`; nothing parses a label back into its parts.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow.entities import Run

from steps.config.schema import PipelineConfig, Runtime, model_label
from steps.errors import PipelineError


def logged_model_id(model_uri: str) -> str | None:
    """`m-<hex>` of a logged model's `models:/m-<hex>` URI (the wrap steps log those)."""
    found = re.fullmatch(r"models:/(m-[0-9a-f]+)", model_uri)
    return found.group(1) if found else None


@dataclass(frozen=True)
class LoggedChatModel:
    runtime: Runtime
    precision: str  # fp32, int8, int4-k_quant_last, or a prebuilt export's folder name
    model_uri: str  # models:/m-<id>
    wrap_run_id: str | None  # the run that logged it (None: logged outside a run)
    label: str = ""  # <runtime>-<precision>, unless two candidates share it

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", model_label(self.runtime, self.precision))

    @property
    def model_id(self) -> str:
        found = logged_model_id(self.model_uri)
        if found is None:
            raise PipelineError(f"{self.label}: {self.model_uri} is not a logged model's URI")
        return found

    @classmethod
    def from_run(cls, run: Run) -> LoggedChatModel:
        tags = run.data.tags
        runtimes = [runtime.value for runtime in Runtime]
        if tags.get("model.runtime") not in runtimes or "model.precision" not in tags:
            raise PipelineError(
                f"wrap run {run.info.run_id} records model.runtime="
                f"{tags.get('model.runtime')!r} and no model.precision, as runs made before "
                f"runtimes were named {' or '.join(runtimes)} did: wrap the model again "
                f"(mlflow run . -e {tags.get('pipeline.step', 'wrap_onnx')})"
            )
        if logged_model_id(tags.get("model.uri", "")) is None:
            raise PipelineError(
                f"wrap run {run.info.run_id} records model.uri={tags.get('model.uri')!r}, not "
                "a logged model (models:/m-<id>): wrap the model again "
                f"(mlflow run . -e {tags.get('pipeline.step', 'wrap_onnx')})"
            )
        return cls(
            Runtime(tags["model.runtime"]), tags["model.precision"], tags["model.uri"],
            run.info.run_id,
        )  # fmt: skip


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


@dataclass(frozen=True)
class WrapResult:
    """What a wrap step logged: the model, and the tags, metrics and texts its run records."""

    model: LoggedChatModel
    tags: dict[str, str]  # the logged model's own tags plus `model.uri` and step details
    metrics: dict[str, float]
    texts: dict[str, str] = dataclasses.field(default_factory=dict)  # artifact path -> text


def log_wrap_result(result: WrapResult, key: str | None) -> None:
    """Record what a wrap step logged on its (active) run, with the model's identity
    (steps.tracking.runs.model_key) as `model.key`."""
    for path, text in result.texts.items():
        mlflow.log_text(text, path)
    mlflow.set_tags(result.tags | ({"model.key": key} if key else {}))
    mlflow.log_metrics(result.metrics)


# MLflow refuses these in a logged model's name, though not in a registered model's.
NOT_IN_MODEL_NAMES = re.compile(r"""[/:.%"']""")


def logged_model_name(variant: str, runtime: Runtime, precision: str, target: str) -> str:
    """`<variant>-<runtime>-<precision>-<compute target>` (`smollm2-135m-onnx-int8-cpu`): what a
    wrap step names the model it logs, so that the experiment's model list reads without opening
    a model; the label and the registered name (`<variant>-<runtime>-<target>`) in one. A
    character MLflow refuses there becomes `_` (`phi3_5-mini-onnx-int4-cpu`)."""
    return NOT_IN_MODEL_NAMES.sub("_", f"{variant}-{model_label(runtime, precision)}-{target}")


def model_tags(
    runtime: Runtime, precision: str, variant: str, compute: str, fetch_run_id: str,
    snapshot_id: str,
) -> dict[str, str]:  # fmt: skip
    """The tags a logged model and its wrap run carry (the run adds `model.uri`)."""
    return {
        "fetch.run_id": fetch_run_id,
        "fetch.snapshot_id": snapshot_id,
        "model.variant": variant,
        "model.runtime": runtime.value,
        "model.precision": precision,
        "model.label": model_label(runtime, precision),
        "compute": compute,
    }


@dataclass(frozen=True)
class ModelToLog:
    """What a wrap step names and tags the chat model it is about to log (model_to_log), and
    what it records once the model is logged (`logged`)."""

    runtime: Runtime
    precision: str
    name: str  # logged_model_name
    tags: dict[str, str]  # model_tags, plus the step's own

    def logged(
        self, model_uri: str, run_id: str | None, metrics: dict[str, float],
        texts: dict[str, str] | None = None,
    ) -> WrapResult:  # fmt: skip
        return WrapResult(
            model=LoggedChatModel(self.runtime, self.precision, model_uri, run_id),
            tags=self.tags | {"model.uri": model_uri},
            metrics=metrics,
            texts=texts or {},
        )


def model_to_log(
    cfg: PipelineConfig, runtime: Runtime, precision: str, fetch_run_id: str, snapshot_id: str,
    **step_tags: str,
) -> ModelToLog:  # fmt: skip
    """The name and tags of the model a wrap step of this config logs from a fetched snapshot."""
    variant, compute = cfg.model.name, cfg.compute
    return ModelToLog(
        runtime,
        precision,
        logged_model_name(variant, runtime, precision, compute.target),
        model_tags(runtime, precision, variant, compute.name, fetch_run_id, snapshot_id)
        | step_tags,
    )


@dataclass(frozen=True)
class EvaluatedModel:
    """A candidate with its evaluation summary: one entry of `eval/candidates.json`."""

    model: LoggedChatModel
    summary: dict[str, float]
    verdict: str = ""  # the fastest_faithful policy's line on it (older files have none)
    answers: str = ""  # who answered its evaluation items: itself, partly another, nobody

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.model) | {
            "summary": self.summary, "verdict": self.verdict, "answers": self.answers,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> EvaluatedModel:
        fields = {f.name for f in dataclasses.fields(LoggedChatModel)}
        model = {key: value for key, value in entry.items() if key in fields}
        model["runtime"] = Runtime(model["runtime"])
        return cls(
            LoggedChatModel(**model), dict(entry["summary"]), entry.get("verdict", ""),
            entry.get("answers", ""),
        )  # fmt: skip


# What evaluate writes and register and main read: every candidate with its summary.
CANDIDATES_FILE = "eval/candidates.json"


def evaluated_models(evaluate_run_id: str) -> list[EvaluatedModel]:
    """The candidates an evaluate run measured, as its CANDIDATES_FILE records them."""
    entries = mlflow.artifacts.load_dict(f"runs:/{evaluate_run_id}/{CANDIDATES_FILE}")
    return [EvaluatedModel.from_dict(entry) for entry in entries]
