"""The pipeline against a team's tracking server: PostgreSQL behind MLflow's basic-auth app,
users with less than EDIT, pipelines that overlap, and a server that restarts mid-step (the
session pipeline's own server, killed and brought back by tests/conftest.py's remote_pipeline).

Credentials are MLflow's own environment variables; every server here is a real `mlflow server`
process on a real PostgreSQL cluster (tests/servers.py)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import children
import pytest
from conftest import (
    PROJECT_ROOT,
    REGISTERED,
    PipelineRuns,
    mlflow_run_command,
    report_line,
)
from mlflow import MlflowClient
from mlflow.server import get_app_client
from servers import Credentials, Postgres, ServerSetup, TrackingServer, tracking_server

from steps.config.plan import ENTRY_POINTS
from steps.evaluation.selection import beats
from steps.tracking.registry import LOCK_SUFFIX


def create_user(server: TrackingServer, name: str) -> Credentials:
    """A user with the server's default permission (READ on everything) as admin makes one."""
    credentials = Credentials.random(name)
    get_app_client("basic-auth", tracking_uri=server.uri).create_user(name, credentials.password)
    return credentials


def steps_command(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = children.run([sys.executable, "-m", "steps", *args], 300, env=env, cwd=PROJECT_ROOT)
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
    assert seconds < children.NOT_WAITED_OUT_S
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
    result = children.run(command, 300, env=env)
    assert result.returncode != 0 and time.monotonic() - started < children.NOT_WAITED_OUT_S
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
    assert seconds < children.NOT_WAITED_OUT_S


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
        "server logs": "\n".join(log.read_text(errors="replace") for log in server.logs),
        "pipeline output": "\n".join(remote_pipeline.outputs),
        "a step that lost its server": remote_pipeline.lost.lone_step_output,
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

# The locking and the reuse do not depend on the model's size: the tiny Phi-3 checkpoint from the
# loopback Hub, few items, a short fidelity text, and every gate open (a random model's int8
# build is far from its fp32 one, and answers nothing right), so that each register decides.
OVERLAP = (
    "wrap.onnx_source=build evaluate.max_items=4 evaluate.timed_items=2 "
    "evaluate.fidelity.scored_tokens=256 evaluate.max_new_tokens=8 register.min_accuracy=0 "
    "register.max_p95_latency_s=600 register.max_kld_mean=1e9 register.min_top1_agreement=1e-6 "
    "register.max_ppl_ratio=1e9"
)


@dataclass(frozen=True)
class Pipeline:
    label: str
    process: subprocess.Popen
    log: Path


def start_pipeline(label: str, args: list[str], env: dict[str, str], logs: Path) -> Pipeline:
    """`mlflow run .` started as a scheduler would: its own process, output to a file."""
    command, _ = mlflow_run_command(*args, env=env)
    log = logs / f"{label}.log"
    return Pipeline(label, children.start(command, log, env=env, cwd=logs), log)


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
    overlap_server: TrackingServer, phi3_hub, tmp_path: Path
) -> None:
    """The same pipeline twice and a second variant (another ONNX build, registering into the
    same registered models) against one server, sharing one snapshot cache: the nightly and the
    variant started at once, the manual run (the nightly's twin) once the nightly has fetched,
    while both still run."""
    cache = f"fetch.cache_dir={tmp_path / 'cache'}"
    env = overlap_server.env(
        MLFLOW_EXPERIMENT_NAME="overlap", **phi3_hub.env(tmp_path / "hf", TMPDIR=str(tmp_path))
    )
    # The schedules' experiment exists (`mlflow run` creates a missing one without minding a
    # concurrent create: the very first runs of an experiment must not overlap).
    MlflowClient(overlap_server.uri).create_experiment("overlap")

    def start(label: str, build: str) -> Pipeline:
        overrides = f"overrides={cache} {OVERLAP} compute.onnx_candidates=[{build}]"
        return start_pipeline(label, ["-P", "model=phi3-mini-4k", "-P", overrides], env, tmp_path)

    started = time.monotonic()
    pipelines = [start("nightly", "int8"), start("variant", "fp32")]
    with children.reaped([p.process for p in pipelines]) as processes:
        children.wait_for_line(
            pipelines[0].log, "step wrap_transformers: running", pipelines[0].process
        )
        pipelines.append(start("manual", "int8"))
        processes.append(pipelines[-1].process)
        codes = {p.label: children.wait(p.process, 600, p.log) for p in pipelines}
    failed = {p.label: p.log.read_text()[-3000:] for p in pipelines if codes[p.label]}
    assert failed == {}

    client = MlflowClient(overlap_server.uri)
    experiment = client.get_experiment_by_name("overlap").experiment_id
    runs = client.search_runs([experiment], max_results=1000)
    mains = [r for r in runs if r.data.tags["pipeline.step"] == "main"]
    starts = sorted(r.info.start_time for r in mains)
    held_at_once = sum(1 for r in mains if r.info.end_time > starts[-1])
    assert len(mains) == 3 and held_at_once == 3
    assert {r.info.status for r in runs} == {"FINISHED"}
    # A step two pipelines could share was computed once, or twice only while neither had
    # finished it: once one had, the other (searching just before it starts a step) reused it.
    by_inputs: dict[tuple, list] = {}
    for r in runs:
        if "config.sha256" in r.data.tags:  # not evaluate's nested runs
            key = (r.data.tags["pipeline.step"], r.data.tags["config.sha256"])
            by_inputs.setdefault(key, []).append(r.info)
    twice = {key: infos for key, infos in by_inputs.items() if len(infos) > 1}
    assert all(len(infos) == 2 for infos in twice.values()), twice
    for key, infos in twice.items():
        assert max(i.start_time for i in infos) < min(i.end_time for i in infos), (
            f"{key} was computed again after an identical run had finished"
        )
    # So the manual run took the nightly's fetch, which had finished when it started.
    nightly, manual = sorted(
        (r for r in mains if "[int8]" in r.data.params["overrides"]),
        key=lambda r: r.info.start_time,
    )
    assert manual.data.tags["main.fetch.reused"] == "true"
    assert manual.data.tags["main.fetch.run_id"] == nightly.data.tags["main.fetch.run_id"]

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
    report_line(
        f"three overlapping Phi-3 pipelines: {time.monotonic() - started:.1f} s, held at once "
        f"{held_at_once}, duplicate versions {duplicates}, steps computed twice {len(twice)}"
    )


