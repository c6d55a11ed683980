"""`mlflow run .` end to end on the bundled model against a real `mlflow server`, twice: the
second run reuses every step. Then the registry, the evaluation artifacts, where they live and
the gate's failure path are checked."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from conftest import PipelineRuns
from mlflow import MlflowClient

from steps import register
from steps.config.schema import Runtime
from steps.errors import PipelineError

pytestmark = pytest.mark.slow
STEPS = ("fetch", "wrap_transformers", "wrap_onnx", "evaluate", "register")
REGISTERED = "smollm2-135m-onnx-cpu"


def test_champion_is_registered_and_answers_by_alias(
    remote_pipeline: PipelineRuns, tmp_path: Path
) -> None:
    mlflow.set_tracking_uri(remote_pipeline.server.uri)
    version = MlflowClient().get_model_version_by_alias(REGISTERED, "champion")
    assert version.tags["evaluate.run_id"] == remote_pipeline.cold.data.tags["main.evaluate.run_id"]
    assert version.tags["git.commit"] == remote_pipeline.cold.data.tags["git.commit"]
    assert {"config.sha256", "fetch.manifest_sha256", "metrics.accuracy"} <= set(version.tags)
    assert "Accuracy" in version.description and "Git commit" in version.description
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED}@champion", dst_path=str(tmp_path))
    answer = model.predict(
        {"messages": [{"role": "user", "content": "What is the capital of France?"}]}
    )
    assert "Paris" in answer[0]["choices"][0]["message"]["content"]


def test_the_pipeline_leaves_no_files_in_the_temp_folder(remote_pipeline: PipelineRuns) -> None:
    # Evaluating against a server copies each model (gigabytes for Phi-3) into a temp folder.
    assert [path for path in remote_pipeline.temp_dir.rglob("*") if path.is_file()] == []


def test_evaluate_run_holds_metrics_tables_chart_and_dataset(remote_pipeline: PipelineRuns) -> None:
    mlflow.set_tracking_uri(remote_pipeline.server.uri)
    run = mlflow.get_run(remote_pipeline.cold.data.tags["main.evaluate.run_id"])
    metrics = run.data.metrics
    for label in ("transformers-fp32", "onnx-fp32"):
        for key in (
            "accuracy",
            "latency_p50_s",
            "latency_p95_s",
            "tokens_per_s",
            "peak_rss_mb",
            "load_seconds",
        ):
            assert f"{label}.{key}" in metrics, (label, key)
    assert "onnx-fp32.ttft_mean_s" in metrics
    # fp32 on both runtimes: the same greedy answers, so the same accuracy.
    assert metrics["parity"] == 1.0
    assert metrics["transformers-fp32.accuracy"] == metrics["onnx-fp32.accuracy"] >= 0.3
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "eval")}
    assert {"eval/items.json", "eval/summary.json", "eval/comparison.png"} <= artifacts
    items = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/eval/items.json")
    assert len(items["data"]) == 30 and "onnx-fp32 correct" in items["columns"]
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "chat-basics-v1"
    assert run.data.tags["evaluate.dataset_sha256"]


def test_parent_run_records_the_lineage(remote_pipeline: PipelineRuns) -> None:
    mlflow.set_tracking_uri(remote_pipeline.server.uri)
    tags = remote_pipeline.cold.data.tags
    for step in STEPS:
        child = mlflow.get_run(tags[f"main.{step}.run_id"])
        assert child.data.tags["mlflow.parentRunId"] == remote_pipeline.cold.info.run_id
        assert child.data.tags["pipeline.step"] == step
    assert tags["main.registered"].startswith(f"{REGISTERED} v1 @champion")
    for runtime in Runtime:
        assert tags[f"main.model_uri.{runtime}"].startswith("models:/m-")


def test_main_parallel_ran_the_two_wraps_at_the_same_time(remote_pipeline: PipelineRuns) -> None:
    client = MlflowClient(remote_pipeline.server.uri)
    tags = remote_pipeline.cold.data.tags
    transformers, onnx = (
        client.get_run(tags[f"main.{step}.run_id"]).info
        for step in ("wrap_transformers", "wrap_onnx")
    )
    assert transformers.start_time < onnx.end_time and onnx.start_time < transformers.end_time
    evaluate = client.get_run(tags["main.evaluate.run_id"]).info
    assert evaluate.start_time >= max(transformers.end_time, onnx.end_time)


def test_second_run_reuses_every_step(remote_pipeline: PipelineRuns) -> None:
    tags = remote_pipeline.warm.data.tags
    assert all(tags[f"main.{step}.reused"] == "true" for step in STEPS)
    assert all(
        tags[f"main.{s}.run_id"] == remote_pipeline.cold.data.tags[f"main.{s}.run_id"]
        for s in STEPS
    )
    assert (
        len(MlflowClient(remote_pipeline.server.uri).search_model_versions(f"name='{REGISTERED}'"))
        == 1
    )


def test_failing_the_gate_leaves_the_champion_untouched(
    remote_pipeline: PipelineRuns, compose, monkeypatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", remote_pipeline.server.uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    client = MlflowClient(remote_pipeline.server.uri)
    before = client.get_model_version_by_alias(REGISTERED, "champion").version
    cfg = compose(
        remote_pipeline.cache_override, "register.min_accuracy=1.0", "tracking.experiment=e2e"
    )
    with pytest.raises(PipelineError, match=r"failed the quality gate .* nothing was registered"):
        register.main(cfg)
    assert client.get_model_version_by_alias(REGISTERED, "champion").version == before
    assert len(client.search_model_versions(f"name='{REGISTERED}'")) == 1


def test_runs_artifacts_and_registry_live_on_the_server(remote_pipeline: PipelineRuns) -> None:
    server = remote_pipeline.server
    client = MlflowClient(server.uri)
    wrap_run = client.get_run(remote_pipeline.cold.data.tags["main.wrap_onnx.run_id"])
    assert wrap_run.info.artifact_uri.startswith("mlflow-artifacts:/")
    model_id = wrap_run.data.tags["model.uri"].removeprefix("models:/")
    stored = {p.name for p in server.artifacts.rglob("*") if model_id in p.parts}
    assert {"MLmodel", "model.onnx", "model.onnx.data"} <= stored
    assert (server.artifacts / wrap_run.info.experiment_id).is_dir()
    version = client.get_model_version_by_alias(REGISTERED, "champion")
    assert version.source == wrap_run.data.tags["model.uri"]
