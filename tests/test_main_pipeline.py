"""`mlflow run .` end to end on the bundled model against a real `mlflow server`, twice: the
second run reuses every step. Then the registry, the evaluation artifacts, where they live and
the gate's failure path are checked."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import pytest
from conftest import REGISTERED, PipelineRuns
from mlflow import MlflowClient

from steps import register
from steps.config.compose import compose_config
from steps.config.schema import Runtime, model_label
from steps.errors import PipelineError

pytestmark = pytest.mark.slow
BUILDS = ("fp32", "int8", "int4", "int4-k_quant_last")  # conf/compute/cpu.yaml's sweep
WRAPS = ("wrap_transformers", *(f"wrap_onnx.{build}" for build in BUILDS))
STEPS = ("fetch", *WRAPS, "evaluate", "register")
LABELS = (
    model_label(Runtime.transformers, "fp32"),
    *(model_label(Runtime.onnx, build) for build in BUILDS),
)
ASKED = LABELS[:3]  # the int4 builds fail fidelity, so they are not asked the evaluation set
TIMED = compose_config([]).evaluate.timed_items
CHAMPION = REGISTERED["onnx"]  # where the pipeline registers its champion (an ONNX build wins)


def test_champion_is_registered_and_answers_by_alias(
    remote_pipeline: PipelineRuns, tmp_path: Path
) -> None:
    mlflow.set_tracking_uri(remote_pipeline.server.uri)
    version = MlflowClient().get_model_version_by_alias(CHAMPION, "champion")
    assert version.tags["evaluate.run_id"] == remote_pipeline.cold.data.tags["main.evaluate.run_id"]
    assert version.tags["git.commit"] == remote_pipeline.cold.data.tags["git.commit"]
    assert {"config.sha256", "fetch.manifest_sha256", "metrics.accuracy"} <= set(version.tags)
    assert "Accuracy" in version.description and "Git commit" in version.description
    # The card shows every candidate's row and why it was or was not chosen.
    assert all(f"| {label}" in version.description for label in LABELS)
    assert "chosen: the fastest of the" in version.description
    assert "not asked: failed fidelity (mean KLD" in version.description
    assert "shared from onnx-fp32 (same distribution: mean KLD" in version.description or (
        "shared from transformers-fp32 (same distribution: mean KLD" in version.description
    )
    model = mlflow.pyfunc.load_model(f"models:/{CHAMPION}@champion", dst_path=str(tmp_path))
    answer = model.predict(
        {"messages": [{"role": "user", "content": "What is the capital of Japan?"}]}
    )
    # The champion is the int8 build, which gets this one right (and France wrong).
    assert "Tokyo" in answer[0]["choices"][0]["message"]["content"]


def test_the_pipeline_leaves_no_files_in_the_temp_folder(remote_pipeline: PipelineRuns) -> None:
    # Evaluating against a server copies each model (gigabytes for Phi-3) into a temp folder.
    assert [path for path in remote_pipeline.temp_dir.rglob("*") if path.is_file()] == []


def test_evaluate_run_holds_metrics_tables_chart_and_dataset(remote_pipeline: PipelineRuns) -> None:
    mlflow.set_tracking_uri(remote_pipeline.server.uri)
    run = mlflow.get_run(remote_pipeline.cold.data.tags["main.evaluate.run_id"])
    metrics = run.data.metrics
    for label in LABELS:
        fidelity = ("kld_mean", "kld_p99", "top1_agreement", "top1_agreement_ci_low", "ppl_ratio")
        asking = (
            "accuracy", "accuracy_ci_low", "accuracy_ci_high", "flips_lost", "flips_gained",
            "mcnemar_p", "tokens_per_s", "latency_p95_s", "seconds.asking",
        )  # fmt: skip
        for key in (*fidelity, "seconds.loading", "seconds.fidelity", "seconds.logging"):
            assert f"{label}.{key}" in metrics, (label, key)
        for key in asking:
            assert (f"{label}.{key}" in metrics) is (label in ASKED), (label, key)
        assert metrics[f"{label}.scored_tokens"] >= 1530  # the default: +-1 point on top-1
    assert metrics["onnx-int4.items_asked"] == 0
    assert {f"seconds.{p}" for p in ("loading", "fidelity", "asking", "logging", "total")} <= set(
        metrics
    )
    # The invariants of the real model: fp32 ONNX is transformers fp32 to float precision, and
    # int4 (RTN) moves the distributions further than int8.
    assert metrics["onnx-fp32.kld_mean"] < 1e-5 and metrics["onnx-fp32.top1_agreement"] == 1.0
    assert metrics["onnx-int4.kld_mean"] > metrics["onnx-int8.kld_mean"]
    # So the one of the two that was quicker in the fidelity pass answered for both past the
    # timed items.
    items = metrics["onnx-fp32.items"]
    asked = sorted(metrics[f"{label}.items_asked"] for label in LABELS[:2])
    assert asked == [TIMED, items]
    assert sorted(metrics[f"{label}.items_shared"] for label in LABELS[:2]) == [0, items - TIMED]
    assert run.data.tags["evaluate.reference"] == "transformers-fp32"
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "eval")}
    assert {
        "eval/items.json", "eval/summary.json", "eval/comparison.png", "eval/speed_vs_fidelity.png",
    } <= artifacts  # fmt: skip
    items = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/eval/items.json")
    assert len(items["data"]) >= 150 and "onnx-int8 correct" in items["columns"]
    assert "onnx-int4 answer" not in items["columns"]
    right = {label: items["columns"].index(f"{label} answer") for label in LABELS[:2]}
    # transformers fp32 and ONNX fp32 give the same greedy tokens on the items both asked
    # (had they not, transformers would have asked every item, and failed the count above).
    assert all(row[right[LABELS[0]]] == row[right[LABELS[1]]] for row in items["data"][:TIMED])
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"chat-basics-v2", "fidelity-v1"}
    assert run.data.tags["evaluate.dataset_sha256"]
    assert run.data.tags["evaluate.fidelity_text_sha256"]


def test_parent_run_records_the_lineage(remote_pipeline: PipelineRuns) -> None:
    mlflow.set_tracking_uri(remote_pipeline.server.uri)
    tags = remote_pipeline.cold.data.tags
    for step in STEPS:
        child = mlflow.get_run(tags[f"main.{step}.run_id"])
        assert child.data.tags["mlflow.parentRunId"] == remote_pipeline.cold.info.run_id
        assert child.data.tags["pipeline.step"] == step.partition(".")[0]
    assert tags["main.registered"].startswith(f"{CHAMPION} v1 @champion")
    for label in LABELS:
        assert tags[f"main.model_uri.{label}"].startswith("models:/m-")
    # Each step's seconds, on the parent and in what main printed, evaluate's by phase.
    assert {f"seconds.{step}" for step in STEPS} <= set(remote_pipeline.cold.data.metrics)
    cold, warm = remote_pipeline.outputs
    seconds = r"[0-9.]+"
    assert re.search(
        rf"steps: fetch {seconds} s, wrap_transformers {seconds} s, .*evaluate {seconds} s "
        rf"\(loading {seconds}, fidelity {seconds}, asking {seconds}, logging {seconds}\), "
        rf"register {seconds} s",
        cold,
    )
    assert "steps: fetch reused, wrap_transformers reused, " in warm


def test_main_parallel_ran_the_wraps_at_the_same_time(remote_pipeline: PipelineRuns) -> None:
    client = MlflowClient(remote_pipeline.server.uri)
    tags = remote_pipeline.cold.data.tags
    wraps = [client.get_run(tags[f"main.{step}.run_id"]).info for step in WRAPS]
    assert max(w.start_time for w in wraps) < min(w.end_time for w in wraps)
    evaluate = client.get_run(tags["main.evaluate.run_id"]).info
    assert evaluate.start_time >= max(w.end_time for w in wraps)


def test_second_run_reuses_every_step(remote_pipeline: PipelineRuns) -> None:
    tags = remote_pipeline.warm.data.tags
    assert all(tags[f"main.{step}.reused"] == "true" for step in STEPS)
    assert all(
        tags[f"main.{s}.run_id"] == remote_pipeline.cold.data.tags[f"main.{s}.run_id"]
        for s in STEPS
    )
    assert (
        len(MlflowClient(remote_pipeline.server.uri).search_model_versions(f"name='{CHAMPION}'"))
        == 1
    )


def test_failing_the_gate_leaves_the_champion_untouched(
    remote_pipeline: PipelineRuns, compose, monkeypatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", remote_pipeline.server.uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    client = MlflowClient(remote_pipeline.server.uri)
    before = client.get_model_version_by_alias(CHAMPION, "champion").version
    cfg = compose(
        remote_pipeline.cache_override, "register.min_accuracy=1.0", "tracking.experiment=e2e"
    )
    with pytest.raises(PipelineError, match=r"failed the quality gate .* nothing was registered"):
        register.main(cfg)
    assert client.get_model_version_by_alias(CHAMPION, "champion").version == before
    assert len(client.search_model_versions(f"name='{CHAMPION}'")) == 1


def test_runs_artifacts_and_registry_live_on_the_server(remote_pipeline: PipelineRuns) -> None:
    server = remote_pipeline.server
    client = MlflowClient(server.uri)
    version = client.get_model_version_by_alias(CHAMPION, "champion")
    wrap_step = f"main.wrap_onnx.{version.tags['model.precision']}.run_id"
    wrap_run = client.get_run(remote_pipeline.cold.data.tags[wrap_step])
    assert wrap_run.info.artifact_uri.startswith("mlflow-artifacts:/")
    model_id = wrap_run.data.tags["model.uri"].removeprefix("models:/")
    stored = {p.name for p in server.artifacts.rglob("*") if model_id in p.parts}
    assert {"MLmodel", "model.onnx", "model.onnx.data"} <= stored
    assert (server.artifacts / wrap_run.info.experiment_id).is_dir()
    assert version.source == wrap_run.data.tags["model.uri"]
