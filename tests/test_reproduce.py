"""Reproduce by git commit: the printed command composes the recorded config again, and run from
a throwaway repository it rebuilds the same bytes and the same greedy answers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import children
import mlflow
import pytest
from conftest import PROJECT_ROOT, mlflow_run, project_env
from mlflow import MlflowClient
from omegaconf import OmegaConf

from steps.config.compose import compose_config
from steps.errors import PipelineError
from steps.reproduce import config_overrides, default_config, reproduce_run
from steps.tracking.runs import step_run

QUESTIONS = ("What is the capital of France?", "What is 2 + 2?")


def _resolved(*overrides: str) -> dict:
    cfg = compose_config(list(overrides))
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("model=phi3-mini-4k", "compute=cuda", "generation=sampling", "fetch.cache_dir=/c"),
        (
            "+wrap.onnx_builder_options.algo_config=k_quant_last",
            "evaluate.wrap_run_ids=['0123','abc']",
            "main.steps=[fetch,wrap_onnx]",
            "main.rerun=true",
            "compute.onnx_precision=int8",
        ),
        ("tracking.experiment='it\\'s \\${not.an.interpolation} C:\\\\dir\\\\'",),
    ],
)
def test_overrides_compose_the_recorded_config_again(overrides: tuple[str, ...]) -> None:
    recorded = _resolved(*overrides)
    model, compute = recorded["model"]["name"], recorded["compute"]["name"]
    rebuilt = config_overrides(recorded, *default_config(model, compute))
    assert _resolved(f"model={model}", f"compute={compute}", *rebuilt) == recorded


def test_a_field_the_schema_has_dropped_since_the_run_is_set_not_added() -> None:
    """model.chat was a schema field (with a config group) until it was removed: at the run's
    commit it exists, so `+model.chat=...` would fail there."""
    recorded = _resolved("+wrap.onnx_builder_options.block_size=64")
    recorded["model"]["chat"] = {"template_style": "chatml", "supports_system_role": True}
    defaults, schema = default_config("smollm2-135m", "cpu")
    rebuilt = config_overrides(recorded, defaults, schema)
    assert "model.chat={template_style:'chatml',supports_system_role:true}" in rebuilt
    assert "+wrap.onnx_builder_options.block_size='64'" in rebuilt


def test_a_run_from_before_a_schema_field_existed_is_not_asked_to_remove_it() -> None:
    """At the run's commit the field does not exist, so `~field` would fail there; a removed
    entry of a free dict is still removed."""
    recorded = _resolved("model=phi3-mini-4k")
    del recorded["compute"]["onnx_threads"]  # added after such runs were recorded
    del recorded["model"]["prebuilt_onnx"]["cuda"]  # an entry, not a field
    defaults, schema = default_config("phi3-mini-4k", "cpu")
    rebuilt = config_overrides(recorded, defaults, schema)
    assert "~model.prebuilt_onnx.cuda" in rebuilt
    assert not any("onnx_threads" in override for override in rebuilt)


def test_command_names_commit_entry_point_and_config(compose, tracking_uri) -> None:
    cfg = compose("compute=cuda", "evaluate.max_items=3", "tracking.experiment=repro")
    with step_run("evaluate", cfg) as run:
        run_id = run.info.run_id
    reproduction = reproduce_run(run_id, env_manager="local")
    tags = mlflow.get_run(run_id).data.tags
    command = reproduction.command
    assert f"git clone --quiet {tags['git.repo']} " in command
    assert f'MLFLOW_TRACKING_URI={tracking_uri} mlflow run "$project" --version ' in command
    assert f"--version {tags['git.commit']} -e evaluate --experiment-name repro " in command
    assert "-P model=smollm2-135m -P compute=cuda" in command
    assert "evaluate.max_items=3" in command and "--env-manager local" in command
    assert bool(reproduction.warnings) == (tags["git.dirty"] != "false")


def test_an_unknown_run_is_a_clear_error(tracking_uri) -> None:
    with pytest.raises(PipelineError, match=r"cannot read run 0123abcd .* MLFLOW_TRACKING_URI"):
        reproduce_run("0123abcd")


def _git(repo: Path, *args: str) -> str:
    identity = ("-c", "user.name=test", "-c", "user.email=test@example.invalid")
    return subprocess.run(
        ["git", "-C", str(repo), *identity, *args], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture(scope="module")
def throwaway_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The project as it is on disk (uncommitted changes too), committed in a new repository."""
    repo = tmp_path_factory.mktemp("throwaway") / "llm-to-mlflow"
    listed = _git(PROJECT_ROOT, "ls-files", "--cached", "--others", "--exclude-standard", "-z")
    for name in filter(None, listed.split("\0")):
        source = PROJECT_ROOT / name
        if source.is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, repo / name)
    _git(repo, "init", "--quiet")
    _git(repo, "add", "--all")
    _git(repo, "commit", "--quiet", "--message", "throwaway snapshot of the project")
    return repo, _git(repo, "rev-parse", "HEAD")


