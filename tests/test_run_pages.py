"""What the MLflow UI shows, through MLflow's client API: models named after what they are, runs
named after their step and choices, runs linked to the models they used or made, and a
description on the evaluate, register and main runs. The steps' own logging code runs on a SQLite
store; only the models (tiny pyfuncs) and the measurements stand in for the real ones, which
tests/test_mlflow_ui.py looks at in a browser after a whole pipeline."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModel, Run

from steps import evaluate, main, register
from steps.config import plan
from steps.config.compose import compose_config, project_path
from steps.config.schema import Runtime
from steps.evaluation.evalset import load_eval_set
from steps.evaluation.fidelity import load_fidelity_text
from steps.evaluation.measure import CandidateResult, ItemResult
from steps.evaluation.report import answer_summary, flips
from steps.evaluation.selection import fastest_faithful
from steps.tracking.models import (
    LoggedChatModel,
    WrapResult,
    log_wrap_result,
    logged_model_id,
    logged_model_name,
    model_tags,
)
from steps.tracking.pages import CUT, set_note
from steps.tracking.runs import step_run

NOTE = "mlflow.note.content"
CANDIDATES = ((Runtime.transformers, "fp32"), (Runtime.onnx, "int8"))
NAMES = ("smollm2-135m-transformers-fp32-cpu", "smollm2-135m-onnx-int8-cpu")


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input):
        return model_input


def fidelity_scores(kld_mean: float) -> dict[str, float]:
    return {
        "kld_mean": kld_mean, "kld_p99": 4 * kld_mean, "top1_agreement": 1 - kld_mean,
        "ppl_ratio": 1 + kld_mean, "scored_tokens": 512.0,
    }  # fmt: skip


def measured(label: str, correct: list[bool], seconds: float) -> CandidateResult:
    result = CandidateResult(label, load_seconds=1.0, peak_rss_mb=300.0)
    result.items = [
        ItemResult(f"i{n}", "Paris" if ok else "Lyon", ok, seconds, 0.1, 12, 8)
        for n, ok in enumerate(correct)
    ]
    return result


@dataclass(frozen=True)
class Pipeline:
    fetch: str
    wraps: dict[str, str]  # label -> wrap run id
    evaluate: Run
    register: Run
    main: Run


def log_pipeline(overrides: list[str]) -> Pipeline:
    """fetch, two wraps, evaluate, register and main's summary, as the steps log them."""
    cfg = compose_config(overrides)
    with step_run("fetch", cfg) as fetch_run:
        mlflow.log_text('{"snapshot_id": "s"}', "manifest.json")
    models, wraps = [], {}
    for runtime, precision in CANDIDATES:
        build = [f"wrap.onnx_build={precision}"] if runtime is Runtime.onnx else []
        with step_run(f"wrap_{runtime.value}", compose_config(overrides + build)) as wrap_run:
            tags = model_tags(
                runtime, precision, cfg.model.name, cfg.compute.name, fetch_run.info.run_id, "s"
            )
            info = mlflow.pyfunc.log_model(
                name=logged_model_name(cfg.model.name, runtime, precision, cfg.compute.target),
                python_model=Echo(),
                pip_requirements=[],
                tags=tags,
            )
            model = LoggedChatModel(runtime, precision, info.model_uri, wrap_run.info.run_id)
            log_wrap_result(WrapResult(model, tags | {"model.uri": info.model_uri}, {}), None)
        models.append(model)
        wraps[model.label] = wrap_run.info.run_id
    eval_set = load_eval_set(project_path(cfg.evaluate.dataset), max_items=4)
    text = load_fidelity_text(project_path(cfg.evaluate.fidelity.text))
    reference, fast = (
        measured(models[0].label, [True, True, False, True], 2.0),
        measured(models[1].label, [True, True, False, True], 1.0),
    )
    scores = {reference.label: fidelity_scores(0.0), fast.label: fidelity_scores(0.01)}
    summaries = {
        r.label: answer_summary(r) | flips(reference, r) | scores[r.label]
        for r in (reference, fast)
    }
    result = evaluate.EvaluateResult(
        eval_set, text, reference.label, models, [reference, fast], summaries,
        fastest_faithful(summaries, reference.label, cfg.register), frozenset(scores[fast.label]),
        {label: "4 asked" for label in summaries},
    )  # fmt: skip
    with step_run("evaluate", cfg) as evaluate_run:
        evaluate.log_result(cfg, result, evaluate_run.info.run_id)
    register.main(cfg)
    client = MlflowClient()
    experiment = evaluate_run.info.experiment_id
    (register_run,) = client.search_runs([experiment], "tags.`pipeline.step` = 'register'")
    run_ids = {"fetch": fetch_run.info.run_id} | {
        ("wrap_transformers" if label == models[0].label else "wrap_onnx.int8"): run_id
        for label, run_id in wraps.items()
    }
    run_ids |= {"evaluate": evaluate_run.info.run_id, "register": register_run.info.run_id}
    with step_run("main", cfg) as main_run:
        result = main.MainResult(run_ids, ["fetch"], wrap_run_ids=list(wraps.values()))
        main.record_lineage(cfg, result, main_run.info.run_id)
    return Pipeline(
        fetch_run.info.run_id,
        wraps,
        client.get_run(evaluate_run.info.run_id),
        client.get_run(register_run.info.run_id),
        client.get_run(main_run.info.run_id),
    )


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Pipeline]:
    """One store for the module's tests of the pipeline's pages (they only read it, but for
    registering the same model again)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('pages') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        return uri, log_pipeline([f"tracking.uri={uri}"])


@pytest.fixture
def pipeline(logged, monkeypatch: pytest.MonkeyPatch) -> Pipeline:
    uri, logged_pipeline = logged
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return logged_pipeline


def logged_models(pipeline: Pipeline) -> dict[str, LoggedModel]:
    found = mlflow.search_logged_models(
        experiment_ids=[pipeline.main.info.experiment_id], output_format="list"
    )
    return {model.name: model for model in found}


def test_models_are_named_after_what_they_are_and_carry_their_metrics(pipeline) -> None:
    models = logged_models(pipeline)
    assert set(models) == set(NAMES)
    for model in models.values():
        by_dataset: dict[str, set[str]] = {}
        for metric in model.metrics:
            assert metric.run_id != pipeline.evaluate.info.run_id  # its own nested run
            by_dataset.setdefault(metric.dataset_name, set()).add(metric.key)
        # Speed and accuracy on the questions, fidelity on the text: the UI's column groups.
        assert by_dataset == {
            "chat-basics-v2": {"accuracy", "tokens_per_s", "latency_p95_s", "peak_rss_mb"},
            "fidelity-v1": {"kld_mean", "top1_agreement", "ppl_ratio"},
        }
        # In the order the model list shows its columns: accuracy and speed first.
        assert [m.key for m in model.metrics][:2] == ["accuracy", "tokens_per_s"]
    ranked = mlflow.search_logged_models(
        experiment_ids=[pipeline.main.info.experiment_id],
        order_by=[{"field_name": "metrics.tokens_per_s"}],
    )
    assert list(ranked["name"]) == [NAMES[0], NAMES[1]]  # sortable by a metric


def test_runs_are_named_after_their_step_and_choices(pipeline, compose) -> None:
    names = {
        run.info.run_name
        for run in mlflow.search_runs(search_all_experiments=True, output_format="list")
    }
    assert names == {
        "fetch smollm2-135m cpu",
        "wrap_transformers smollm2-135m fp32 cpu",
        "wrap_onnx smollm2-135m int8 cpu",
        "evaluate smollm2-135m cpu",
        "evaluate smollm2-135m transformers-fp32 cpu",
        "evaluate smollm2-135m onnx-int8 cpu",
        "register smollm2-135m cpu",
        "main smollm2-135m cpu",
    }
    assert plan.run_name(
        "fetch", compose("fetch.artifact=prebuilt_onnx", "model=phi3-mini-4k")
    ) == ("fetch phi3-mini-4k prebuilt_onnx cpu")
    prebuilt = compose("model=phi3-mini-4k", "wrap.onnx_source=prebuilt", "compute=k8s-cuda")
    assert (
        plan.run_name("wrap_onnx", prebuilt)
        == "wrap_onnx phi3-mini-4k cuda-int4-rtn-block-32 k8s-cuda"
    )
    built = compose('wrap.onnx_build="int4:algo_config=k_quant_last"')
    assert plan.run_name("wrap_onnx", built) == "wrap_onnx smollm2-135m int4-k_quant_last cpu"


def test_a_run_that_mlflow_run_created_is_renamed(compose, tracking_uri, monkeypatch) -> None:
    created = MlflowClient().create_run(
        MlflowClient().create_experiment("e"), run_name="bald-robin-343"
    )
    monkeypatch.setenv("MLFLOW_RUN_ID", created.info.run_id)
    with step_run("evaluate", compose()) as run:
        assert run.info.run_id == created.info.run_id
    assert mlflow.get_run(run.info.run_id).info.run_name == "evaluate smollm2-135m cpu"


def test_every_model_the_pipeline_makes_has_a_name_mlflow_takes(compose, tracking_uri) -> None:
    experiment = MlflowClient().create_experiment("names")
    for variant, target in itertools.product(("smollm2-135m", "phi3.5-mini"), ("cpu", "cuda")):
        cfg = compose(f"model={variant}", f"compute={target}")
        if target in cfg.model.prebuilt_onnx:  # the builds and the export side by side
            cfg = compose(f"model={variant}", f"compute={target}", "wrap.onnx_source=both")
        for planned in plan.planned_models(cfg):
            name = logged_model_name(variant, planned.runtime, planned.precision, target)
            assert MlflowClient().create_logged_model(experiment, name=name).name == name
    # MLflow refuses a dot there (a registered model's name may have one).
    assert logged_model_name("phi3.5-mini", Runtime.onnx, "int4", "cpu") == (
        "phi3_5-mini-onnx-int4-cpu"
    )


def _model_inputs(run: Run) -> set[str]:
    return {model.model_id for model in run.inputs.model_inputs}


def test_evaluate_run_links_its_models_and_explains_the_choice(pipeline) -> None:
    run = pipeline.evaluate
    models = {name: model.model_id for name, model in logged_models(pipeline).items()}
    assert _model_inputs(run) == set(models.values())
    note = run.data.tags[NOTE]
    assert note.startswith("## SmolLM2-135M-Instruct on cpu: onnx-int8\n")
    assert "**onnx-int8** is what register's fastest_faithful policy chooses: the fastest" in note
    assert "| transformers-fp32 (reference) | 4 asked | 0.750 |" in note
    assert "| onnx-int8 | 4 asked | 0.750 |" in note
    assert f"[{pipeline.fetch}](#/runs/{pipeline.fetch})" in note
    for label, wrap_run in pipeline.wraps.items():
        assert f"logged by [{wrap_run}](#/runs/{wrap_run})" in note, label
    for name, model_id in models.items():
        assert f"[{name}](#/experiments/{run.info.experiment_id}/models/{model_id})" in note
    chart = f"get-artifact?path=eval/speed_vs_fidelity.png&run_uuid={run.info.run_id}"
    assert chart in note
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "eval")}
    assert {"eval/speed_vs_fidelity.png", "eval/comparison.png"} <= artifacts
    children = MlflowClient().search_runs(
        [run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'"
    )
    # search_runs leaves out model inputs: get_run has them.
    linked = [_model_inputs(MlflowClient().get_run(child.info.run_id)) for child in children]
    assert {frozenset(models) for models in linked} == {
        frozenset([model_id]) for model_id in models.values()
    }


def test_register_run_links_the_version_it_registered(pipeline, compose) -> None:
    run = pipeline.register
    version = MlflowClient().get_model_version_by_alias("smollm2-135m-onnx-cpu", "champion")
    assert _model_inputs(run) == {logged_model_id(version.source)}
    assert version.description.startswith("# SmolLM2-135M-Instruct (onnx-int8, cpu)")
    note = run.data.tags[NOTE]
    assert note.startswith("## smollm2-135m-onnx-cpu version 1 is champion\n")
    assert "Registered now as [smollm2-135m-onnx-cpu version 1]" in note
    assert "(#/models/smollm2-135m-onnx-cpu/versions/1)" in note
    evaluate_run = pipeline.evaluate.info.run_id
    assert f"- Evaluation: [{evaluate_run}](#/runs/{evaluate_run})" in note
    assert run.data.tags["register.why"].startswith("the fastest of the 2 that pass the gate")
    # The UI's "Registered models" of the model list and of the runs that used the model.
    model = MlflowClient().get_logged_model(logged_model_id(version.source))
    listed = [{"name": "smollm2-135m-onnx-cpu", "version": 1}]
    assert json.loads(model.tags["mlflow.modelVersions"]) == listed
    register.main(compose(f"tracking.uri={mlflow.get_tracking_uri()}"))  # the same model again
    model = MlflowClient().get_logged_model(model.model_id)
    assert json.loads(model.tags["mlflow.modelVersions"]) == listed


def test_main_run_links_every_model_and_step(pipeline) -> None:
    run = pipeline.main
    assert {model.model_id for model in run.outputs.model_outputs} == {
        model.model_id for model in logged_models(pipeline).values()
    }
    note = run.data.tags[NOTE]
    assert note.startswith(
        "## SmolLM2-135M-Instruct on cpu: smollm2-135m-onnx-cpu version 1 is champion\n"
    )
    assert "| onnx-int8 | 4 asked | 0.750 |" in note and "chosen: the fastest of the 2" in note
    assert f"| fetch | [{pipeline.fetch}](#/runs/{pipeline.fetch}) | reused |" in note
    register_run = pipeline.register.info.run_id
    assert f"| register | [{register_run}](#/runs/{register_run}) | ran |" in note
    evaluate_run = pipeline.evaluate.info.run_id
    assert f"path=eval/speed_vs_fidelity.png&run_uuid={evaluate_run}" in note


def test_a_note_longer_than_a_tag_is_cut_visibly(tracking_uri) -> None:
    with mlflow.start_run() as run:
        set_note(run.info.run_id, "| row |\n" * 2000)
    note = mlflow.get_run(run.info.run_id).data.tags[NOTE]
    assert len(note) == 8000 and note.endswith(CUT)
