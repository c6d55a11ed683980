"""How main decides reuse without starting a child process: the config hash it predicts for a
step must be the one the child run will log."""

from __future__ import annotations

import pytest

from steps.config import plan
from steps.config.compose import (
    child_base_config,
    child_config_digest,
    compose_config,
    config_digest,
)
from steps.config.plan import Step, as_overrides, pipeline_steps, upstream_settings
from steps.main import MainResult, step_times

UPSTREAM = {
    "fetch": "83131247e7264ed385b25a05203eb959",
    "wrap_transformers": "1e5",  # a run id that Hydra would read as a float unless quoted
    "wrap_onnx.fp32": "12345",
    "wrap_onnx.int4-k_quant_last": "67890",
    "evaluate": "8e94b5364576481a9ecb724f77cab00d",
}
BASE = ["model=smollm2-135m", "compute=cpu", "fetch.cache_dir=/tmp/cache"]
STEPS = {step.name: step for step in pipeline_steps(compose_config(BASE))}
# The runs each step hands on, by step (as main keeps them).
UPSTREAM_RUNS = {STEPS[name]: run_id for name, run_id in UPSTREAM.items()}


@pytest.mark.parametrize("step", list(STEPS))
def test_predicted_config_hash_equals_the_childs(step: str) -> None:
    # main's own config, with its own options set: the children must not inherit them.
    parent = compose_config([*BASE, "main.steps=[evaluate,register]", "main.rerun=true"])
    settings = upstream_settings(STEPS[step], UPSTREAM_RUNS)
    predicted = child_config_digest(child_base_config(parent), settings)
    child = compose_config(BASE + as_overrides(settings))
    assert predicted == config_digest(child)  # the config.sha256 tag the child logs


def settings_of(step: Step) -> list[str]:
    return BASE + as_overrides(upstream_settings(step, UPSTREAM_RUNS))


def test_upstream_run_ids_reach_each_step_as_strings() -> None:
    evaluate = compose_config(settings_of(STEPS["evaluate"]))
    assert evaluate.evaluate.wrap_run_ids == ["1e5", "12345", "67890"]
    wrap = compose_config(settings_of(STEPS["wrap_onnx.int4-k_quant_last"]))
    assert wrap.wrap.fetch_run_id == UPSTREAM["fetch"]
    assert plan.wrap_onnx_build(wrap).name == "int4-k_quant_last"
    assert plan.wrap_onnx_build(wrap).options == {"algo_config": "k_quant_last"}
    register = compose_config(settings_of(STEPS["register"]))
    assert register.register.evaluate_run_id == UPSTREAM["evaluate"]


def test_both_sources_put_the_builds_and_the_prebuilt_export_side_by_side() -> None:
    cfg = compose_config(
        ["model=phi3-mini-4k", "wrap.onnx_source=both", "compute.onnx_candidates=[fp32,int8]"]
    )
    steps = pipeline_steps(cfg)
    assert [step.name for step in steps] == [
        "fetch", "fetch_onnx", "wrap_transformers", "wrap_onnx.fp32", "wrap_onnx.int8",
        "wrap_onnx", "evaluate", "register",
    ]  # fmt: skip
    by_name = {step.name: step for step in steps}
    upstream = {by_name["fetch"]: "weights-fetch", by_name["fetch_onnx"]: "export-fetch"}
    base = ["model=phi3-mini-4k", "wrap.onnx_source=both"]
    built = compose_config(
        base + as_overrides(upstream_settings(by_name["wrap_onnx.int8"], upstream))
    )
    assert (built.wrap.fetch_run_id, built.wrap.onnx_source.value) == ("weights-fetch", "build")
    assert plan.wrap_onnx_build(built).name == "int8"
    export = compose_config(base + as_overrides(upstream_settings(by_name["wrap_onnx"], upstream)))
    assert (export.wrap.fetch_run_id, export.wrap.onnx_source.value) == ("export-fetch", "prebuilt")


def test_a_wrap_onnx_run_alone_refuses_both_sources() -> None:
    from steps.errors import PipelineError

    cfg = compose_config(["model=phi3-mini-4k", "wrap.onnx_source=both"])
    with pytest.raises(PipelineError, match=r"use wrap\.onnx_source=build or prebuilt"):
        plan.wrap_onnx_fetch(cfg)


def test_main_says_each_steps_seconds_and_evaluates_phases() -> None:
    result = MainResult(
        {"fetch": "a", "wrap_transformers": "b", "evaluate": "c", "register": "d"},
        reused=["fetch"],
        seconds={"wrap_transformers": 14.04, "evaluate": 124.5, "register": 7.2},
    )
    phases = {"loading": 10.8, "fidelity": 30.9, "asking": 74.1, "logging": 1.4}
    assert step_times(result, phases) == (
        "steps: fetch reused, wrap_transformers 14.0 s, evaluate 124.5 s (loading 10.8, "
        "fidelity 30.9, asking 74.1, logging 1.4), register 7.2 s"
    )
