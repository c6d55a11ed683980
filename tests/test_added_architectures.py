"""Three architectures besides Llama and Phi-3 through the whole pipeline, as a user adds them:
Gemma 2 (alternating sliding window, logit soft-capping), Qwen3 (QK-norm, untied embeddings)
and SmolLM3 (no rope on every other layer). Each is a tiny checkpoint of the parity matrix
(tests/architectures.py) on the loopback Hub; `python -m steps add-model` writes its variant
into a copy of the project, `mlflow run` of that copy fetches, wraps both runtimes, evaluates
and registers it (the three at once, as scheduled jobs would run), and `python -m steps serve`
answers the official `openai` client with the champion."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import yaml
from architectures import FEATURES, write_checkpoint
from conftest import PROJECT_ROOT, PipelineJob, project_env, report_line, run_pipelines_at_once
from fake_hub import FakeHub, folder_files
from mlflow import MlflowClient

from steps.serving.processes import openai_server

ADDED = {
    "gemma2-tiny-it": "Gemma2ForCausalLM",
    "qwen3-tiny": "Qwen3ForCausalLM",
    "smollm3-tiny": "SmolLM3ForCausalLM",
}
OWNER = "tiny-random"
# Less work than the defaults (one ONNX build, a few items, short windows); a random model
# answers nothing right, so no accuracy floor.
FAST = (
    "compute.onnx_candidates=[fp32] evaluate.max_items=8 evaluate.timed_items=2 "
    "evaluate.fidelity.window=128 evaluate.fidelity.scored_tokens=126 "
    "evaluate.max_new_tokens=8 register.min_accuracy=0 main.parallel=true"
)
CARD = "---\nlicense: apache-2.0\n---\nA random tiny checkpoint made by tests/architectures.py.\n"
# What a copy of the project leaves out: environments, caches and local runs.
NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv", "mlruns", "*.db", "*.egg-info", "__pycache__", ".*_cache"
)


@dataclass(frozen=True)
class AddedRun:
    name: str
    architecture: str
    commit: str
    variant: dict  # the conf/model YAML add-model wrote
    added_output: str
    tracking_uri: str
    parent: mlflow.entities.Run

    def child(self, step: str) -> mlflow.entities.Run:
        client = MlflowClient(self.tracking_uri)
        return client.get_run(self.parent.data.tags[f"main.{step}.run_id"])


@pytest.fixture(scope="session")
def added_pipelines(bundled_fetch, tmp_path_factory) -> dict[str, AddedRun]:
    started = time.monotonic()
    root = tmp_path_factory.mktemp("added")
    repos, refs, commits = {}, {}, {}
    for name, architecture in ADDED.items():
        folder = write_checkpoint(FEATURES[architecture], bundled_fetch.model_dir, root / name)
        (folder / "README.md").write_text(CARD)
        commit = f"{len(commits) + 1:x}".rjust(40, "a")
        repos[f"{OWNER}/{name}"] = {commit: folder_files(folder)}
        refs[f"{OWNER}/{name}"] = {"main": commit}
        commits[name] = commit
    project = root / "project"
    shutil.copytree(PROJECT_ROOT, project, ignore=NOT_COPIED)
    with FakeHub(repos, refs) as hub:
        outputs, jobs = {}, {}
        for name in ADDED:
            tmp = root / f"{name}-run"
            tmp.mkdir()
            uri = f"sqlite:///{tmp / 'mlflow.db'}"
            env = project_env(uri, **hub.env(tmp / "hf", TMPDIR=str(tmp)))
            added = subprocess.run(
                [sys.executable, "-m", "steps", "add-model", f"{OWNER}/{name}"],
                cwd=project, env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert added.returncode == 0, added.stderr[-3000:]
            outputs[name] = added.stdout
            overrides = f"{FAST} fetch.cache_dir={tmp / 'cache'}"
            args = ("-P", f"model={name}", "-P", f"overrides={overrides}")
            jobs[name] = PipelineJob(uri, env, args, tmp / "mlflow-run.log", project)
        parents = run_pipelines_at_once(jobs)
    runs = {}
    for name, parent in parents.items():
        variant = yaml.safe_load((project / "conf" / "model" / f"{name}.yaml").read_text())
        runs[name] = AddedRun(
            name, ADDED[name], commits[name], variant, outputs[name], jobs[name].tracking_uri,
            parent,
        )  # fmt: skip
    report_line(f"three added architectures' pipelines: {time.monotonic() - started:.1f} s")
    return runs


@pytest.fixture(scope="module", params=sorted(ADDED))
def added(request, added_pipelines: dict[str, AddedRun]) -> AddedRun:
    return added_pipelines[request.param]


def test_add_model_pins_the_hub_commit_and_prints_the_run_command(added: AddedRun) -> None:
    source = added.variant["source"]
    assert source["repo_id"] == f"{OWNER}/{added.name}"
    assert source["revision"] == added.commit
    assert added.variant["license"] == "apache-2.0"
    assert f"-P model={added.name}" in added.added_output
    assert added.architecture in added.added_output


def test_the_pipeline_fetches_wraps_evaluates_and_registers(added: AddedRun) -> None:
    tags = added.parent.data.tags
    assert {"main.model_uri.transformers-fp32", "main.model_uri.onnx-fp32"} <= set(tags)
    manifest = mlflow.artifacts.download_artifacts(
        run_id=added.child("fetch").info.run_id,
        artifact_path="manifest.json",
        tracking_uri=added.tracking_uri,
    )
    source = json.loads(Path(manifest).read_text())["source"]
    assert (source["repo_id"], source["resolved_revision"]) == (
        f"{OWNER}/{added.name}",
        added.commit,
    )
    metrics = added.child("evaluate").data.metrics
    # The fp32 ONNX build is the transformers model, as the parity matrix says of this class.
    assert metrics["onnx-fp32.kld_mean"] < 1e-4
    assert metrics["onnx-fp32.top1_agreement"] == 1.0
    assert tags["main.registered"].endswith("@champion")


def test_the_champion_answers_the_openai_client_through_steps_serve(
    added: AddedRun, tmp_path: Path
) -> None:
    import openai

    name = added.parent.data.tags["main.registered"].partition(" v")[0]
    uri = f"models:/{name}@champion"
    with openai_server(uri, added.tracking_uri, tmp_path / "serve.log") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": "Name a colour."}],
            max_tokens=6,
        )
    choice = answer.choices[0]
    assert choice.finish_reason in {"stop", "length"}
    assert answer.usage.completion_tokens <= 6
    assert "<|im_" not in (choice.message.content or "")
