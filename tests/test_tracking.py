"""Run set-up shared by every step: where runs go, what they record, fast failure, the
tracking server's refusals as one line, model keys, and the register lock."""

from __future__ import annotations

import itertools
import sys
import threading
import time
from pathlib import Path

import children
import mlflow
import pytest
import requests
import yaml
from conftest import PROJECT_ROOT
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, UNAUTHENTICATED
from servers import clean_env, free_port

from steps.config.compose import project_path
from steps.errors import PipelineError
from steps.evaluation.evalset import load_eval_set
from steps.evaluation.fidelity import load_fidelity_text
from steps.tracking.evaluation_runs import log_datasets
from steps.tracking.registry import LOCK_SUFFIX, registry_lock
from steps.tracking.runs import DEFAULT_STORE, flat_params, model_key, step_run, tracking_uri
from steps.tracking.server import explained, redacted, retry_budget_s


def test_zero_setup_store_is_sqlite_in_the_project(compose, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(compose()) == f"sqlite:///{DEFAULT_STORE}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking_uri(compose()) == "http://tracking:5000"
    assert tracking_uri(compose("tracking.uri=sqlite:////x.db")) == "sqlite:////x.db"


def test_params_are_flat_keys_of_the_resolved_config(compose) -> None:
    params = flat_params(compose("model=phi3-mini-4k", "compute=cuda"))
    assert params["model.source.repo_id"] == "microsoft/Phi-3-mini-4k-instruct"
    assert params["compute.torch_dtype"] == "float16"
    assert params["model.context_length"] == "4096"
    assert params["model.prebuilt_onnx.cuda.subfolder"] == "cuda/cuda-int4-rtn-block-32"
    assert all(len(value) < 6000 for value in params.values())


def test_a_step_outside_mlflow_run_opens_its_own_run(compose, tracking_uri) -> None:
    cfg = compose("tracking.experiment=own-run")
    with step_run("fetch", cfg) as run:
        run_id = run.info.run_id
    finished = mlflow.get_run(run_id)
    assert finished.info.status == "FINISHED"
    experiment = mlflow.get_experiment(finished.info.experiment_id)
    assert experiment.name == "own-run"
    # Artifacts beside the database, not in whatever directory the test runs from.
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    assert experiment.artifact_location == (database.parent / "mlruns").as_uri()
    assert finished.info.run_name == "fetch smollm2-135m cpu"
    assert finished.data.tags["pipeline.step"] == "fetch"
    assert finished.data.tags["versions.hydra-core"] == "1.3.8"
    config = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml"))
    assert config["tracking"]["experiment"] == "own-run"


def test_unreachable_tracking_server_fails_in_seconds(compose) -> None:
    port = free_port()  # nobody listens on it
    started = time.monotonic()
    run = step_run("fetch", compose(f"tracking.uri=http://127.0.0.1:{port}"))
    with pytest.raises(PipelineError, match=f"tracking server at http://127.0.0.1:{port} is not"):
        run.__enter__()
    assert time.monotonic() - started < children.NOT_WAITED_OUT_S


def test_a_step_against_a_down_server_stops_with_one_line_before_any_work() -> None:
    port = free_port()
    started = time.monotonic()
    result = children.run(
        [sys.executable, "-m", "steps", "fetch"], 120,
        env=clean_env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}"), cwd=PROJECT_ROOT,
    )  # fmt: skip
    assert time.monotonic() - started < children.NOT_WAITED_OUT_S
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: fetch: the MLflow tracking server at http://127.0.0.1:{port} is not reachable "
        "(ConnectionError); start it or point MLFLOW_TRACKING_URI at a running one"
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("http://pipeline:s3cret@mlflow:5000/prefix", "http://***@mlflow:5000/prefix"),
        ("https://token@mlflow.example", "https://***@mlflow.example"),
        ("http://mlflow:5000", "http://mlflow:5000"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ],
)
def test_a_tracking_uri_is_shown_without_its_credentials(uri: str, shown: str) -> None:
    assert redacted(uri) == shown


