"""What a config will run: the one answer, computed from the validated config alone (no MLflow).

For `main`: the steps in pipeline order (one wrap_onnx per ONNX build, and where the prebuilt
export is a candidate its own fetch and wrap_onnx), which of them run together, and the
settings that hand each step the run ids of the steps before it. For every step: the models
the pipeline makes and how evaluation labels them, the reference, the one ONNX model a
wrap_onnx run makes and where it comes from, and the names runs get. `main`, the wrap steps,
evaluate, the run names, the launcher and the tests all ask this module instead of deciding
again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from steps.config.onnx_builds import OnnxBuildSpec, parse_build_spec
from steps.config.schema import (
    STEP_ORDER,
    WRAP_STEPS,
    FetchArtifact,
    OnnxSource,
    PipelineConfig,
    Runtime,
    model_label,
)
from steps.errors import PipelineError

# Every MLproject entry point that runs a step of the pipeline, and main, which runs them all.
ENTRY_POINTS = (*STEP_ORDER, "main")


@dataclass(frozen=True)
class PlannedModel:
    """A model the pipeline makes: a candidate of evaluate, named by its label."""

    runtime: Runtime
    precision: str  # fp32, int8, int4-k_quant_last, or the prebuilt export's folder name

    @property
    def label(self) -> str:
        return model_label(self.runtime, self.precision)


def onnx_source(cfg: PipelineConfig) -> OnnxSource:
    """wrap.onnx_source with auto decided: the prebuilt export where the variant has one for the
    compute target, else a build."""
    if cfg.wrap.onnx_source is not OnnxSource.auto:
        return cfg.wrap.onnx_source
    has_prebuilt = cfg.compute.target in cfg.model.prebuilt_onnx
    return OnnxSource.prebuilt if has_prebuilt else OnnxSource.build


def prebuilt_precision(cfg: PipelineConfig) -> str:
    """The prebuilt export's precision, as its folder names it."""
    return cfg.model.prebuilt_onnx[cfg.compute.target].subfolder.rstrip("/").split("/")[-1]


def transformers_precision(cfg: PipelineConfig) -> str:
    return cfg.compute.torch_dtype.precision


def onnx_builds(cfg: PipelineConfig) -> list[OnnxBuildSpec]:
    """The ONNX builds `main` makes: every compute.onnx_candidates entry, parsed (none where the
    ONNX model is only the prebuilt export)."""
    if onnx_source(cfg) not in (OnnxSource.build, OnnxSource.both):
        return []
    return [parse_build_spec(s, "compute.onnx_candidates") for s in cfg.compute.onnx_candidates]


def uses_prebuilt_onnx(cfg: PipelineConfig) -> bool:
    """Whether the ONNX candidates include the variant's prebuilt export."""
    return onnx_source(cfg) in (OnnxSource.prebuilt, OnnxSource.both)


def planned_models(cfg: PipelineConfig) -> list[PlannedModel]:
    """The models `main` makes: the transformers model, then one per ONNX build, then the
    prebuilt export."""
    planned = [PlannedModel(Runtime.transformers, transformers_precision(cfg))]
    planned += [PlannedModel(Runtime.onnx, build.name) for build in onnx_builds(cfg)]
    if uses_prebuilt_onnx(cfg):
        planned.append(PlannedModel(Runtime.onnx, prebuilt_precision(cfg)))
    return planned


def reference_label(cfg: PipelineConfig) -> str:
    """The candidate the others are compared with: evaluate.reference, else the transformers
    model."""
    return cfg.evaluate.reference or planned_models(cfg)[0].label


def check(cfg: PipelineConfig) -> None:
    """What the schemas cannot check alone because it needs the plan: an evaluate.reference
    that the pipeline would make (when evaluate finds its candidates itself)."""
    if cfg.evaluate.reference and not cfg.evaluate.wrap_run_ids:
        labels = [model.label for model in planned_models(cfg)]
        if cfg.evaluate.reference not in labels:
            raise ValueError(
                f"evaluate.reference={cfg.evaluate.reference} is not among the candidates "
                f"of model={cfg.model.name} compute={cfg.compute.label}: {', '.join(labels)}"
            )


def wrap_onnx_source(cfg: PipelineConfig) -> OnnxSource:
    """Where a wrap_onnx run's one ONNX model comes from: a build, or the prebuilt export."""
    source = onnx_source(cfg)
    if source is OnnxSource.both:
        raise PipelineError(
            "wrap.onnx_source=both is for main (the builds and the prebuilt export side by "
            "side); a wrap_onnx run makes one model: use wrap.onnx_source=build or prebuilt"
        )
    return source


def wrap_onnx_build(cfg: PipelineConfig) -> OnnxBuildSpec:
    """The build a wrap_onnx run makes: wrap.onnx_build, else compute.onnx_precision with
    wrap.onnx_builder_options."""
    if cfg.wrap.onnx_build is not None:
        return parse_build_spec(cfg.wrap.onnx_build, "wrap.onnx_build")
    return OnnxBuildSpec(cfg.compute.onnx_precision.value, dict(cfg.wrap.onnx_builder_options))


def wrap_onnx_precision(cfg: PipelineConfig) -> str:
    """The precision of the model a wrap_onnx run makes, as its label and run name show it."""
    if wrap_onnx_source(cfg) is OnnxSource.prebuilt:
        return prebuilt_precision(cfg)
    return wrap_onnx_build(cfg).name