def _greedy_answers(model_uri: str) -> list[str]:
    model = mlflow.pyfunc.load_model(model_uri)
    return [
        model.predict({"messages": [{"role": "user", "content": q}], "max_tokens": 24})[0][
            "choices"
        ][0]["message"]["content"]
        for q in QUESTIONS
    ]


@pytest.mark.slow
def test_reproduced_fetch_and_wrap_rebuild_the_same_bytes_and_answers(
    throwaway_repo, phi3_hub, tmp_path: Path
) -> None:
    """On the tiny Phi-3 checkpoint from the loopback Hub: a download and a build take seconds
    there, and prove the same as the real model's would."""
    repo, commit = throwaway_repo
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ("-P", "model=phi3-mini-4k", "-P", "overrides=wrap.onnx_source=build")
    original = {}
    env = project_env(
        uri, XDG_CACHE_HOME=str(tmp_path / "xdg-original"), **phi3_hub.env(tmp_path / "hf")
    )
    for step in ("fetch", "wrap_onnx"):
        result = mlflow_run("-e", step, *args, env=env, project=repo, bound=300)
        assert result.returncode == 0, result.stderr[-3000:]
        original[step] = _latest_run(uri, step)

    reproduced = {}
    # Empty caches: the reproduction downloads the weights and builds the ONNX model again.
    # TMPDIR: the printed command clones into `mktemp -d`, which would outlive the test.
    fresh_env = project_env(
        uri, XDG_CACHE_HOME=str(tmp_path / "xdg-fresh"), TMPDIR=str(tmp_path),
        **phi3_hub.env(tmp_path / "hf-fresh"),
    )  # fmt: skip
    for step in ("fetch", "wrap_onnx"):
        run_id = original[step].info.run_id
        printed = children.run(
            [sys.executable, "-m", "steps", "reproduce", run_id, "--env-manager", "local"],
            60, env=fresh_env, cwd=PROJECT_ROOT,
        )  # fmt: skip
        assert printed.returncode == 0, printed.stderr
        assert printed.stderr == "", printed.stderr  # a clean commit: no warning, no noise
        result = children.run(["bash", "-c", printed.stdout], 300, env=fresh_env)
        assert result.returncode == 0, result.stderr[-3000:]
        reproduced[step] = _latest_run(uri, step)

    mlflow.set_tracking_uri(uri)
    for step in ("fetch", "wrap_onnx"):
        before, after = original[step].data.tags, reproduced[step].data.tags
        assert reproduced[step].info.run_id != original[step].info.run_id
        assert before["git.commit"] == after["git.commit"] == commit
        assert after["mlflow.source.git.commit"] == commit
        assert after["git.dirty"] == "false"
        assert after["config.sha256"] == before["config.sha256"]
        assert {k: v for k, v in after.items() if k.startswith("versions.")} == {
            k: v for k, v in before.items() if k.startswith("versions.")
        }
    assert reproduced["fetch"].data.tags["fetch.cache"] == "miss"
    assert (
        reproduced["fetch"].data.tags["fetch.snapshot_id"]
        == original["fetch"].data.tags["fetch.snapshot_id"]
    )
    assert _artifact(reproduced["fetch"], "manifest.json") == _artifact(
        original["fetch"], "manifest.json"
    )
    assert _artifact(reproduced["wrap_onnx"], "onnx_manifest.json") == _artifact(
        original["wrap_onnx"], "onnx_manifest.json"
    )
    assert _greedy_answers(reproduced["wrap_onnx"].data.tags["model.uri"]) == _greedy_answers(
        original["wrap_onnx"].data.tags["model.uri"]
    )


def _latest_run(uri: str, step: str):
    (run,) = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("e2e").experiment_id],
        filter_string=f"tags.`pipeline.step` = '{step}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return run


def _artifact(run, path: str) -> str:
    return mlflow.artifacts.load_text(f"{run.info.artifact_uri}/{path}")
