"""Entry point `wrap_onnx`: an onnxruntime-genai chat model, logged as a custom MLflow pyfunc.

Gets an ONNX model folder, either built from the fetched snapshot with
`onnxruntime_genai.models.builder` (compute target's precision and execution provider,
`wrap.onnx_builder_options`; cached by its inputs) or the variant's prebuilt export for the
compute target (`wrap.onnx_source`). Logs it with `steps/core/onnx_chat_model.py` as a
models-from-code pyfunc that serves the same chat schema as wrap_transformers.

Run artifacts: the logged model `model`, `onnx_manifest.json` (every file of the ONNX folder
with its sha256, and the build inputs), `config.yaml`. Tags: `fetch.run_id`,
`fetch.snapshot_id`, `onnx.source`, `onnx.cache`, `model.uri`, `model.runtime`. Metrics:
`onnx_build_seconds`, `onnx_model_bytes`, `wrap_seconds`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import mlflow
from mlflow.models import ModelSignature
from mlflow.types.llm import CHAT_MODEL_INPUT_SCHEMA, CHAT_MODEL_OUTPUT_SCHEMA
from mlflow.types.schema import ColSpec, DataType, Schema

from steps.core.config import (
    ComputeConfig,
    FetchArtifact,
    OnnxProvider,
    OnnxSource,
    PipelineConfig,
)
from steps.core.errors import PipelineError
from steps.core.lineage import fetched_snapshot
from steps.core.manifest import Manifest
from steps.core.onnx_build import build_inputs, build_onnx
from steps.core.snapshot_store import SnapshotStore
from steps.core.tracking import step_run
from steps.wrap_transformers import CHAT_EXAMPLE

log = logging.getLogger(__name__)

RUNTIME = "onnxruntime-genai"
MODEL_CODE = Path(__file__).resolve().parent / "core" / "onnx_chat_model.py"
GENAI_PACKAGE = {
    OnnxProvider.cpu: "onnxruntime-genai",
    OnnxProvider.cuda: "onnxruntime-genai-cuda",
    OnnxProvider.dml: "onnxruntime-genai-directml",
}


def chat_signature() -> ModelSignature:
    """MLflow's llm/v1/chat signature (what the transformers flavor logs), with `messages`
    optional and a legacy `prompt` column, so one model serves both forms."""
    columns = [
        ColSpec(c.type, c.name, required=False) if c.name == "messages" else c
        for c in CHAT_MODEL_INPUT_SCHEMA.inputs
    ]
    columns.append(ColSpec(DataType.string, "prompt", required=False))
    return ModelSignature(inputs=Schema(columns), outputs=CHAT_MODEL_OUTPUT_SCHEMA)


def serving_requirements(provider: OnnxProvider) -> list[str]:
    """No torch, no transformers: the model only runs onnxruntime-genai."""
    genai = f"{GENAI_PACKAGE[provider]}=={version('onnxruntime-genai')}"
    return [genai, f"mlflow=={version('mlflow')}", f"numpy=={version('numpy')}"]


def check_provider(compute: ComputeConfig) -> None:
    """Fail before any work when this machine cannot run the target's execution provider."""
    import onnxruntime_genai as og

    available = {
        OnnxProvider.cpu: True,
        OnnxProvider.cuda: og.is_cuda_available(),
        OnnxProvider.dml: og.is_dml_available(),
    }[compute.onnx_provider]
    if not available:
        raise PipelineError(
            f"compute={compute.name} runs ONNX models on the {compute.onnx_provider.value} "
            f"execution provider, which this machine does not have: it needs the "
            f"{GENAI_PACKAGE[compute.onnx_provider]} package and a matching device. "
            "Use -P compute=cpu here"
        )


def model_name(cfg: PipelineConfig, precision: str) -> str:
    return f"{cfg.model.name}-onnx-{precision}-{cfg.compute.onnx_provider.value}"


