"""The wrap steps on a Hub variant, end to end against the loopback Hub, which serves the bundled
model's files as the phi3-mini-4k repos at their pinned commits: the weights (for
wrap.save_pretrained=false, a reference instead of a copy) and a prebuilt ONNX export."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from fake_hub import FakeHub, folder_files

from steps import fetch, wrap_onnx, wrap_transformers
from steps.config.schema import PipelineConfig
from steps.errors import PipelineError
from steps.onnx.build import build_inputs, build_onnx
from steps.sources.snapshots import FetchOutcome
from steps.store.snapshot_store import SnapshotStore

REPO = "microsoft/Phi-3-mini-4k-instruct"
PINNED = "3a811845d89f3c1b3f41b341d0f9f05104769f35"
NEWER = "4" * 40
ONNX_REPO = "microsoft/Phi-3-mini-4k-instruct-onnx"
ONNX_PINNED = "a484edc37e8f7b425a5aefa25e35905769963681"
CPU_EXPORT = "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4"

pytestmark = pytest.mark.slow


@pytest.fixture
def hub_with_bundled_weights(
    bundled_fetch: FetchOutcome, session_cache: Path, loopback_hub
) -> FakeHub:
    files = folder_files(bundled_fetch.model_dir)
    inputs = build_inputs(bundled_fetch.manifest.snapshot_id, "fp32", "cpu", {})
    built = build_onnx(
        "smollm2-135m", bundled_fetch.model_dir, inputs, SnapshotStore(session_cache)
    )
    export = folder_files(built.model_dir, f"{CPU_EXPORT}/") | {"cuda/cuda-fp16/model.onnx": b"gpu"}
    repos = {REPO: {PINNED: files, NEWER: files}, ONNX_REPO: {ONNX_PINNED: export}}
    return loopback_hub(repos, refs={REPO: {"main": PINNED}})


def _fetched_in_reference_mode(compose, tmp_path: Path) -> PipelineConfig:
    """phi3-mini-4k with wrap.save_pretrained=false, its fetch step run against the Hub."""
    cfg = compose(
        "model=phi3-mini-4k", "wrap.save_pretrained=false", f"fetch.cache_dir={tmp_path / 'c'}"
    )
    fetch.main(cfg)
    return cfg


def test_reference_mode_logs_no_weights_and_loads_them_from_the_hub(
    hub_with_bundled_weights, compose, tracking_uri, tmp_path
) -> None:
    cfg = _fetched_in_reference_mode(compose, tmp_path)
    uri = wrap_transformers.main(cfg).model.model_uri
    local = Path(mlflow.artifacts.download_artifacts(uri))
    assert not list(local.rglob("*.safetensors")), "reference mode must not copy the weights"
    flavor = mlflow.models.Model.load(str(local)).flavors["transformers"]
    assert flavor["source_model_name"] == REPO
    assert flavor["source_model_revision"] == PINNED
    answer = mlflow.pyfunc.load_model(uri).predict(
        {"messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 24}
    )
    assert "4" in answer[0]["choices"][0]["message"]["content"]
    downloads = [r.path for r in hub_with_bundled_weights.requests if "safetensors" in r.path]
    assert downloads and all(PINNED in path for path in downloads)


def test_reference_mode_refuses_when_the_hub_head_moved_past_the_pin(
    hub_with_bundled_weights, compose, tracking_uri, tmp_path
) -> None:
    cfg = _fetched_in_reference_mode(compose, tmp_path)
    hub_with_bundled_weights.refs[REPO]["main"] = NEWER
    with pytest.raises(PipelineError, match=f"at its current head {NEWER}, but the fetched"):
        wrap_transformers.main(cfg)


def test_prebuilt_onnx_export_is_fetched_and_wrapped(
    hub_with_bundled_weights, compose, tracking_uri, tmp_path
) -> None:
    cfg = compose(
        "model=phi3-mini-4k", "fetch.artifact=prebuilt_onnx", f"fetch.cache_dir={tmp_path / 'c'}"
    )
    fetch.main(cfg)
    result = wrap_onnx.main(cfg)  # wrap.onnx_source=auto: the variant has an export for cpu
    run = mlflow.get_run(result.model.wrap_run_id)
    assert run.data.tags["onnx.source"] == "prebuilt"
    assert run.data.tags["model.precision"] == "cpu-int4-rtn-block-32-acc-level-4"
    assert result.model.label == "onnx-cpu-int4-rtn-block-32-acc-level-4"
    model = mlflow.pyfunc.load_model(run.data.tags["model.uri"])
    answer = model.predict({"messages": [{"role": "user", "content": "What is 2+2?"}]})[0]
    assert "4" in answer["choices"][0]["message"]["content"]
    assert answer["model"] == "phi3-mini-4k-onnx-cpu-int4-rtn-block-32-acc-level-4-cpu"
    fetched = [r.path for r in hub_with_bundled_weights.requests if "/resolve/" in r.path]
    assert fetched and not any("cuda" in path for path in fetched)
