"""How main decides reuse without starting a child process: the config hash it predicts for a
step must be the one the child run will log."""

from __future__ import annotations

import hashlib

import pytest

from steps.config.compose import compose_config, resolved_config_yaml
from steps.main import as_overrides, child_base_config, step_config_sha256, upstream_settings

UPSTREAM = {
    "fetch": "83131247e7264ed385b25a05203eb959",
    "wrap_transformers": "1e5",  # a run id that Hydra would read as a float unless quoted
    "wrap_onnx": "12345",
    "evaluate": "8e94b5364576481a9ecb724f77cab00d",
}
BASE = ["model=smollm2-135m", "compute=cpu", "fetch.cache_dir=/tmp/cache"]


@pytest.mark.parametrize(
    "step", ["fetch", "wrap_transformers", "wrap_onnx", "evaluate", "register"]
)
def test_predicted_config_hash_equals_the_childs(step: str) -> None:
    # main's own config, with its own options set: the children must not inherit them.
    parent = compose_config([*BASE, "main.steps=[evaluate,register]", "main.rerun=true"])
    settings = upstream_settings(step, UPSTREAM)
    predicted = step_config_sha256(child_base_config(parent), settings)
    child = compose_config(BASE + as_overrides(settings))
    assert predicted == hashlib.sha256(resolved_config_yaml(child).encode()).hexdigest()


def test_upstream_run_ids_reach_each_step_as_strings() -> None:
    evaluate = compose_config(BASE + as_overrides(upstream_settings("evaluate", UPSTREAM)))
    assert evaluate.evaluate.wrap_run_ids == ["1e5", "12345"]
    wrap = compose_config(BASE + as_overrides(upstream_settings("wrap_onnx", UPSTREAM)))
    assert wrap.wrap.fetch_run_id == UPSTREAM["fetch"]
    register = compose_config(BASE + as_overrides(upstream_settings("register", UPSTREAM)))
    assert register.register.evaluate_run_id == UPSTREAM["evaluate"]
