"""The evaluation set, the answer checks, and the choices register makes, on plain values."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from steps import register
from steps.config.compose import compose_config, project_path
from steps.config.schema import Choice, Runtime
from steps.errors import PipelineError
from steps.evaluation.asking import answered_by
from steps.evaluation.evalset import is_correct, load_eval_set
from steps.evaluation.measure import CandidateResult, ItemResult, same_answers, take_shared_answers
from steps.evaluation.report import answer_summary, parity
from steps.evaluation.selection import AskPlan, alias_for, choose, gate_failures
from steps.tracking.models import EvaluatedModel, LoggedChatModel

WRONG_REPLIES = ["I don't know.", "", "Banana.", "The answer is 1000001."]


@pytest.fixture(scope="module")
def eval_set():
    return load_eval_set(project_path(compose_config([]).evaluate.dataset))


def test_shipped_set_is_versioned_mixed_and_large_enough_to_show_a_difference(eval_set) -> None:
    assert eval_set.name == "chat-basics-v2"
    assert len(eval_set.items) >= 150
    assert len({item.id for item in eval_set.items}) == len(eval_set.items)
    assert {item.category for item in eval_set.items} >= {
        "factual", "arithmetic", "instruction", "counting", "comparison", "string", "unit",
    }  # fmt: skip
    assert len(eval_set.sha256) == 64


def test_scorer_accepts_each_reference_and_rejects_wrong_replies(eval_set) -> None:
    for item in eval_set.items:
        assert is_correct(item.reference, item.accept), item.id
        for wrong in WRONG_REPLIES:
            assert not is_correct(wrong, item.accept), (item.id, wrong)


def test_a_known_reply_is_right_only_when_it_states_the_answer() -> None:
    assert is_correct("The capital of Japan is Tokyo.", (r"\btokyo\b",))
    assert not is_correct("18 divided by 2 is 13.", (r"(?<![\d.-])(9|nine)(?![\d.])",))
    assert is_correct("3 + 5 = 8", (r"(?<![\d.-])(8|eight)(?![\d.])",))


def test_a_broken_eval_line_is_reported_by_line_number(tmp_path: Path) -> None:
    broken = tmp_path / "set.jsonl"
    good = {"id": "a", "question": "q", "reference": "r", "accept": ["r"]}
    broken.write_text(json.dumps(good) + "\n" + '{"id": "b", "question": "q"}\n')
    with pytest.raises(PipelineError, match=r"set.jsonl:2: not an evaluation item"):
        load_eval_set(broken)
    broken.write_text(json.dumps(good) + "\n\n")
    assert [item.id for item in load_eval_set(broken).items] == ["a"]


def _candidate(
    label: str, answers: list[str], correct: list[bool], latency: float
) -> CandidateResult:
    result = CandidateResult(label, load_seconds=1.0, peak_rss_mb=100.0)
    result.items = [
        ItemResult(f"i{n}", answer, ok, latency, None, 10, 5)
        for n, (answer, ok) in enumerate(zip(answers, correct, strict=True))
    ]
    return result


def test_summary_counts_errors_apart_and_parity_is_the_share_of_equal_answers() -> None:
    a = _candidate("a", ["x", "y", "z", "w"], [True, True, False, False], 2.0)
    b = _candidate("b", ["x", "y", "q", "w"], [True, True, True, False], 1.0)
    b.items[3].error, b.items[3].answer = "RuntimeError: boom", ""
    summary = answer_summary(b)
    assert summary["accuracy"] == 0.75
    assert summary["errors"] == 1
    assert summary["completion_tokens"] == 15
    assert summary["latency_p95_s"] == 1.0
    assert parity([a, b]) == 0.5


def test_a_twin_takes_answers_only_past_its_own_and_says_from_whom() -> None:
    fast = _candidate("onnx-fp32", ["x", "y", "z", "w"], [True, False, True, False], 0.5)
    slow = _candidate("transformers-fp32", ["x", "y"], [True, False], 2.0)
    assert same_answers(slow.items, fast.items[:2])
    take_shared_answers(slow, fast)
    assert [i.answer for i in slow.items] == ["x", "y", "z", "w"]
    assert [i.shared_from for i in slow.items] == [None, None, "onnx-fp32", "onnx-fp32"]
    assert not any(i.timed for i in slow.items[2:])  # its speed is its own two items'
    assert slow.asked == 2 and slow.shared_from == "onnx-fp32"
    assert answer_summary(slow)["accuracy"] == 0.5 and answer_summary(slow)["items_shared"] == 2
    plan = AskPlan(["transformers-fp32", "onnx-fp32"], ["transformers-fp32", "onnx-fp32"])
    results = {"transformers-fp32": slow, "onnx-fp32": fast}
    scores = {
        "transformers-fp32": {"kld_mean": 0.0, "top1_agreement": 1.0},
        "onnx-fp32": {"kld_mean": 4.5e-8, "top1_agreement": 1.0},
    }
    assert answered_by("transformers-fp32", plan, results, scores, "transformers-fp32") == (
        "2 asked, 2 shared from onnx-fp32 (same distribution: mean KLD 4.5e-08, top-1 1.000)"
    )
    assert answered_by("onnx-fp32", plan, results, scores, "transformers-fp32") == (
        "4 asked, shared with transformers-fp32"
    )
    # A different word, or an error, is a different answer: then nothing is shared.
    other = _candidate("transformers-fp32", ["x", "Y"], [True, False], 2.0)
    assert not same_answers(other.items, fast.items[:2])
    fast.items[0].error = "RuntimeError: boom"
    assert not same_answers(fast.items[:2], fast.items[:2])


def _evaluated(runtime: Runtime, precision: str, accuracy: float, tokens_per_s: float):
    summary = {"accuracy": accuracy, "tokens_per_s": tokens_per_s, "latency_p95_s": 2.0}
    model = LoggedChatModel(runtime, precision, f"models:/m-{runtime}-{precision}", "run")
    # Through candidates.json and back, as register reads them.
    entry = json.loads(json.dumps(EvaluatedModel(model, summary).to_dict()))
    return EvaluatedModel.from_dict(entry)


def pick(candidates: list[EvaluatedModel], how: Choice, gate) -> tuple[str, dict[str, str]]:
    """register.choose's label and verdicts among these candidates, against transformers-fp32."""
    summaries = {c.model.label: c.summary for c in candidates}
    runtimes = {c.model.label: c.model.runtime for c in candidates}
    return choose(summaries, runtimes, how, "transformers-fp32", gate)