def test_refusals_and_a_lost_server_become_one_line(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-password")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    uri = "http://pipeline:s3cret-password@mlflow:5000"
    refused = explained(MlflowException("401", error_code=UNAUTHENTICATED), uri)
    assert str(refused) == (
        "the MLflow tracking server at http://***@mlflow:5000 refused user 'pipeline' (not "
        "authenticated): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
        "MLFLOW_TRACKING_TOKEN) to an account of that server"
    )
    denied = explained(
        MlflowException(
            "API request to endpoint /api/2.0/mlflow/model-versions/create failed with error "
            "code 403 != 200. Response body: 'Permission denied'",
            error_code=PERMISSION_DENIED,
        ),
        uri,
        needs="EDIT permission on registered model 'm'",
    )
    assert str(denied) == (
        "the MLflow tracking server at http://***@mlflow:5000 denied user 'pipeline' "
        "(/api/2.0/mlflow/model-versions/create): this step needs EDIT permission on "
        "registered model 'm'; ask the server's admin to grant it"
    )
    try:
        try:
            raise requests.ConnectionError("Max retries exceeded")
        except requests.ConnectionError as error:
            # as MLflow's rest_utils raises it: the cause only as the implicit context
            raise MlflowException(f"API request to {uri} failed with exception {error}")  # noqa: B904
    except MlflowException as error:
        lost = explained(error, uri)
    assert isinstance(lost, PipelineError)
    assert "lost the MLflow tracking server at http://***@mlflow:5000" in str(lost)
    assert "(MLFLOW_HTTP_REQUEST_MAX_RETRIES=5, about 60 s)" in str(lost)
    other = MlflowException("a model flavour problem")
    assert explained(other, uri) is other
    assert not any("s3cret" in str(e) for e in (refused, denied, lost))


def test_retry_budget_is_mlflows_backoff_sum_and_zero_with_one_retry(monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", raising=False)
    assert retry_budget_s() == 4 + 8 + 16 + 32 + 64 + 120  # MLflow's "about 4 minutes"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    assert retry_budget_s() == 0


def test_a_model_key_names_what_reaches_the_model(compose) -> None:
    tags = {"fetch.snapshot_id": "a" * 64, "model.label": "onnx-int8"}
    key = model_key(compose(), tags)
    assert key is not None
    # Whichever fetch run found the weights, whichever other builds the pipeline swept.
    assert (
        model_key(compose("wrap.fetch_run_id=0123abcd", "compute.onnx_candidates=[int8]"), tags)
        == key
    )
    assert model_key(compose("evaluate.max_items=3", "register.min_accuracy=0.5"), tags) == key
    # Other weights, another label, other settings that reach the model: another model.
    assert model_key(compose(), tags | {"fetch.snapshot_id": "b" * 64}) != key
    assert model_key(compose(), tags | {"model.label": "onnx-int4"}) != key
    assert model_key(compose("generation.max_new_tokens=64"), tags) != key
    assert model_key(compose("compute.onnx_threads=1"), tags) != key


def test_evaluate_runs_of_overlapping_pipelines_log_one_new_dataset_at_once(
    compose, tracking_uri
) -> None:
    """The store looks a dataset up before inserting it: before the step logged again on losing
    that race, about one of six first logs at once failed (a fresh-clone CI's overlapping
    pipelines against PostgreSQL met it once)."""
    cfg = compose()
    datasets = (
        load_eval_set(project_path(cfg.evaluate.dataset)),
        load_fidelity_text(project_path(cfg.evaluate.fidelity.text)),
    )
    client = MlflowClient()
    starts = threading.Barrier(6)
    failures: list[BaseException] = []

    def evaluate(experiment: str) -> None:
        with mlflow.start_run(experiment_id=experiment):
            starts.wait()
            try:
                log_datasets(*datasets)
            except BaseException as error:
                failures.append(error)

    for round_ in range(3):
        experiment = client.create_experiment(f"overlap-{round_}")
        threads = [threading.Thread(target=evaluate, args=(experiment,)) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        runs = client.search_runs([experiment])
        assert len(runs) == 6
        assert all(len(run.inputs.dataset_inputs) == 2 for run in runs)


def test_registers_of_one_model_take_turns(tracking_uri) -> None:
    """Threads stand in for pipelines on other machines: the lock lives in the registry."""
    client = MlflowClient()
    experiment = client.create_experiment("lock")
    holders = [client.create_run(experiment).info.run_id for _ in range(4)]
    held: list[tuple[float, float]] = []

    def register(holder: str) -> None:
        with registry_lock("model", holder):
            entered = time.monotonic()
            time.sleep(0.3)
            held.append((entered, time.monotonic()))

    threads = [threading.Thread(target=register, args=(holder,)) for holder in holders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    held.sort()
    assert len(held) == 4
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(held))
    assert not client.search_registered_models(f"name = 'model{LOCK_SUFFIX}'")


def test_a_lock_left_by_a_dead_register_is_broken(tracking_uri) -> None:
    client = MlflowClient()
    experiment = client.create_experiment("stale")
    dead = client.create_run(experiment).info.run_id
    client.create_registered_model(f"model{LOCK_SUFFIX}", tags={"register.holder": dead})
    client.set_terminated(dead, "FAILED")  # killed mid-register, after taking the lock
    started = time.monotonic()
    with registry_lock("model", client.create_run(experiment).info.run_id):
        held_by = client.get_registered_model(f"model{LOCK_SUFFIX}").tags["register.holder"]
    # Broken at once: a live holder's lock would be waited for up to WAIT_AT_MOST_S.
    assert held_by != dead and time.monotonic() - started < children.NOT_WAITED_OUT_S
