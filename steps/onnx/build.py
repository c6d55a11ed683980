"""Build an onnxruntime-genai model folder from a fetched HF snapshot, cached by its inputs.

The builder (`python -m onnxruntime_genai.models.builder`) runs in a subprocess so its progress
shows and its memory is returned. Its output goes to a staging folder and is published into
the snapshot store under a key of (snapshot id, precision, execution provider, builder options,
onnxruntime-genai version): the same inputs again are a verified cache hit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from steps.config.onnx_builds import builder_source
from steps.errors import PipelineError
from steps.store.manifest import Manifest
from steps.store.snapshot_store import SnapshotStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OnnxBuild:
    model_dir: Path
    manifest: Manifest
    cache: str  # hit, miss or repaired
    seconds: float


def build_inputs(
    snapshot_id: str, precision: str, provider: str, options: dict[str, str]
) -> dict[str, object]:
    """What identifies a build (the cache key and the manifest's source): the snapshot,
    precision, provider, builder options and the builder's own version."""
    return {
        "snapshot_id": snapshot_id,
        "precision": precision,
        "execution_provider": provider,
        "extra_options": dict(sorted(options.items())),
        "onnxruntime_genai": version("onnxruntime-genai"),
    }


def supported_architectures() -> frozenset[str]:
    """The `architectures[0]` values the installed builder makes a model for (read from its
    source, which dispatches on them; empty if it cannot be read: then the builder checks)."""
    return frozenset(re.findall(r'architectures\[0\] == "(\w+)"', builder_source()))


def check_buildable(snapshot_dir: Path) -> None:
    """Fail in a line, before the builder loads any weights, on a checkpoint it cannot build."""
    config = snapshot_dir / "config.json"
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError) as error:
        raise PipelineError(f"{config} cannot be read as a model config ({error})") from None
    known = supported_architectures()
    if not architectures or (known and architectures[0] not in known):
        named = architectures[0] if architectures else "no architecture"
        raise PipelineError(
            f"{config} names {named}, which the onnxruntime-genai "
            f"{version('onnxruntime-genai')} builder cannot build (it builds "
            f"{', '.join(sorted(known))}): use the variant's prebuilt export "
            "(wrap.onnx_source=prebuilt) where it has one, or serve it with wrap_transformers only"
        )


def build_onnx(
    model: str,
    snapshot_dir: Path,
    inputs: dict[str, object],
    store: SnapshotStore,
) -> OnnxBuild:
    """The ONNX folder onnxruntime-genai's builder makes from a snapshot with these build
    inputs (steps.onnx.build.build_inputs), from the store when an earlier build of the same
    inputs is there and verifies, else built into staging and ingested whole; one lock per
    inputs, so two runs of one build at once build it once."""
    started = time.monotonic()
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    ref = f"onnx--{key[:32]}"
    with store.lock(ref):
        cached, cache = store.verified(ref)
        if cached is None:
            with store.staging() as staging:
                _run_builder(snapshot_dir, staging / "model", staging / "builder-cache", inputs)
                source = {"kind": "onnx_build", **inputs}
                cached = store.ingest(
                    staging / "model", ref=ref, model=model, source=source, move=True
                )
    return OnnxBuild(
        model_dir=store.snapshot_path(cached.snapshot_id),
        manifest=cached,
        cache=cache,
        seconds=time.monotonic() - started,
    )


def builder_command(
    source: Path, output: Path, cache: Path, inputs: dict[str, object]
) -> list[str]:
    """The onnxruntime-genai builder's command line for `build_inputs`."""
    command = [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
        "-i", str(source), "-o", str(output), "-c", str(cache),
        "-p", str(inputs["precision"]), "-e", str(inputs["execution_provider"]),
    ]  # fmt: skip
    if options := inputs["extra_options"]:
        command += ["--extra_options", *(f"{k}={v}" for k, v in options.items())]
    return command


def _run_builder(source: Path, output: Path, cache: Path, inputs: dict[str, object]) -> None:
    command = builder_command(source, output, cache, inputs)
    options = inputs["extra_options"]
    log.info("building the ONNX model: %s", " ".join(command[2:]))
    started = time.monotonic()
    # Echo the builder's progress as it comes, and keep its last lines for the error message.
    tail: deque[str] = deque(maxlen=15)
    # The builder stamps `git rev-parse HEAD` of wherever it is installed into the model; inside
    # a project checkout that is our commit, which would make equal inputs give unequal bytes.
    env = os.environ | {"GIT_DIR": os.devnull}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
    ) as builder:
        for line in builder.stdout:
            sys.stderr.write(line)
            tail.append(line.rstrip())
    if builder.returncode != 0 or not (output / "genai_config.json").is_file():
        said = "\n".join(tail)
        raise PipelineError(
            f"the onnxruntime-genai builder failed (exit {builder.returncode}) for precision="
            f"{inputs['precision']} provider={inputs['execution_provider']} options={options}; "
            f"check compute.onnx_precision and wrap.onnx_builder_options. It said:\n{said}"
        )
    log.info("built the ONNX model in %.1f s", time.monotonic() - started)