# --- a server that restarts ----------------------------------------------------------------------


def test_a_pipeline_rides_out_a_server_killed_mid_upload(remote_pipeline: PipelineRuns) -> None:
    """The session pipeline's server was killed as a wrap_onnx started uploading its model and
    was back 5 s later: MLflow's client retried (urllib3 says so in the output), and every run
    finished."""
    lost = remote_pipeline.lost
    assert 5 <= lost.down_seconds < 120, lost.down_seconds
    assert "Retrying (Retry(" in remote_pipeline.outputs[0]
    assert lost.statuses_after_cold == {"FINISHED"}


def test_a_step_whose_server_stays_away_fails_in_one_line_and_passes_nothing_off_as_done(
    remote_pipeline: PipelineRuns,
) -> None:
    """A wrap_onnx alone, its server killed mid-upload and away past its retry budget, stops
    with one line. What it began stays unfinished (its run never FINISHED, its model never
    READY), so no later pipeline can take it for a result (reuse takes FINISHED runs only)."""
    lost = remote_pipeline.lost
    line = one_line_error(
        subprocess.CompletedProcess([], 1, "", lost.lone_step_output), "wrap_onnx"
    )
    assert f"lost the MLflow tracking server at {remote_pipeline.server.uri}" in line
    assert lost.lone_step_run.info.status != "FINISHED"
    assert all("READY" not in status for status in lost.lone_step_models)
