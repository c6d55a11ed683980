"""Shared fixtures: one snapshot store per test session (the bundled model is fetched and
converted once), a throwaway SQLite tracking store per test, composed configs, the entry points
run once at default size into a session store, the Phi-3 family's tiny checkpoints on a loopback
Hub, and one real tracking server as teams run it (PostgreSQL, MLflow's basic-auth) with the
whole pipeline run against it at the real defaults (the suite's one end-to-end run of them,
shared by the pipeline, team-server, UI and serving tests)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import children
import mlflow
import pytest
import requests
import yaml
from fake_hub import FakeHub, Repos, folder_files
from mlflow import MlflowClient
from mlflow.entities import Run
from phi3_family import VARIANTS, Phi3Variant, write_checkpoint
from servers import (
    Credentials,
    Postgres,
    RestartableServer,
    ServerSetup,
    clean_env,
    postgres_cluster,
)

from steps import register
from steps.config.compose import compose_config
from steps.config.schema import PipelineConfig, Runtime
from steps.sources.snapshots import FetchOutcome, fetch_snapshot
from steps.store.snapshot_store import SnapshotStore
from steps.tracking.registry import registered_model_name

if TYPE_CHECKING:
    import openai

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


REPORT: list[str] = []


def report_line(line: str) -> None:
    """A line for the end of pytest's output (so in CI's log, passed or not): what the suite's
    big items took, so that the next regression shows there."""
    REPORT.append(line)


def pytest_terminal_summary(terminalreporter) -> None:
    if REPORT:
        terminalreporter.section("what the big items took")
        for line in REPORT:
            terminalreporter.write_line(line)


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
    *args: str, env: dict[str, str], project: Path = PROJECT_ROOT, env_manager: str = "local",
    bound: float = 600,
) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """`mlflow run` of the project to its end, killed past `bound` seconds (tests/children.py)."""
    command, cwd = mlflow_run_command(*args, env=env, project=project, env_manager=env_manager)
    return children.run(command, bound, env=env, cwd=cwd)


@dataclass(frozen=True)
class PipelineJob:
    """One `mlflow run` of a project among several started at once, into its own store."""

    tracking_uri: str
    env: dict[str, str]
    args: tuple[str, ...]
    log: Path
    project: Path = PROJECT_ROOT


def run_pipelines_at_once(jobs: dict[str, PipelineJob], bound: float = 600) -> dict[str, Run]:
    """Start every job's `mlflow run` (as scheduled jobs would run), wait for all, and return
    each one's `main` run; a job that fails fails the caller with its log's tail."""
    running = {}
    for name, job in jobs.items():
        command, cwd = mlflow_run_command(*job.args, env=job.env, project=job.project)
        running[name] = children.start(command, job.log, env=job.env, cwd=cwd)
    with children.reaped(list(running.values())):
        codes = {name: children.wait(p, bound, jobs[name].log) for name, p in running.items()}
    parents = {}
    for name, job in jobs.items():
        assert codes[name] == 0, f"{name}: mlflow run failed:\n{job.log.read_text()[-4000:]}"
        client = MlflowClient(job.tracking_uri)
        experiment = client.get_experiment_by_name("e2e").experiment_id
        (parents[name],) = client.search_runs([experiment], "tags.`pipeline.step` = 'main'")
    return parents


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
    return fetch_configured(cfg, SnapshotStore(session_cache))


def fetch_configured(cfg: PipelineConfig, store: SnapshotStore) -> FetchOutcome:
    """`fetch_snapshot` of the model, compute target and artifact a composed config names, into
    `store`: what the fetch step fetches, without its MLflow run."""
    return fetch_snapshot(cfg.model, cfg.compute.name, cfg.fetch.artifact, store)


@pytest.fixture
def compose() -> Callable[..., PipelineConfig]:
    def _compose(*overrides: str) -> PipelineConfig:
        return compose_config(list(overrides))

    return _compose


@pytest.fixture
def loopback_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., FakeHub]]:
    """Starts a loopback Hub (tests/fake_hub.py) with the repos given, and points this
    process's huggingface_hub client at it, its HF_HOME at `tmp_path / "hf-home"`
    (`FakeHub.patch_client`); every Hub it started stops when the test ends."""
    with contextlib.ExitStack() as started:

        def start(
            repos: Repos, refs: dict[str, dict[str, str]] | None = None, **options
        ) -> FakeHub:
            hub = started.enter_context(FakeHub(repos, refs, **options))
            hub.patch_client(monkeypatch, tmp_path / "hf-home")
            return hub

        yield start


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
    runs: dict[str, Run]  # fetch, wrap_transformers, wrap_onnx: as `mlflow run -e` left them
    overrides: tuple[str, ...]  # what the steps ran with (cache, tracking store, experiment)

    @property
    def fetch_run_id(self) -> str:
        return self.runs["fetch"].info.run_id

    @property
    def transformers_uri(self) -> str:
        return self.runs["wrap_transformers"].data.tags["model.uri"]

    @property
    def onnx_uri(self) -> str:
        return self.runs["wrap_onnx"].data.tags["model.uri"]


@pytest.fixture(scope="session")
def wrapped(
    bundled_fetch: FetchOutcome, session_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> WrappedModels:
    """`mlflow run . -e fetch`, `-e wrap_transformers` and `-e wrap_onnx` as a user runs them,
    once per session on the bundled model with the default config, into a session tracking
    store: the entry-point tests read these runs, the wrap and evaluate tests use their models."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}"
    env = project_env(uri)
    override = f"fetch.cache_dir={session_cache}"
    steps = ("fetch", "wrap_transformers", "wrap_onnx")
    for step in steps:
        result = mlflow_run("-e", step, "-P", f"overrides={override}", env=env)
        assert result.returncode == 0, (step, result.stderr[-3000:])
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("e2e").experiment_id
    runs = {}
    for step in steps:
        (runs[step],) = client.search_runs([experiment], f"tags.`pipeline.step` = '{step}'")
    overrides = (override, f"tracking.uri={uri}", "tracking.experiment=e2e")
    return WrappedModels(uri, runs, overrides)


