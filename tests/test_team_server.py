"""The pipeline against a team's tracking server: PostgreSQL behind MLflow's basic-auth app,
users with less than EDIT, pipelines that overlap, and a server that restarts mid-step.

Credentials are MLflow's own environment variables; every server here is a real `mlflow server`
process on a real PostgreSQL cluster (tests/servers.py)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, REGISTERED, PipelineRuns, mlflow_run_command
from mlflow import MlflowClient
from mlflow.server import get_app_client
from servers import Credentials, Postgres, ServerSetup, TrackingServer, tracking_server

from steps.register import beats
from steps.tracking.registry import LOCK_SUFFIX

ENTRY_POINTS = ("fetch", "wrap_transformers", "wrap_onnx", "evaluate", "register", "main")
# Less work than the defaults (one ONNX build, a few items, a short fidelity text); the gate
# still applies, with room for three pipelines sharing two cores.
FAST = (
    "evaluate.max_items=6 evaluate.timed_items=2 evaluate.fidelity.scored_tokens=255 "
    "evaluate.max_new_tokens=8 register.min_accuracy=0 register.max_p95_latency_s=600"
)


def create_user(server: TrackingServer, name: str) -> Credentials:
    """A user with the server's default permission (READ on everything) as admin makes one."""
    credentials = Credentials.random(name)
    get_app_client("basic-auth", tracking_uri=server.uri).create_user(name, credentials.password)
    return credentials


def steps_command(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "steps", *args],
        env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return result, time.monotonic() - started


