"""The models a benchmark times: the pipeline's own steps, run into the bench's tracking store.

`bench_models` runs the pipeline's `main` with `fetch`, `wrap_transformers` and `wrap_onnx`
into `<store folder>/mlflow.db` (experiment `bench`); like any `main` run it reuses the steps
of an earlier bench run whose inputs are unchanged. `onnx_build` builds (or finds in the
pipeline's cache) any other ONNX variant of the same snapshot with the pipeline's builder.

A variant is written `precision[:option=value,...]` with the builder's `--extra_options`
names, e.g. `int4:algo_config=k_quant_last` or `int8:block_size=128`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient

from steps import main as pipeline
from steps.config import plan
from steps.config.compose import compose_config
from steps.config.onnx_builds import OnnxBuildSpec, parse_build_spec
from steps.config.schema import PipelineConfig, Runtime, SourceKind, model_label
from steps.onnx.build import build_inputs, build_onnx
from steps.store.snapshot_store import SnapshotStore
from steps.tracking.lineage import fetched_snapshot

EXPERIMENT = "bench"
DEFAULT_STORE = Path("bench/results")


@dataclass(frozen=True)
class BenchModels:
    cfg: PipelineConfig
    tracking_uri: str
    snapshot_dir: Path  # the fetched HF folder (transformers' weights, the builder's input)
    snapshot_id: str
    gguf: Path | None  # the bundled GGUF the snapshot was converted from, for llama.cpp
    transformers_uri: str  # the wrap_transformers model
    onnx_uri: str  # the wrap_onnx model (the compute target's precision)

    @property
    def onnx_variant(self) -> str:
        """The variant the wrap_onnx model was built as, in `variant` notation."""
        return plan.wrap_onnx_build(self.cfg).spec


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark takes: which model on which target, and where it writes."""
    parser.add_argument("--model", default="smollm2-135m", help="model variant (conf/model)")
    parser.add_argument("--compute", default="cpu", help="compute target (conf/compute)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_STORE, help="results and the bench's tracking store"
    )


def tracking_uri(store: Path) -> str:
    return f"sqlite:///{(store / 'mlflow.db').resolve()}"


def bench_config(model: str, compute: str, store_uri: str, *overrides: str) -> PipelineConfig:
    """The pipeline config of a step run into the bench's tracking store."""
    return compose_config(
        [
            f"model={model}",
            f"compute={compute}",
            f"tracking.uri={store_uri}",
            f"tracking.experiment={EXPERIMENT}",
            *overrides,
        ]
    )


def bench_models(model: str, compute: str, store: Path = DEFAULT_STORE) -> BenchModels:
    store.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(store)
    # One ONNX build (the compute target's precision); the scripts build any other variant.
    precision = bench_config(model, compute, uri).compute.onnx_precision.value
    # What main hands on to its child runs, so they record into the same store.
    forwarded = [
        f"tracking.uri={uri}", f"tracking.experiment={EXPERIMENT}",
        f"compute.onnx_candidates=[{precision}]",
    ]  # fmt: skip
    cfg = bench_config(
        model, compute, uri, "main.steps=[fetch,wrap_transformers,wrap_onnx]", forwarded[-1]
    )
    result = pipeline.main(cfg, forwarded)
    client = MlflowClient(uri)
    experiment_id = client.get_run(result.run_ids["fetch"]).info.experiment_id
    fetched = fetched_snapshot(cfg, experiment_id).snapshot
    steps = {
        Runtime.transformers: "wrap_transformers",
        Runtime.onnx: f"wrap_onnx.{precision}",
    }
    wraps = {
        runtime: client.get_run(result.run_ids[step]).data.tags["model.uri"]
        for runtime, step in steps.items()
    }
    gguf = None
    if cfg.model.source.kind is SourceKind.bundled:
        gguf = SnapshotStore.open(cfg.fetch.cache_dir).blob_path(cfg.model.source.sha256)
    return BenchModels(
        cfg=cfg,
        tracking_uri=uri,
        snapshot_dir=fetched.model_dir,
        snapshot_id=fetched.manifest.snapshot_id,
        gguf=gguf,
        transformers_uri=wraps[Runtime.transformers],
        onnx_uri=wraps[Runtime.onnx],
    )


def parse_variant(variant: str) -> OnnxBuildSpec:
    """A --variants entry, checked as the pipeline checks compute.onnx_candidates."""
    try:
        return parse_build_spec(variant, "--variants")
    except ValueError as error:
        raise SystemExit(str(error)) from None


def variant_label(variant: str) -> str:
    """The label the wrap_onnx step gives the same build: `onnx-int4-k_quant_last`."""
    return model_label(Runtime.onnx, parse_variant(variant).name)


def onnx_build(models: BenchModels, variant: str) -> Path:
    """The folder of an ONNX build of the bench snapshot (built once, then cached)."""
    build = parse_variant(variant)
    inputs = build_inputs(
        models.snapshot_id, build.precision, models.cfg.compute.onnx_provider.value, build.options
    )
    store = SnapshotStore.open(models.cfg.fetch.cache_dir)
    return build_onnx(models.cfg.model.name, models.snapshot_dir, inputs, store).model_dir
