"""`mlflow run . -e fetch` as a user runs it, then the run read back from the tracking store."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import PROJECT_ROOT, WrappedModels, mlflow_run, project_env
from fake_hub import FakeHub
from mlflow import MlflowClient

from steps.sources.snapshots import FetchOutcome, materialize
from steps.store.manifest import Manifest
from steps.store.snapshot_store import SnapshotStore
from steps.tracking.lineage import manifest_of_run

pytestmark = pytest.mark.slow

TOKEN = "hf_e2eSecretTokenNeverLogged42"
GATED_REPO = "org/gated-model"
GATED_COMMIT = "7" * 40


def _only_run(experiment: str = "e2e"):
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    assert len(runs) == 1
    return runs[0]


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True)


def _git_dirty() -> str:
    status = _git("status", "--porcelain")
    return "unknown" if status.returncode else str(bool(status.stdout.strip())).lower()


def test_mlflow_run_fetch_records_what_was_fetched(
    wrapped: WrappedModels, bundled_fetch: FetchOutcome, session_cache: Path
) -> None:
    """`mlflow run . -e fetch` as the session's `wrapped` fixture ran it, after the session's
    first fetch had filled the cache."""
    mlflow.set_tracking_uri(wrapped.tracking_uri)
    run = wrapped.runs["fetch"]
    assert run.info.status == "FINISHED"
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert params["model"] == "smollm2-135m" and params["compute"] == "cpu"
    assert params["model.name"] == "smollm2-135m"
    assert params["model.source.sha256"] == bundled_fetch.manifest.source["sha256"]
    assert params["fetch.cache_dir"] == str(session_cache)
    assert tags["pipeline.step"] == "fetch"
    assert tags["git.commit"] == (_git("rev-parse", "HEAD").stdout.strip() or "unknown")
    assert tags["git.dirty"] == _git_dirty()
    assert tags["versions.mlflow"] == mlflow.__version__
    assert tags["versions.transformers"]
    assert len(tags["config.sha256"]) == 64
    assert tags["fetch.cache"] == "hit"
    assert tags["fetch.snapshot_id"] == bundled_fetch.manifest.snapshot_id
    assert metrics["cache_hit"] == 1.0
    assert metrics["snapshot_bytes"] == bundled_fetch.manifest.total_bytes

    manifest = manifest_of_run(run.info.run_id)
    assert manifest.snapshot_id == bundled_fetch.manifest.snapshot_id
    assert manifest.files == bundled_fetch.manifest.files
    config = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml"))
    assert config["model"]["name"] == "smollm2-135m"
    assert config["compute"]["onnx_provider"] == "cpu"

    # A later step, given only the run id, gets the same verified snapshot.
    materialized = materialize(manifest, SnapshotStore(session_cache))
    assert materialized.manifest.snapshot_id == manifest.snapshot_id


def test_mlflow_run_with_a_bad_variant_fails_before_any_work(tracking_uri: str) -> None:
    result = mlflow_run("-e", "fetch", "-P", "model=phi4", env=project_env(tracking_uri))
    assert result.returncode != 0
    assert "unknown model 'phi4': choose one of phi3-mini-128k, phi3-mini-4k" in result.stderr
    assert "Traceback" not in result.stderr


def test_hf_token_never_reaches_the_run_or_its_logs(tracking_uri: str, tmp_path: Path) -> None:
    files = {"config.json": b'{"model_type": "phi3"}', "chat_template.jinja": b"{{ messages }}"}
    repos = {GATED_REPO: {GATED_COMMIT: files}}
    with FakeHub(repos, gated={GATED_REPO}, valid_tokens={TOKEN}) as hub:
        overrides = (
            f"model.source.repo_id={GATED_REPO} model.source.revision={GATED_COMMIT} "
            f"fetch.cache_dir={tmp_path / 'cache'}"
        )
        env = project_env(tracking_uri, **hub.env(tmp_path / "hf-home", HF_TOKEN=TOKEN))
        result = mlflow_run(
            "-e", "fetch", "-P", "model=phi3-mini-4k", "-P", f"overrides={overrides}", env=env
        )
        authorized = [
            r for r in hub.requests if r.headers.get("authorization") == f"Bearer {TOKEN}"
        ]
    assert result.returncode == 0, result.stderr[-3000:]
    assert authorized, "the token was not used at all"
    assert TOKEN not in result.stdout + result.stderr

    run = _only_run()
    assert TOKEN not in json.dumps(run.data.params) + json.dumps(run.data.tags)
    artifacts = Path(
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "a"))
    )
    texts = [path.read_text() for path in artifacts.rglob("*") if path.is_file()]
    assert {"manifest.json", "config.yaml"} <= {p.name for p in artifacts.rglob("*")}
    assert all(TOKEN not in text for text in texts)
    manifest = Manifest.from_json((artifacts / "manifest.json").read_text())
    assert manifest.source["repo_id"] == GATED_REPO
    client = MlflowClient(tracking_uri)
    assert client.get_run(run.info.run_id).data.tags["fetch.cache"] == "miss"
