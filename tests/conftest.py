"""Shared fixtures: one snapshot store per test session (the bundled model is fetched and
converted once), a throwaway SQLite tracking store per test, composed configs, and one real
tracking server as teams run it (PostgreSQL, MLflow's basic-auth) with the whole pipeline run
against it (shared by the pipeline and serving tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from servers import (
    Credentials,
    Postgres,
    ServerSetup,
    TrackingServer,
    clean_env,
    postgres_cluster,
    tracking_server,
)

from steps import register
from steps.config.compose import compose_config
from steps.config.schema import PipelineConfig, Runtime
from steps.sources.snapshots import FetchOutcome, fetch_snapshot
from steps.store.snapshot_store import SnapshotStore

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Fixtures that convert the bundled model, build ONNX models or run `mlflow run`: every test
# that uses one, however indirectly, is `slow` (so `pytest -m "not slow"` builds nothing).
SLOW_FIXTURES = frozenset(
    {"bundled_fetch", "wrapped", "remote_pipeline", "phi3_checkpoints", "postgres"}
)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def mlflow_run_command(
    *args: str, env: dict[str, str], project: Path = PROJECT_ROOT, env_manager: str = "local"
) -> tuple[list[str], Path | None]:
    """`mlflow run` of the project, and the folder to run it in."""
    command = [sys.executable, "-m", "mlflow", "run", str(project), "--env-manager", env_manager]
    # `mlflow run` creates the experiment itself, and for a SQLite store MLflow puts its
    # artifacts under ./mlruns: run it beside the database, not in the checkout.
    uri = env["MLFLOW_TRACKING_URI"]
    cwd = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else None
    return [*command, *args], cwd


def mlflow_run(
    *args: str, env: dict[str, str], project: Path = PROJECT_ROOT, env_manager: str = "local"
) -> subprocess.CompletedProcess[str]:
    command, cwd = mlflow_run_command(*args, env=env, project=project, env_manager=env_manager)
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=2700)


def project_env(tracking_uri: str, **extra: str) -> dict[str, str]:
    """The caller's environment without MLflow or Hub settings, with this interpreter's
    environment first on PATH (`mlflow run` resolves `python` from there)."""
    return clean_env(MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_EXPERIMENT_NAME="e2e", **extra)


def conda_env() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "conda.yaml").read_text())


def conda_pip_requirements(conda: dict) -> list[str]:
    return [line for dep in conda["dependencies"] if isinstance(dep, dict) for line in dep["pip"]]


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The snapshot cache every test shares; LLM_TO_MLFLOW_TEST_CACHE reuses one across
    sessions (handy locally; CI starts empty)."""
    reused = os.environ.get("LLM_TO_MLFLOW_TEST_CACHE")
    return Path(reused) if reused else tmp_path_factory.mktemp("snapshot-cache")


@pytest.fixture(scope="session")
def bundled_fetch(session_cache: Path) -> FetchOutcome:
    """The bundled default model, fetched once per session (a miss on a fresh cache)."""
    cfg = compose_config([f"fetch.cache_dir={session_cache}"])
    return fetch_snapshot(
        cfg.model, cfg.compute.name, cfg.fetch.artifact, SnapshotStore(session_cache)
    )


@pytest.fixture
def compose() -> Callable[..., PipelineConfig]:
    def _compose(*overrides: str) -> PipelineConfig:
        return compose_config(list(overrides))

    return _compose


@pytest.fixture
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh SQLite tracking store for one test, exported as a user would."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    yield uri
    if mlflow.active_run():
        mlflow.end_run()


@dataclass(frozen=True)
class WrappedModels:
    tracking_uri: str
    fetch_run_id: str
    transformers_uri: str
    onnx_uri: str
    overrides: tuple[str, ...]  # what the steps ran with (cache and tracking store)