def test_best_is_accuracy_first_then_speed() -> None:
    candidates = [
        _evaluated(Runtime.transformers, "fp32", 0.4, 15.0),
        _evaluated(Runtime.onnx, "fp32", 0.4, 20.0),
        _evaluated(Runtime.onnx, "int4", 0.3, 80.0),
    ]
    gate = compose_config([]).register

    def chosen(how: Choice, among=candidates) -> str:
        return pick(among, how, gate)[0]

    assert chosen(Choice.best) == "onnx-fp32"
    assert chosen(Choice.transformers) == "transformers-fp32"
    assert chosen(Choice.onnx) == "onnx-fp32"
    with pytest.raises(PipelineError, match="no such candidate"):
        chosen(Choice.transformers, candidates[2:])
    with pytest.raises(PipelineError, match="reference transformers-fp32 is not among"):
        chosen(Choice.fastest_faithful, candidates[2:])


def test_register_ranks_only_the_candidates_that_were_asked() -> None:
    asked = _evaluated(Runtime.transformers, "fp32", 0.3, 15.0)
    fidelity_only = {"kld_mean": 0.34, "top1_agreement": 0.69, "ppl_ratio": 1.32}
    int4 = LoggedChatModel(Runtime.onnx, "int4", "models:/m-int4", "run")
    not_asked = EvaluatedModel.from_dict(
        json.loads(json.dumps(EvaluatedModel(int4, fidelity_only, "", "not asked").to_dict()))
    )
    assert not_asked.answers == "not asked"
    gate = compose_config([]).register
    candidates = [asked, not_asked]
    assert pick(candidates, Choice.best, gate)[0] == asked.model.label
    with pytest.raises(PipelineError, match="every such candidate failed fidelity and was not"):
        pick(candidates, Choice.onnx, gate)
    chosen, verdicts = pick(candidates, Choice.fastest_faithful, gate)
    assert chosen == asked.model.label
    assert verdicts["onnx-int4"].startswith("not asked: failed fidelity (mean KLD 0.3400")


def test_gate_names_failed_thresholds_and_champion_goes_only_to_a_passing_better_model() -> None:
    gate = compose_config([]).register
    assert gate_failures({"accuracy": 0.4, "latency_p95_s": 3.0}, gate) == []
    failures = gate_failures({"accuracy": 0.1, "latency_p95_s": 99.0}, gate)
    assert len(failures) == 2 and "min_accuracy" in failures[0]
    champion = SimpleNamespace(
        version="1", tags={"metrics.accuracy": "0.4", "metrics.tokens_per_s": "20"}
    )
    better, worse = {"accuracy": 0.5, "tokens_per_s": 1.0}, {"accuracy": 0.4, "tokens_per_s": 10.0}
    assert alias_for(True, None, "1", worse) == "champion"
    assert alias_for(True, champion, "2", better) == "champion"
    assert alias_for(True, champion, "2", worse) == "challenger"
    assert alias_for(True, champion, "1", worse) == "champion"  # re-registering the champion
    assert alias_for(False, None, "1", better) == "challenger"


