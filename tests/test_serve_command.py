"""`python -m steps serve` refuses what it cannot serve in one line, before loading anything."""

from __future__ import annotations

import subprocess
import sys

from steps.serving.processes import clean_env


def serve(tracking_uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "steps", "serve", "--port", "1", *args],
        env=clean_env(MLFLOW_TRACKING_URI=tracking_uri),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_an_unknown_variant_lists_the_valid_ones(tracking_uri: str) -> None:
    result = serve(tracking_uri, "--model", "no-such-variant")
    assert result.returncode != 0
    assert "no-such-variant" in result.stderr and "smollm2-135m" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_registry_without_a_champion_says_to_run_the_pipeline_first(tracking_uri: str) -> None:
    result = serve(tracking_uri)
    assert result.returncode != 0
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "smollm2-135m-onnx-cpu" in line and "make run" in line


def test_an_alias_that_does_not_exist_is_named(tracking_uri: str) -> None:
    result = serve(tracking_uri, "--model-uri", "models:/nothing@champion")
    assert result.returncode != 0
    assert "models:/nothing@champion" in result.stderr and "Traceback" not in result.stderr


def test_a_tracking_server_that_is_down_is_named_in_seconds() -> None:
    result = serve("http://127.0.0.1:9", "--model-uri", "models:/m@champion")
    assert result.returncode != 0
    assert "not reachable" in result.stderr and "Traceback" not in result.stderr