def wrap_onnx_fetch(cfg: PipelineConfig) -> FetchArtifact:
    """What a wrap_onnx run builds on: the prebuilt export's fetch, or the weights' fetch."""
    if wrap_onnx_source(cfg) is OnnxSource.prebuilt:
        return FetchArtifact.prebuilt_onnx
    return FetchArtifact.weights


def run_name(step: str, cfg: PipelineConfig, detail: str | None = None) -> str:
    """The step and the choices that tell its runs apart (`evaluate smollm2-135m cpu`,
    `wrap_onnx smollm2-135m int4-k_quant_last cpu`), so that run lists and breadcrumbs read
    without opening a run; `detail` names what a nested run is about (a candidate's label)."""
    choices: list[str] = [detail] if detail else []
    if step == "fetch" and cfg.fetch.artifact is not FetchArtifact.weights:
        choices.append(cfg.fetch.artifact.value)
    elif step == "wrap_transformers":
        choices.append(transformers_precision(cfg))
    elif step == "wrap_onnx" and onnx_source(cfg) is not OnnxSource.both:
        choices.append(wrap_onnx_precision(cfg))
    return " ".join([step, cfg.model.name, *choices, cfg.compute.name])


@dataclass(frozen=True)
class Step:
    """One child run of the pipeline: an entry point, and what it makes: a fetch its artifact,
    a wrap_onnx its build (None: the prebuilt export)."""

    name: str  # as the parent's tags name it: fetch, fetch_onnx, wrap_onnx.int8, ...
    entry: str  # the MLproject entry point
    # Left out of equality and hashing (its options are a dict); the name already says it.
    build: OnnxBuildSpec | None = field(default=None, compare=False)
    fetches: FetchArtifact | None = None


def pipeline_steps(cfg: PipelineConfig) -> list[Step]:
    """main.steps in pipeline order: one wrap_onnx per ONNX build, and where the export is a
    candidate (wrap.onnx_source prebuilt or both) its fetch and its wrap_onnx."""
    steps: list[Step] = []
    for entry in (s for s in STEP_ORDER if s in cfg.main.steps):
        if entry == "fetch":
            steps.append(Step(entry, entry, fetches=FetchArtifact.weights))
        elif entry == "wrap_onnx":
            steps += [Step(f"{entry}.{b.name}", entry, b) for b in onnx_builds(cfg)]
            if uses_prebuilt_onnx(cfg):
                # Before every wrap, so that the wraps stay side by side when they run together.
                first_wrap = next(
                    (i for i, s in enumerate(steps) if s.entry in WRAP_STEPS), len(steps)
                )
                steps.insert(
                    first_wrap, Step("fetch_onnx", "fetch", fetches=FetchArtifact.prebuilt_onnx)
                )
                steps.append(Step(entry, entry))
        else:
            steps.append(Step(entry, entry))
    return steps


def step_batches(steps: list[Step], parallel: bool) -> list[list[Step]]:
    """The steps in order, grouped into what runs at the same time: with `parallel`, the wraps
    (they need only the fetches)."""
    batches: list[list[Step]] = []
    for step in steps:
        if parallel and step.entry in WRAP_STEPS and batches and batches[-1][0].entry in WRAP_STEPS:
            batches[-1].append(step)
        else:
            batches.append([step])
    return batches


def _fetch_run(upstream: Mapping[Step, str], artifact: FetchArtifact) -> str | None:
    return next((run for s, run in upstream.items() if s.fetches is artifact), None)


def upstream_settings(step: Step, upstream: Mapping[Step, str]) -> dict[str, str | list[str]]:
    """The config keys that hand a step what it builds on: the run ids of this pipeline run's
    earlier steps, and for a fetch its artifact, for a wrap_onnx its source and build."""
    settings: dict[str, str | list[str]] = {}
    if step.fetches is FetchArtifact.prebuilt_onnx:
        settings["fetch.artifact"] = step.fetches.value
    elif step.entry in WRAP_STEPS:
        # Each wrap_onnx run makes one model: a build of the weights, or the prebuilt export.
        prebuilt = step.entry == "wrap_onnx" and step.build is None
        fetched = _fetch_run(
            upstream, FetchArtifact.prebuilt_onnx if prebuilt else FetchArtifact.weights
        )
        if fetched:
            settings["wrap.fetch_run_id"] = fetched
        if step.entry == "wrap_onnx":
            source = OnnxSource.prebuilt if prebuilt else OnnxSource.build
            settings["wrap.onnx_source"] = source.value
            if step.build is not None:
                settings["wrap.onnx_build"] = step.build.spec
    elif step.entry == "evaluate":
        wraps = [run for s, run in upstream.items() if s.entry in WRAP_STEPS]
        if wraps:
            settings["evaluate.wrap_run_ids"] = wraps
    elif step.entry == "register":
        evaluated = next((run for s, run in upstream.items() if s.entry == "evaluate"), None)
        if evaluated:
            settings["register.evaluate_run_id"] = evaluated
    return settings


def as_overrides(settings: Mapping[str, str | list[str]]) -> list[str]:
    """Hydra override strings; values quoted so a run id never parses as a number."""

    def quoted(value: str) -> str:
        return "'" + value + "'"

    return [
        f"{key}=[{','.join(map(quoted, value))}]"
        if isinstance(value, list)
        else f"{key}={quoted(value)}"
        for key, value in settings.items()
    ]