@pytest.fixture(scope="session")
def wrapped(
    bundled_fetch: FetchOutcome, session_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> WrappedModels:
    """fetch, wrap_transformers and wrap_onnx run once per session on the bundled model, with
    the default config, into a session tracking store."""
    from steps import fetch, wrap_onnx, wrap_transformers

    uri = f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}"
    overrides = (f"fetch.cache_dir={session_cache}", f"tracking.uri={uri}")
    cfg = compose_config(list(overrides))
    mlflow.set_tracking_uri(uri)
    fetch.main(cfg)
    transformers, onnx = wrap_transformers.main(cfg), wrap_onnx.main(cfg)
    return WrappedModels(
        tracking_uri=uri,
        fetch_run_id=transformers.tags["fetch.run_id"],
        transformers_uri=transformers.model.model_uri,
        onnx_uri=onnx.model.model_uri,
        overrides=overrides,
    )


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """The session's PostgreSQL cluster: each tracking server gets its own databases in it."""
    with postgres_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def tracking_admin() -> Iterator[Credentials]:
    """The admin of every tracking server the session starts. The tests and the processes they
    start log in as it, through MLflow's own MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD."""
    admin = Credentials.random("admin")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in admin.env().items():
            patch.setenv(name, value)
        yield admin


@pytest.fixture(scope="session")
def remote_tracking(
    postgres: Postgres, tracking_admin: Credentials, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TrackingServer]:
    """One real tracking server as teams run it (PostgreSQL, MLflow's basic-auth) for the
    session's end-to-end tests."""
    root = tmp_path_factory.mktemp("tracking-server")
    with tracking_server(ServerSetup.create(root, postgres, "mlflow", tracking_admin)) as server:
        yield server


@dataclass(frozen=True)
class PipelineRuns:
    server: TrackingServer
    cold: object  # the parent runs
    warm: object
    cold_seconds: float
    warm_seconds: float
    cache_override: str
    temp_dir: Path  # TMPDIR of both runs
    outputs: tuple[str, ...]  # what both runs printed


@pytest.fixture(scope="session")
def remote_pipeline(
    bundled_fetch, session_cache: Path, remote_tracking, tmp_path_factory: pytest.TempPathFactory
) -> PipelineRuns:
    """`mlflow run .` twice against the tracking server: cold, with the two wraps running at
    the same time (main.parallel=true), then sequential and reusing every step (main's options
    are not part of a step's inputs)."""
    override = f"fetch.cache_dir={session_cache}"
    temp_dir = tmp_path_factory.mktemp("pipeline-tmp")
    env = project_env(remote_tracking.uri, TMPDIR=str(temp_dir))
    seconds, outputs = [], []
    for overrides in (f"{override} main.parallel=true", override):
        started = time.monotonic()
        result = mlflow_run("-P", f"overrides={overrides}", env=env)
        seconds.append(time.monotonic() - started)
        outputs.append(result.stdout + result.stderr)
        assert result.returncode == 0, result.stderr[-4000:]
    cold, warm = MlflowClient(remote_tracking.uri).search_runs(
        [MlflowClient(remote_tracking.uri).get_experiment_by_name("e2e").experiment_id],
        filter_string="tags.`pipeline.step` = 'main'",
        order_by=["attributes.start_time ASC"],
    )
    print(f"\nmlflow run . cold {seconds[0]:.1f} s, warm {seconds[1]:.1f} s "
          f"({seconds[1] / seconds[0]:.1%})")  # fmt: skip
    return PipelineRuns(
        remote_tracking, cold, warm, seconds[0], seconds[1], override, temp_dir, tuple(outputs)
    )


# The registered models of the bundled model's pipeline on the cpu target, by runtime.
REGISTERED = {runtime.value: f"smollm2-135m-{runtime.value}-cpu" for runtime in Runtime}


@pytest.fixture(scope="session")
def champions(remote_pipeline: PipelineRuns) -> PipelineRuns:
    """The pipeline registered the ONNX model as champion; register the transformers one from
    the same evaluation too, so both runtimes are served from the registry."""
    register.main(
        compose_config(
            [
                remote_pipeline.cache_override,
                "register.choose=transformers",
                f"tracking.uri={remote_pipeline.server.uri}",
                "tracking.experiment=e2e",
            ]
        )
    )
    return remote_pipeline