def test_evaluate_defaults_to_the_latest_wrap_runs(wrapped, compose) -> None:
    import mlflow

    from steps import evaluate

    cfg = compose(*wrapped.overrides, "evaluate.max_items=2", "evaluate.fidelity.scored_tokens=510")
    result = evaluate.main(cfg)
    # The sweep's other builds were never wrapped in this store: the two that were are found.
    assert {c.model_uri for c in result.candidates} == {wrapped.transformers_uri, wrapped.onnx_uri}
    assert [c.label for c in result.candidates] == ["transformers-fp32", "onnx-fp32"]
    assert result.metrics["parity"] == 1.0
    # The same greedy tokens by construction, so the same distributions to float precision.
    assert result.metrics["onnx-fp32.kld_mean"] < 1e-3
    assert result.metrics["onnx-fp32.top1_agreement"] >= 0.99
    assert result.metrics["onnx-fp32.scored_tokens"] == 510
    (run,) = mlflow.search_runs(
        filter_string="tags.`pipeline.step` = 'evaluate'", search_all_experiments=True,
        output_format="list", max_results=1, order_by=["attributes.start_time DESC"],
    )  # fmt: skip
    candidates = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/eval/candidates.json")
    assert [EvaluatedModel.from_dict(c).model for c in candidates] == result.candidates
    assert run.data.metrics["parity"] == 1.0
    assert run.data.tags["evaluate.dataset"] == "chat-basics-v2"
    assert run.data.tags["evaluate.reference"] == "transformers-fp32"
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {
        "chat-basics-v2", "fidelity-v1",
    }  # fmt: skip
    # Each candidate's summary is on its own LoggedModel, not as bare keys on the run.
    onnx = mlflow.get_logged_model(wrapped.onnx_uri.removeprefix("models:/"))
    assert {m.key for m in onnx.metrics} >= {"kld_mean", "top1_agreement", "accuracy"}
    assert "kld_mean" not in run.data.metrics


def test_a_wrap_run_recorded_before_the_runtime_names_is_refused_by_name(tracking_uri) -> None:
    client = MlflowClient()
    old = client.create_run(
        client.create_experiment("before"),
        tags={"pipeline.step": "wrap_onnx", "model.runtime": "onnxruntime-genai",
              "model.uri": "models:/m-0123"},
    )  # fmt: skip
    with pytest.raises(PipelineError, match=r"wrap_onnx\)$") as error:
        LoggedChatModel.from_run(client.get_run(old.info.run_id))
    assert old.info.run_id in str(error.value) and "'onnxruntime-genai'" in str(error.value)


def test_register_run_chooses_gates_and_names_without_mlflow(compose) -> None:
    candidates = [
        _evaluated(Runtime.transformers, "fp32", 0.4, 15.0),
        _evaluated(Runtime.onnx, "int4", 0.1, 80.0),
    ]
    result = register.run(compose("register.choose=onnx"), candidates, "transformers-fp32")
    assert result.chosen.model.label == "onnx-int4"
    assert result.registered_name == "smollm2-135m-onnx-cpu"
    assert result.gate.startswith("failed: accuracy 0.100 < min_accuracy")
    # fastest_faithful: the int4 model was never scored against the reference.
    passed = register.run(
        compose("model=phi3-mini-4k", "compute=k8s-cuda"), candidates, "transformers-fp32"
    )
    assert passed.gate == "passed" and passed.registered_name == "phi3-mini-4k-transformers-cuda"
    assert "not scored against the reference" in passed.verdicts["onnx-int4"]


def test_evaluate_run_needs_no_mlflow_run(wrapped, compose) -> None:
    import mlflow

    from steps import evaluate

    cfg = compose(
        *wrapped.overrides, "evaluate.max_items=3", "evaluate.timed_items=1",
        "evaluate.fidelity.scored_tokens=255", "evaluate.reference=onnx-fp32",
    )  # fmt: skip
    mlflow.set_tracking_uri(wrapped.tracking_uri)  # the store that holds the model
    onnx = LoggedChatModel(Runtime.onnx, "fp32", wrapped.onnx_uri, None)
    result = evaluate.run(cfg, [onnx])
    assert mlflow.active_run() is None
    assert [r.label for r in result.results] == ["onnx-fp32"]
    assert [item.timed for item in result.results[0].items] == [True, False, False]
    assert len(result.item_rows()) == 3 and "onnx-fp32.accuracy" in result.metrics
    assert result.metrics["onnx-fp32.scored_tokens"] == 255
    assert result.metrics["onnx-fp32.kld_mean"] == 0.0  # the reference against itself
    assert result.selection.chosen == "onnx-fp32"
    assert "parity" not in result.metrics  # one candidate: nothing to compare