@dataclass(frozen=True)
class OnnxFolder:
    fetch_run_id: str
    snapshot_id: str  # of the fetched weights, or of the fetched prebuilt export
    path: Path
    manifest: Manifest
    source: OnnxSource  # built or prebuilt
    cache: str  # hit, miss or repaired
    seconds: float
    precision: str  # the builder's precision (and options), or the prebuilt export's folder name


def onnx_folder(cfg: PipelineConfig, experiment_id: str) -> OnnxFolder:
    source = cfg.resolved_onnx_source
    if source is OnnxSource.prebuilt:
        fetch_run_id, fetched = fetched_snapshot(cfg, experiment_id, FetchArtifact.prebuilt_onnx)
        subfolder = cfg.model.prebuilt_onnx[cfg.compute.target].subfolder
        return OnnxFolder(
            fetch_run_id, fetched.manifest.snapshot_id, fetched.model_dir, fetched.manifest,
            source, fetched.cache, fetched.seconds, Path(subfolder).name,
        )  # fmt: skip
    fetch_run_id, fetched = fetched_snapshot(cfg, experiment_id)
    inputs = build_inputs(
        fetched.manifest.snapshot_id,
        cfg.compute.onnx_precision.value,
        cfg.compute.onnx_provider.value,
        cfg.wrap.onnx_builder_options,
    )
    store = SnapshotStore.open(cfg.fetch.cache_dir)
    built = build_onnx(cfg.model.name, fetched.model_dir, inputs, store)
    # Builder options change the model: they are part of its name (int4-k_quant_last).
    label = "-".join([cfg.compute.onnx_precision.value, *inputs["extra_options"].values()])
    return OnnxFolder(
        fetch_run_id, fetched.manifest.snapshot_id, built.model_dir, built.manifest,
        source, built.cache, built.seconds, label,
    )  # fmt: skip


def link_or_copy(source: str, destination: str) -> None:
    try:
        # Linux's link() would link the symlink itself (os.link does not follow it there).
        os.link(os.path.realpath(source), destination)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, destination)


def log_onnx_chat_model(cfg: PipelineConfig, folder: Path, name: str, tags: dict[str, str]):
    # The cached folder is made of links into the store; the logged model needs real files.
    # Hard links to the store's immutable blobs are real files that cost no space.
    with tempfile.TemporaryDirectory(prefix="onnx-model-") as scratch:
        copy = Path(scratch) / "onnx_model"
        shutil.copytree(folder, copy, symlinks=False, copy_function=link_or_copy)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            artifacts={"onnx_model": str(copy)},
            model_config={
                "model_name": name,
                "provider": cfg.compute.onnx_provider.value,
                "intra_op_threads": cfg.compute.onnx_threads,
                "generation": dataclasses.asdict(cfg.generation),
            },
            signature=chat_signature(),
            input_example=CHAT_EXAMPLE,
            pip_requirements=serving_requirements(cfg.compute.onnx_provider),
            tags=tags,
        )


def main(cfg: PipelineConfig) -> None:
    with step_run("wrap_onnx", cfg) as run:
        started = time.monotonic()
        check_provider(cfg.compute)
        onnx = onnx_folder(cfg, run.info.experiment_id)
        mlflow.log_text(onnx.manifest.to_json(), "onnx_manifest.json")
        name = model_name(cfg, onnx.precision)
        tags = {
            "fetch.run_id": onnx.fetch_run_id,
            "fetch.snapshot_id": onnx.snapshot_id,
            "onnx.source": onnx.source.value,
            "onnx.cache": onnx.cache,
            "onnx.precision": onnx.precision,
            "model.variant": cfg.model.name,
            "model.runtime": RUNTIME,
            "compute": cfg.compute.name,
        }
        info = log_onnx_chat_model(cfg, onnx.path, name, tags)
        mlflow.set_tags(tags | {"model.uri": info.model_uri})
        mlflow.log_metrics(
            {
                "onnx_build_seconds": onnx.seconds,
                "onnx_model_bytes": onnx.manifest.total_bytes,
                "wrap_seconds": time.monotonic() - started,
            }
        )
        log.info("logged %s chat model %s (%s)", RUNTIME, info.model_uri, name)