@dataclass(frozen=True)
class Phi3Checkpoint:
    variant: Phi3Variant
    folder: Path  # the weights' file set
    export: Path  # the int4 CPU export's folder


@pytest.fixture(scope="session")
def phi3_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Phi3Checkpoint]:
    """One tiny checkpoint and one int4 export per Phi-3 variant (tests/phi3_family.py), made
    once per session: where the real model's size proves nothing, the pipelines run these."""
    from steps.onnx.build import build_inputs, build_onnx

    root = tmp_path_factory.mktemp("phi3")
    made = {}
    for name, variant in VARIANTS.items():
        folder = write_checkpoint(variant, root / name)
        # The export's folder name says what Microsoft built; the builder makes RTN here (AWQ
        # needs calibration data), with the block size the name says.
        block = variant.cpu_export.subfolder.split("block-")[1].split("-")[0]
        options = {"block_size": block} if block != "32" else {}
        inputs = build_inputs(f"phi3-test-{name}", "int4", "cpu", options)
        export = build_onnx(name, folder, inputs, SnapshotStore(root / "exports"))
        made[name] = Phi3Checkpoint(variant, folder, export.model_dir)
    return made


@pytest.fixture(scope="session")
def phi3_hub(phi3_checkpoints: dict[str, Phi3Checkpoint]) -> Iterator[FakeHub]:
    """The loopback Hub serving each variant's checkpoint at its pinned repo and revision, and
    its int4 export under the real prebuilt subfolder at the export repo's pin."""
    repos, refs = {}, {}
    for checkpoint in phi3_checkpoints.values():
        v = checkpoint.variant
        repos[v.repo_id] = {v.revision: folder_files(checkpoint.folder)}
        export = v.cpu_export
        repos[export.repo_id] = {
            export.revision: folder_files(checkpoint.export, f"{export.subfolder}/")
            | {"cuda/cuda-int4-rtn-block-32/model.onnx": b"not for this target"}
        }
        refs[v.repo_id] = {"main": v.revision}
    with FakeHub(repos, refs) as hub:
        yield hub


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
) -> Iterator[RestartableServer]:
    """One real tracking server as teams run it (PostgreSQL, MLflow's basic-auth) for the
    session's end-to-end tests; the session pipeline kills and restarts it."""
    root = tmp_path_factory.mktemp("tracking-server")
    server = RestartableServer(ServerSetup.create(root, postgres, "mlflow", tracking_admin))
    yield server
    server.close()


# The step the session pipeline's server is killed in: it uploads hundreds of MB there.
UPLOADING = "logging the onnx chat model"


@dataclass(frozen=True)
class LostServer:
    """The session pipeline's server, killed twice while a wrap_onnx uploaded its model."""

    down_seconds: float  # the cold run's server was away this long, and the run rode it out
    statuses_after_cold: frozenset[str]  # of every run in the experiment
    lone_step_output: str  # a wrap_onnx alone whose server stayed away past its retries
    lone_step_run: Run  # its run, read once the server was back
    lone_step_models: tuple[str, ...]  # the status of each LoggedModel that run began


@dataclass(frozen=True)
class PipelineRuns:
    server: RestartableServer
    cold: Run  # the parent runs
    warm: Run
    cold_seconds: float
    warm_seconds: float
    cache_override: str
    temp_dir: Path  # TMPDIR of both runs
    outputs: tuple[str, ...]  # what both runs printed
    lost: LostServer


def _lose_the_server_mid_upload(server: RestartableServer, process, log: Path) -> float:
    """Kill the server as the child starts uploading a model; bring it back 5 s later. Returns
    how long it was away."""
    children.wait_for_line(log, UPLOADING, process)
    went = server.kill()
    time.sleep(5)
    server.start()
    return time.monotonic() - went


