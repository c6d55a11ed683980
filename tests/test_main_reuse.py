"""How main decides reuse without starting a child process: the config hash it predicts for a
step must be the one the child run will log."""

from __future__ import annotations

import hashlib

import pytest

from steps.config.compose import compose_config, resolved_config_yaml
from steps.main import (
    Step,
    as_overrides,
    child_base_config,
    pipeline_steps,
    step_config_sha256,
    upstream_settings,
)

UPSTREAM = {
    "fetch": "83131247e7264ed385b25a05203eb959",
    "wrap_transformers": "1e5",  # a run id that Hydra would read as a float unless quoted
    "wrap_onnx.fp32": "12345",
    "wrap_onnx.int4-k_quant_last": "67890",
    "evaluate": "8e94b5364576481a9ecb724f77cab00d",
}
BASE = ["model=smollm2-135m", "compute=cpu", "fetch.cache_dir=/tmp/cache"]
STEPS = {step.name: step for step in pipeline_steps(compose_config(BASE))}


@pytest.mark.parametrize("step", list(STEPS))
def test_predicted_config_hash_equals_the_childs(step: str) -> None:
    # main's own config, with its own options set: the children must not inherit them.
    parent = compose_config([*BASE, "main.steps=[evaluate,register]", "main.rerun=true"])
    settings = upstream_settings(STEPS[step], UPSTREAM)
    predicted = step_config_sha256(child_base_config(parent), settings)
    child = compose_config(BASE + as_overrides(settings))
    assert predicted == hashlib.sha256(resolved_config_yaml(child).encode()).hexdigest()


def settings_of(step: Step) -> list[str]:
    return BASE + as_overrides(upstream_settings(step, UPSTREAM))


def test_upstream_run_ids_reach_each_step_as_strings() -> None:
    evaluate = compose_config(settings_of(STEPS["evaluate"]))
    assert evaluate.evaluate.wrap_run_ids == ["1e5", "12345", "67890"]
    wrap = compose_config(settings_of(STEPS["wrap_onnx.int4-k_quant_last"]))
    assert wrap.wrap.fetch_run_id == UPSTREAM["fetch"]
    assert wrap.onnx_build.name == "int4-k_quant_last"
    assert wrap.onnx_build.options == {"algo_config": "k_quant_last"}
    register = compose_config(settings_of(STEPS["register"]))
    assert register.register.evaluate_run_id == UPSTREAM["evaluate"]
