"""`mlflow run . -e wrap_transformers` / `-e wrap_onnx` as users run them, and how the wrap steps
find (or fail to find) the fetch run they build on."""

from __future__ import annotations

import mlflow
import pytest
from conftest import WrappedModels

from steps import wrap_transformers
from steps.errors import PipelineError
from steps.sources.snapshots import FetchOutcome
from steps.tracking.lineage import fetch_run_filter


def test_mlflow_run_wraps_the_latest_fetch_both_ways(
    wrapped: WrappedModels, bundled_fetch: FetchOutcome
) -> None:
    """`mlflow run . -e wrap_transformers` and `-e wrap_onnx` after `-e fetch`, as the session's
    `wrapped` fixture ran them: each found that fetch run by itself."""
    mlflow.set_tracking_uri(wrapped.tracking_uri)
    fetch_run = wrapped.runs["fetch"]
    for step, runtime in (
        ("wrap_transformers", "transformers"),
        ("wrap_onnx", "onnx"),
    ):
        run = wrapped.runs[step]
        assert run.data.tags["fetch.run_id"] == fetch_run.info.run_id
        assert run.data.tags["fetch.snapshot_id"] == bundled_fetch.manifest.snapshot_id
        assert run.data.tags["model.runtime"] == runtime
        assert run.data.tags["model.label"] == f"{runtime}-fp32"
        model = mlflow.get_logged_model(run.data.tags["model.uri"].removeprefix("models:/"))
        assert model.source_run_id == run.info.run_id
        # Named after what it is, in a run named after its step (not `model`, `bald-robin-343`).
        assert model.name == f"smollm2-135m-{runtime}-fp32-cpu"
        assert run.info.run_name == f"{step} smollm2-135m fp32 cpu"
        answer = mlflow.pyfunc.load_model(run.data.tags["model.uri"]).predict(
            {"messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 12}
        )
        assert "4" in answer[0]["choices"][0]["message"]["content"]
    onnx_run = wrapped.runs["wrap_onnx"]
    assert onnx_run.data.tags["onnx.source"] == "build"
    assert onnx_run.data.tags["model.precision"] == "fp32"
    assert onnx_run.data.metrics["onnx_model_bytes"] > 0
    onnx_manifest = mlflow.artifacts.load_dict(f"runs:/{onnx_run.info.run_id}/onnx_manifest.json")
    assert onnx_manifest["source"]["snapshot_id"] == bundled_fetch.manifest.snapshot_id


def test_wrapping_without_a_fetch_run_says_what_to_run(compose, tracking_uri) -> None:
    with pytest.raises(PipelineError, match="no finished fetch run of model=smollm2-135m") as e:
        wrap_transformers.main(compose("tracking.experiment=empty"))
    assert "mlflow run . -e fetch -P model=smollm2-135m" in str(e.value)


def test_an_explicit_fetch_run_id_must_be_a_finished_fetch_run(compose, tracking_uri) -> None:
    with mlflow.start_run() as other:
        mlflow.set_tag("pipeline.step", "evaluate")
    with pytest.raises(PipelineError, match="is not a finished fetch run"):
        wrap_transformers.main(compose(f"wrap.fetch_run_id={other.info.run_id}"))
    with pytest.raises(PipelineError, match="is not a run in this tracking store"):
        wrap_transformers.main(compose("wrap.fetch_run_id=0123456789abcdef"))


def test_fetch_runs_are_matched_on_variant_and_source_revision(compose) -> None:
    weights = fetch_run_filter(compose("model=phi3-mini-4k"), compose().fetch.artifact)
    assert "params.`model.name` = 'phi3-mini-4k'" in weights
    assert "params.`model.source.revision` = '3a811845d89f3c1b3f41b341d0f9f05104769f35'" in weights
    cfg = compose("model=phi3-mini-4k", "compute=cuda", "fetch.artifact=prebuilt_onnx")
    prebuilt = fetch_run_filter(cfg, cfg.fetch.artifact)
    assert "params.`model.prebuilt_onnx.cuda.subfolder` = 'cuda/cuda-int4-rtn-block-32'" in prebuilt