def one_line_error(result: subprocess.CompletedProcess, entry: str) -> str:
    """The error line a refused step ends with; there is no traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {entry}: "), result.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def seconds_to_refusal() -> Iterator[dict[str, float]]:
    seconds: dict[str, float] = {}
    yield seconds
    if seconds:
        print(f"\nwrong password to the error: at most {max(seconds.values()):.1f} s {seconds}")


@pytest.mark.parametrize("entry", [*ENTRY_POINTS, "serve", "reproduce"])
def test_a_wrong_password_stops_every_entry_point_in_seconds(
    remote_pipeline: PipelineRuns, entry: str, seconds_to_refusal: dict[str, float]
) -> None:
    server = remote_pipeline.server
    env = server.env(MLFLOW_TRACKING_PASSWORD="not-" + server.admin.password)
    args = {"serve": ["serve"], "reproduce": ["reproduce", remote_pipeline.cold.info.run_id]}
    result, seconds = steps_command(*args.get(entry, [entry]), env=env)
    line = one_line_error(result, entry)
    assert f"{server.uri} refused user 'admin' (not authenticated)" in line
    assert "MLFLOW_TRACKING_PASSWORD" in line and server.admin.password not in result.stderr
    assert seconds < 30
    seconds_to_refusal[entry] = round(seconds, 1)


def test_mlflow_run_with_a_wrong_password_fails_fast_on_mlflow_s_own_401(
    remote_tracking: TrackingServer,
) -> None:
    """`mlflow run` creates the run before any entry point starts: MLflow's CLI meets the
    refusal first, with its own traceback, whose last line names the 401."""
    env = remote_tracking.env(
        MLFLOW_TRACKING_PASSWORD="wrong-password", MLFLOW_EXPERIMENT_NAME="e2e"
    )
    command, _ = mlflow_run_command("-e", "fetch", env=env)
    started = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and time.monotonic() - started < 60
    assert "error code 401" in result.stderr.strip().splitlines()[-1]


def test_a_reader_of_the_experiment_is_refused_when_the_run_opens(
    remote_pipeline: PipelineRuns,
) -> None:
    server = remote_pipeline.server
    reader = create_user(server, "experiment-reader")
    env = server.env(**reader.env(), MLFLOW_EXPERIMENT_NAME="e2e")
    result, seconds = steps_command("fetch", "--overrides", remote_pipeline.cache_override, env=env)
    line = one_line_error(result, "fetch")
    assert "denied user 'experiment-reader'" in line
    assert "EDIT permission on experiment 'e2e'" in line
    assert seconds < 30


def registry_state(client: MlflowClient, name: str) -> tuple[list, dict]:
    model = client.get_registered_model(name)
    versions = sorted(
        (v.version, v.description) for v in client.search_model_versions(f"name='{name}'")
    )
    return versions, dict(model.aliases)


def test_a_reader_of_the_registered_model_registers_nothing(
    remote_pipeline: PipelineRuns,
) -> None:
    """EDIT on the experiment, READ on the registered model: the pipeline's steps run, and
    register stops with one line, the registry as it was and its lock released."""
    server = remote_pipeline.server
    client = MlflowClient(server.uri)
    writer = create_user(server, "model-reader")
    experiment = client.get_experiment_by_name("e2e").experiment_id
    get_app_client("basic-auth", tracking_uri=server.uri).grant_user_permission(
        writer.username, "experiment", experiment, "EDIT"
    )
    name = REGISTERED["onnx"]
    before = registry_state(client, name)
    env = server.env(**writer.env(), MLFLOW_EXPERIMENT_NAME="e2e")
    result, _ = steps_command("register", "--overrides", remote_pipeline.cache_override, env=env)
    line = one_line_error(result, "register")
    assert "denied user 'model-reader'" in line
    assert f"EDIT permission on registered model '{name}'" in line
    assert registry_state(client, name) == before
    assert not client.search_registered_models(f"name = '{name}{LOCK_SUFFIX}'")


def test_credentials_reach_no_param_tag_artifact_card_or_log(
    remote_pipeline: PipelineRuns, postgres: Postgres
) -> None:
    """The admin's password ran the whole pipeline: it is nowhere in the tracking store (runs,
    params, tags, model cards), the artifacts, the server's log, the pipeline's output or the
    command reproduce prints."""
    server = remote_pipeline.server
    password = server.admin.password
    result, _ = steps_command("reproduce", remote_pipeline.cold.info.run_id, env=server.env())
    assert result.returncode == 0, result.stderr
    haystacks = {
        "tracking store": postgres.dump(server.setup.database),
        "auth store": postgres.dump(f"{server.setup.database}_auth"),
        "server log": server.log.read_text(errors="replace"),
        "pipeline output": "\n".join(remote_pipeline.outputs),
        "reproduce": result.stdout + result.stderr,
    }
    found = [where for where, text in haystacks.items() if password in text]
    files = [path for path in server.artifacts.rglob("*") if path.is_file()]
    found += [str(path) for path in files if password.encode() in path.read_bytes()]
    print(f"\npassword searched in {len(haystacks) + len(files)} places, found in {len(found)}")
    assert found == []
    assert len(files) > 50  # the artifacts were really searched
    # The search finds the password where it does live: the server's own environment.
    assert password.encode() in Path(f"/proc/{server.process.pid}/environ").read_bytes()


# --- overlapping pipelines -------------------------------------------------------------------


@dataclass(frozen=True)
class Pipeline:
    label: str
    overrides: str
    process: subprocess.Popen
    log: Path


def start_pipeline(label: str, overrides: str, env: dict[str, str], logs: Path) -> Pipeline:
    """`mlflow run .` started as a scheduler would: its own process, output to a file."""
    command, _ = mlflow_run_command("-P", f"overrides={overrides}", env=env)
    log = logs / f"{label}.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            command, env=env, cwd=logs, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    return Pipeline(label, overrides, process, log)


def finish(pipeline: Pipeline, timeout: float = 1500) -> str:
    try:
        pipeline.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(pipeline.process.pid, signal.SIGKILL)
        raise
    return pipeline.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def overlap_server(
    postgres: Postgres, tracking_admin: Credentials, tmp_path_factory
) -> Iterator[TrackingServer]:
    root = tmp_path_factory.mktemp("overlap-server")
    setup = ServerSetup.create(root, postgres, "overlap", tracking_admin)
    with tracking_server(setup) as server:
        yield server


def sequential_champions(registers: list, summaries: dict[str, dict], tags: dict) -> set[str]:
    """The champion after each order of the register runs, one after another, that makes
    exactly the decisions they recorded (the champion each saw, the alias each gave); empty when
    no order does, as when two registers interleave."""
    finals = set()
    for order in itertools.permutations(registers):
        champion = None
        for run in order:
            recorded = run.data.tags
            if recorded["register.champion_before"] != (champion or "none"):
                break
            version = recorded["register.version"]
            if recorded["register.gate"] != "passed":
                alias = "challenger"
            elif champion in (None, version):
                alias = "champion"
            else:
                beaten = beats(summaries[run.info.run_id], tags[champion])
                alias = "champion" if beaten else "challenger"
            if alias != recorded["register.alias"]:
                break
            champion = version if alias == "champion" else champion
        else:
            finals.add(champion)
    return finals


def test_three_overlapping_pipelines_end_as_if_run_one_after_another(
    overlap_server: TrackingServer, bundled_fetch, session_cache: Path, tmp_path: Path
) -> None:
    """The same pipeline twice and a second variant (another ONNX build, registering into the
    same registered models), started at once against one server."""
    cache = f"fetch.cache_dir={session_cache}"
    env = overlap_server.env(MLFLOW_EXPERIMENT_NAME="overlap", TMPDIR=str(tmp_path))
    # The schedules' experiment exists (`mlflow run` creates a missing one without minding a
    # concurrent create: the very first runs of an experiment must not overlap).
    MlflowClient(overlap_server.uri).create_experiment("overlap")
    pipelines = [
        start_pipeline(label, f"{cache} {FAST} compute.onnx_candidates=[{build}]", env, tmp_path)
        for label, build in (("nightly", "int8"), ("manual", "int8"), ("variant", "fp32"))
    ]
    outputs = {p.label: finish(p) for p in pipelines}
    failed = {p.label: outputs[p.label][-3000:] for p in pipelines if p.process.returncode}
    assert failed == {}

    client = MlflowClient(overlap_server.uri)
    experiment = client.get_experiment_by_name("overlap").experiment_id
    runs = client.search_runs([experiment], max_results=1000)
    mains = [r for r in runs if r.data.tags["pipeline.step"] == "main"]
    starts = sorted(r.info.start_time for r in mains)
    held_at_once = sum(1 for r in mains if r.info.end_time > starts[-1])
    assert len(mains) == 3 and held_at_once == 3
    # A step two pipelines could share was computed once or twice, never half.
    assert {r.info.status for r in runs} == {"FINISHED"}
    by_inputs: dict[tuple, int] = {}
    for r in runs:
        if "config.sha256" in r.data.tags:  # not evaluate's nested runs
            key = (r.data.tags["pipeline.step"], r.data.tags["config.sha256"])
            by_inputs[key] = by_inputs.get(key, 0) + 1
    assert max(by_inputs.values()) <= 2

    registers = [r for r in runs if r.data.tags["pipeline.step"] == "register"]
    assert len(registers) == 3
    summaries = {}
    for r in registers:
        evaluate_run = r.data.params["register.evaluate_run_id"]
        local = client.download_artifacts(evaluate_run, "eval/candidates.json", str(tmp_path))
        candidates = json.loads(Path(local).read_text())
        chosen = r.data.tags["register.chosen"]
        summaries[r.info.run_id] = next(c["summary"] for c in candidates if c["label"] == chosen)
    duplicates = 0
    for name in {r.data.tags["register.model_name"] for r in registers}:
        versions = client.search_model_versions(f"name = '{name}'")
        keys = [v.tags["model.key"] for v in versions]
        duplicates += len(keys) - len(set(keys))
        tags = {v.version: v.tags for v in versions}
        mine = [r for r in registers if r.data.tags["register.model_name"] == name]
        finals = sequential_champions(mine, summaries, tags)
        assert finals, [r.data.tags for r in mine]
        assert client.get_registered_model(name).aliases.get("champion") in finals
        assert not client.search_registered_models(f"name = '{name}{LOCK_SUFFIX}'")
    assert duplicates == 0
    print(
        f"\noverlap: {len(mains)} pipelines held at once {held_at_once}, failed 0, duplicate "
        f"versions {duplicates}, steps computed twice "
        f"{sum(1 for n in by_inputs.values() if n == 2)}, champion replays sequentially"
    )


# --- a server that restarts --------------------------------------------------------------------


def wait_for_line(log: Path, text: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} not in {log} after {timeout} s"
        time.sleep(0.2)


def kill(server: TrackingServer) -> None:
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait()


def test_a_server_killed_during_wrap_onnx(
    postgres: Postgres, tracking_admin: Credentials, bundled_fetch, session_cache: Path,
    tmp_path_factory, tmp_path: Path,
) -> None:  # fmt: skip
    """Killed as wrap_onnx uploads its model and back within MLflow's retry budget, the pipeline
    rides it out (and its log says it retried); killed for longer than a step's budget, the step
    fails with one line, and the next `mlflow run .` reuses what finished and completes. Nothing
    is half-registered."""
    root = tmp_path_factory.mktemp("restart-server")
    setup = ServerSetup.create(root, postgres, "restart", tracking_admin)
    env = setup.env(MLFLOW_EXPERIMENT_NAME="restart", TMPDIR=str(tmp_path))
    overrides = f"fetch.cache_dir={session_cache} {FAST} compute.onnx_candidates=[int8]"
    client = MlflowClient(setup.uri)
    uploading = "logging the onnx chat model"

    # 1. Down for a few seconds during the upload: MLflow's client retries, the run finishes.
    with tracking_server(setup, "life-1.log") as server:
        pipeline = start_pipeline("ride-out", overrides, env, tmp_path)
        wait_for_line(pipeline.log, uploading)
        kill(server)
    down = time.monotonic()
    time.sleep(5)
    with tracking_server(setup, "life-2.log") as server:
        print(f"\nserver down for {time.monotonic() - down:.1f} s")
        output = finish(pipeline)
        assert pipeline.process.returncode == 0, output[-3000:]
        assert "Retrying (Retry(" in output  # urllib3, under MLflow's client, said so
        experiment = client.get_experiment_by_name("restart").experiment_id
        assert {r.info.status for r in client.search_runs([experiment])} == {"FINISHED"}

        # 2. A wrap_onnx alone whose server stays away longer than its retry budget.
        registry = {
            name: registry_state(client, name)
            for name in (m.name for m in client.search_registered_models())
        }
        step_log = tmp_path / "lone-wrap_onnx.log"
        with step_log.open("w") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "steps", "wrap_onnx", "--overrides", overrides],
                env=env | {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}, cwd=PROJECT_ROOT,
                stdout=subprocess.DEVNULL, stderr=sink,
            )  # fmt: skip
        wait_for_line(step_log, uploading)
        kill(server)
    process.wait(timeout=600)
    stderr = step_log.read_text()
    line = one_line_error(
        subprocess.CompletedProcess(process.args, process.returncode, "", stderr), "wrap_onnx"
    )
    assert f"lost the MLflow tracking server at {setup.uri}" in line
    print(f"a lone wrap_onnx without its server: {line}")

    # 3. Back again: the registry is as it was, and the next run reuses what finished.
    with tracking_server(setup, "life-3.log"):
        assert {name: registry_state(client, name) for name in registry} == registry
        command, _ = mlflow_run_command("-P", f"overrides={overrides}", env=env)
        rerun = subprocess.run(
            command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1800
        )
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        latest = client.search_runs(
            [experiment], "tags.`pipeline.step` = 'main'", order_by=["attributes.start_time DESC"]
        )[0]
        reused = [v for k, v in latest.data.tags.items() if k.endswith(".reused")]
        assert reused and set(reused) == {"true"}
        assert {name: registry_state(client, name) for name in registry} == registry
