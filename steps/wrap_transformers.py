"""Entry point `wrap_transformers`: the fetched snapshot as an MLflow transformers chat model.

Builds a transformers `text-generation` pipeline on the compute target's device and dtype and
logs it with `mlflow.transformers.log_model(task="llm/v1/chat")`, so it answers OpenAI-style
chat requests. Generation defaults come from the `generation` config group (greedy by default:
the flavor samples unless told otherwise).

Run artifacts: the logged model (a LoggedModel, `models:/m-<id>`, named
`<variant>-transformers-<precision>-<target>`), `config.yaml`.
Tags: those of steps.tracking.models (`model.runtime` transformers, `model.precision` from
compute.torch_dtype, `model.label`, `model.uri`, `model.key`, `fetch.run_id`, ...). Metric:
`wrap_seconds`.
"""

from __future__ import annotations

import logging
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow

from steps.config import plan
from steps.config.schema import (
    ComputeConfig,
    GenerationConfig,
    PipelineConfig,
    Runtime,
    SourceKind,
)
from steps.errors import PipelineError
from steps.serving.chat import CHAT_EXAMPLE
from steps.sources.snapshots import FetchOutcome
from steps.tracking.lineage import FetchedSnapshot, fetched_snapshot
from steps.tracking.models import WrapResult, log_wrap_result, model_to_log
from steps.tracking.runs import model_key, step_run

log = logging.getLogger(__name__)

RUNTIME = Runtime.transformers


def serving_requirements() -> list[str]:
    """What loading the model needs, pinned to what built it (the flavor's own inference adds
    torchvision, which breaks beside the CPU torch wheel)."""
    return [
        f"{name}=={version(name)}" for name in ("mlflow", "transformers", "torch", "accelerate")
    ]


def generation_defaults(generation: GenerationConfig) -> dict[str, Any]:
    """The flavor's `model_config`: defaults for every request, and the batch size the
    pipeline generates the rows of one predict call in."""
    defaults: dict[str, Any] = {
        "max_new_tokens": generation.max_new_tokens,
        "do_sample": generation.do_sample,
        "batch_size": generation.batch_size,
    }
    if generation.do_sample:
        defaults |= {"temperature": generation.temperature, "top_p": generation.top_p}
    return defaults


def check_device(compute: ComputeConfig) -> None:
    """Fail before loading anything when the target's torch device is not on this machine."""
    import torch

    if compute.torch_device.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(
            f"compute={compute.name} needs a CUDA GPU and a CUDA build of torch; this machine "
            f"has none (torch {torch.__version__}): use -P compute=cpu"
        )


def build_pipeline(model_dir: Path, compute: ComputeConfig, hub_repo_id: str | None = None):
    """The text-generation pipeline of a model folder on the compute target's device and
    dtype; with `hub_repo_id`, named after that Hub repo so that MLflow logs a reference to it."""
    import torch
    from transformers import pipeline

    chat = pipeline(
        "text-generation",
        model=str(model_dir),
        device=compute.torch_device,
        dtype=getattr(torch, compute.torch_dtype.value),
    )
    if hub_repo_id:
        # Reference mode: MLflow records the Hub repo named here instead of copying weights.
        chat.model.name_or_path = hub_repo_id
        chat.tokenizer.name_or_path = hub_repo_id
    return chat


def check_reference_is_reproducible(snapshot: FetchOutcome) -> None:
    """MLflow's reference mode records the repo's *current* head commit, not ours: refuse when
    they differ, since the logged model would then load other weights."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    repo = snapshot.manifest.source["repo_id"]
    pinned = snapshot.manifest.source["resolved_revision"]
    try:
        head = HfApi().model_info(repo).sha
    except (HfHubHTTPError, OSError, httpx2.HTTPError) as error:
        raise PipelineError(
            f"wrap.save_pretrained=false needs the Hub to record a reference to {repo}, and it "
            f"could not be reached ({type(error).__name__}); use wrap.save_pretrained=true"
        ) from None
    if head != pinned:
        raise PipelineError(
            f"wrap.save_pretrained=false: MLflow would record {repo} at its current head {head}, "
            f"but the fetched snapshot is {pinned}; the model would load other weights. Use "
            "wrap.save_pretrained=true, or pin model.source.revision to the head"
        )


def log_chat_model(chat, cfg: PipelineConfig, name: str, tags: dict[str, str]):
    return mlflow.transformers.log_model(
        transformers_model=chat,
        name=name,
        task="llm/v1/chat",
        model_config=generation_defaults(cfg.generation),
        pip_requirements=serving_requirements(),
        input_example=CHAT_EXAMPLE,
        save_pretrained=cfg.wrap.save_pretrained,
        tags=tags,
    )


def run(cfg: PipelineConfig, fetched: FetchedSnapshot) -> WrapResult:
    """Build the text-generation pipeline of a fetched snapshot and log it as a chat model into
    the current experiment (and the active run, if one is open)."""
    started = time.monotonic()
    snapshot = fetched.snapshot
    reference = not cfg.wrap.save_pretrained and cfg.model.source.kind is SourceKind.hub
    if reference:
        check_reference_is_reproducible(snapshot)
    chat = build_pipeline(
        snapshot.model_dir, cfg.compute, cfg.model.source.repo_id if reference else None
    )
    model = model_to_log(
        cfg, RUNTIME, plan.transformers_precision(cfg), fetched.run_id,
        snapshot.manifest.snapshot_id,
    )  # fmt: skip
    log.info("logging the %s chat model %s to the tracking server", RUNTIME.value, model.name)
    info = log_chat_model(chat, cfg, model.name, model.tags)
    log.info("logged %s chat model %s (%s)", RUNTIME.value, info.model_uri, model.name)
    return model.logged(info.model_uri, info.run_id, {"wrap_seconds": time.monotonic() - started})


def main(cfg: PipelineConfig) -> WrapResult:
    with step_run("wrap_transformers", cfg) as active:
        check_device(cfg.compute)
        result = run(cfg, fetched_snapshot(cfg, active.info.experiment_id))
        log_wrap_result(result, model_key(cfg, result.tags))
        return result