@pytest.fixture(scope="session")
def remote_pipeline(
    bundled_fetch, session_cache: Path, remote_tracking: RestartableServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> PipelineRuns:  # fmt: skip
    """`mlflow run .` on the real defaults against the team's server, twice, and its server
    lost in between, as a crashed pod is:

    1. cold, the wraps at the same time (main.parallel=true); the server killed as a wrap_onnx
       starts uploading and back 5 s later, which MLflow's client retries ride out;
    2. a wrap_onnx alone whose server is killed mid-upload and stays away past its (lowered)
       retry budget: it must fail in one line, and what it began stay unfinished;
    3. warm, sequential, with the server back: every step reused (main's options are not part
       of a step's inputs)."""
    server = remote_tracking
    override = f"fetch.cache_dir={session_cache}"
    temp_dir = tmp_path_factory.mktemp("pipeline-tmp")
    logs = tmp_path_factory.mktemp("pipeline-logs")
    env = project_env(server.uri, TMPDIR=str(temp_dir))
    client = MlflowClient(server.uri)

    command, _ = mlflow_run_command("-P", f"overrides={override} main.parallel=true", env=env)
    started = time.monotonic()
    cold_run = children.start(command, logs / "cold.log", env=env, cwd=logs)
    down_seconds = _lose_the_server_mid_upload(server, cold_run, logs / "cold.log")
    code = children.wait(cold_run, 1800, logs / "cold.log")
    cold_seconds, cold_output = time.monotonic() - started, (logs / "cold.log").read_text()
    assert code == 0, cold_output[-4000:]
    experiment = client.get_experiment_by_name("e2e").experiment_id
    statuses = frozenset(r.info.status for r in client.search_runs([experiment]))
    (cold,) = client.search_runs([experiment], "tags.`pipeline.step` = 'main'")

    # In an experiment of its own: what it leaves unfinished stays out of the pipeline's pages.
    lone = children.start(
        [sys.executable, "-m", "steps", "wrap_onnx", "--overrides",
         f"{override} wrap.fetch_run_id='{cold.data.tags['main.fetch.run_id']}'"],
        logs / "lone-wrap_onnx.log", cwd=PROJECT_ROOT,
        env=env | {"MLFLOW_EXPERIMENT_NAME": "lost-server", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"},
    )  # fmt: skip
    children.wait_for_line(logs / "lone-wrap_onnx.log", UPLOADING, lone)
    server.kill()
    assert children.wait(lone, 300, logs / "lone-wrap_onnx.log") != 0
    server.start()
    lost_experiment = client.get_experiment_by_name("lost-server").experiment_id
    (lone_run,) = client.search_runs([lost_experiment])
    lone_models = client.search_logged_models(
        [lost_experiment], f"source_run_id = '{lone_run.info.run_id}'"
    )

    started = time.monotonic()
    warm = mlflow_run("-P", f"overrides={override}", env=env, bound=600)
    warm_seconds, warm_output = time.monotonic() - started, warm.stdout + warm.stderr
    assert warm.returncode == 0, warm.stderr[-4000:]

    _, warm_parent = client.search_runs(
        [experiment], "tags.`pipeline.step` = 'main'", order_by=["attributes.start_time ASC"]
    )
    lost = LostServer(
        down_seconds, statuses, (logs / "lone-wrap_onnx.log").read_text(), lone_run,
        tuple(str(model.status) for model in lone_models),
    )  # fmt: skip
    report_line(
        f"session pipeline (real defaults, {server.uri}): cold {cold_seconds:.1f} s, warm "
        f"{warm_seconds:.1f} s; server down {down_seconds:.1f} s mid-upload"
    )
    report_line(f"  cold {_steps_line(cold_output)}")
    return PipelineRuns(
        server, cold, warm_parent, cold_seconds, warm_seconds, override, temp_dir,
        (cold_output, warm_output), lost,
    )  # fmt: skip


def _steps_line(output: str) -> str:
    """The line main prints with each step's seconds."""
    lines = (line.strip() for line in output.splitlines())
    return next((line for line in lines if line.startswith("steps: ")), "(no steps line)")


# The registered models of the bundled model's pipeline on the cpu target, by runtime.
REGISTERED = {
    runtime.value: registered_model_name("smollm2-135m", runtime, "cpu") for runtime in Runtime
}


@dataclass(frozen=True)
class Served:
    """A champion served on a loopback port: by `mlflow models serve` (`post` to its
    /invocations) or by `python -m steps serve` (the official `openai` client, /health)."""

    runtime: str
    url: str
    model_id: str  # the registered model's name

    def post(self, body: dict | bytes, content_type: str = "application/json"):
        payload = {"data": body} if isinstance(body, bytes) else {"json": body}
        return requests.post(
            f"{self.url}/invocations",
            headers={"Content-Type": content_type},
            timeout=300,
            **payload,
        )

    def client(self, **options) -> openai.OpenAI:
        import openai  # seconds to import: only where a test asks for it

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **options)

    def health(self) -> dict:
        return requests.get(f"{self.url}/health", timeout=10).json()


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
