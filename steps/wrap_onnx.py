"""Entry point `wrap_onnx`: an onnxruntime-genai chat model, logged as a custom MLflow pyfunc.

Gets an ONNX model folder, either built from the fetched snapshot with
`onnxruntime_genai.models.builder` (the build spec `wrap.onnx_build`, else
`compute.onnx_precision` with `wrap.onnx_builder_options`, on the compute target's execution
provider; cached by its inputs) or the variant's prebuilt export for the
compute target (`wrap.onnx_source`). Logs it with `steps/serving/onnx_chat_model.py` as a
models-from-code pyfunc that serves the same chat schema as wrap_transformers.

Run artifacts: the logged model (named `<variant>-onnx-<precision>-<target>`),
`onnx_manifest.json` (every file of the ONNX folder with its sha256, and the build inputs),
`config.yaml`. Tags: those of steps.tracking.models
(`model.runtime` onnx, `model.precision`, `model.label`, `model.uri`, `model.key`,
`fetch.run_id`, ...) and `onnx.source`, `onnx.cache`. Metrics: `onnx_build_seconds`,
`onnx_model_bytes`, `wrap_seconds`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import mlflow

from steps.config import plan
from steps.config.schema import (
    ComputeConfig,
    OnnxProvider,
    OnnxSource,
    PipelineConfig,
    Runtime,
)
from steps.errors import PipelineError
from steps.onnx.build import build_inputs, build_onnx, check_buildable
from steps.serving.chat import CHAT_EXAMPLE, ONNX_CODE_PATHS, chat_signature
from steps.store.snapshot_store import SnapshotStore
from steps.tracking.lineage import FetchedSnapshot, fetched_snapshot
from steps.tracking.models import WrapResult, log_wrap_result, model_to_log
from steps.tracking.runs import model_key, step_run

log = logging.getLogger(__name__)

RUNTIME = Runtime.onnx
MODEL_CODE = Path(__file__).resolve().parent / "serving" / "onnx_chat_model.py"
GENAI_PACKAGE = {
    OnnxProvider.cpu: "onnxruntime-genai",
    OnnxProvider.cuda: "onnxruntime-genai-cuda",
    OnnxProvider.dml: "onnxruntime-genai-directml",
}


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
            name=name,
            python_model=str(MODEL_CODE),
            code_paths=[str(path) for path in ONNX_CODE_PATHS],  # what MODEL_CODE imports
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


def run(cfg: PipelineConfig, fetched: FetchedSnapshot) -> WrapResult:
    """Build (or take the prebuilt) ONNX folder of a fetched snapshot and log it as a chat model
    into the current experiment (and the active run, if one is open)."""
    started = time.monotonic()
    source = plan.wrap_onnx_source(cfg)
    precision = plan.wrap_onnx_precision(cfg)
    snapshot = fetched.snapshot
    if source is OnnxSource.prebuilt:
        folder, manifest, cache, seconds = (
            snapshot.model_dir, snapshot.manifest, snapshot.cache, snapshot.seconds,
        )  # fmt: skip
    else:
        build = plan.wrap_onnx_build(cfg)
        check_buildable(snapshot.model_dir)
        inputs = build_inputs(
            snapshot.manifest.snapshot_id,
            build.precision,
            cfg.compute.onnx_provider.value,
            build.options,
        )
        built = build_onnx(
            cfg.model.name, snapshot.model_dir, inputs, SnapshotStore.open(cfg.fetch.cache_dir)
        )
        folder, manifest, cache, seconds = (
            built.model_dir, built.manifest, built.cache, built.seconds,
        )  # fmt: skip
    model = model_to_log(
        cfg, RUNTIME, precision, fetched.run_id, snapshot.manifest.snapshot_id,
        **{"onnx.source": source.value, "onnx.cache": cache},
    )  # fmt: skip
    log.info(
        "logging the %s chat model %s (%.0f MiB) to the tracking server",
        RUNTIME.value, model.name, manifest.total_bytes / 2**20,
    )  # fmt: skip
    info = log_onnx_chat_model(cfg, folder, model.name, model.tags)
    log.info("logged %s chat model %s (%s)", RUNTIME.value, info.model_uri, model.name)
    metrics = {
        "onnx_build_seconds": seconds,
        "onnx_model_bytes": manifest.total_bytes,
        "wrap_seconds": time.monotonic() - started,
    }
    return model.logged(
        info.model_uri, info.run_id, metrics, {"onnx_manifest.json": manifest.to_json()}
    )


def main(cfg: PipelineConfig) -> WrapResult:
    with step_run("wrap_onnx", cfg) as active:
        check_provider(cfg.compute)
        fetched = fetched_snapshot(cfg, active.info.experiment_id, plan.wrap_onnx_fetch(cfg))
        result = run(cfg, fetched)
        log_wrap_result(result, model_key(cfg, result.tags))
        return result
