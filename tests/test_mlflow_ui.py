"""The MLflow UI after one whole pipeline, opened as a new user would: `mlflow ui` on the store of
the session's pipeline run (conftest's remote_pipeline: its PostgreSQL database and artifacts),
looked at in headless Chromium from Debian's packages, driven by Playwright (never a downloaded
browser). Each page's screenshot goes to test-artifacts/mlflow-ui/ (LLM_TO_MLFLOW_TEST_ARTIFACTS
puts them elsewhere). tests/test_run_pages.py asserts the same facts through the client API."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, REGISTERED, PipelineRuns
from mlflow import MlflowClient
from playwright.sync_api import Browser, Page, expect, sync_playwright

from steps.serving.processes import clean_env, free_port, running

pytestmark = pytest.mark.slow
BUILDS = ("fp32", "int8", "int4", "int4-k_quant_last")  # conf/compute/cpu.yaml's sweep
MODELS = (
    "smollm2-135m-transformers-fp32-cpu",
    *(f"smollm2-135m-onnx-{build}-cpu" for build in BUILDS),
)
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
# The UI opens its assistant panel on a first visit, over half the page; a new user closes it.
ASSISTANT_CLOSED = """
localStorage.setItem("mlflow.assistant.fab.autoOpenedOnFirstLoad_v1", "true");
localStorage.setItem("mlflow.assistant.panelOpen_v1", "false");
"""
PAGE_LOADS_IN_MS = 60_000  # two slow cores, a cold server, the UI's first fetches
expect.set_options(timeout=PAGE_LOADS_IN_MS)


def screenshots() -> Path:
    root = os.environ.get("LLM_TO_MLFLOW_TEST_ARTIFACTS") or PROJECT_ROOT / "test-artifacts"
    folder = Path(root) / "mlflow-ui"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def ui(remote_pipeline: PipelineRuns, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow ui` on the pipeline's store: the tracking server's database and artifacts,
    without its login."""
    setup = remote_pipeline.server.setup
    url = f"http://127.0.0.1:{free_port()}"
    command = [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", setup.cluster.uri(setup.database),
        "--artifacts-destination", str(setup.artifacts),
        "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "1",
    ]  # fmt: skip
    env = clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    log = tmp_path_factory.mktemp("mlflow-ui") / "ui.log"
    with running(command, env, f"{url}/health", log):
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Chromium is not installed: apt-get install -y chromium (make test does it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1600, "height": 1400})
    context.add_init_script(ASSISTANT_CLOSED)
    context.set_default_timeout(PAGE_LOADS_IN_MS)
    yield context.new_page()
    context.close()


def test_evaluate_run_shows_its_models_and_its_report(ui, page, remote_pipeline) -> None:
    run_id = remote_pipeline.cold.data.tags["main.evaluate.run_id"]
    page.goto(f"{ui}/#/runs/{run_id}")
    expect(page.get_by_role("heading", name="evaluate smollm2-135m cpu")).to_be_visible()
    expect(page.get_by_text("Logged models (5)")).to_be_visible()
    models = page.get_by_role("grid")  # the run's "Logged models" table
    for name in MODELS:
        expect(models.get_by_role("link", name=name, exact=True)).to_be_visible()
    expect(page.get_by_text("is what register's fastest_faithful policy chooses")).to_be_visible()
    page.get_by_text("Show more").click()
    chart = page.locator(f'img[src$="path=eval/speed_vs_fidelity.png&run_uuid={run_id}"]')
    expect(chart).to_be_visible()
    assert chart.evaluate("image => image.naturalWidth") > 0  # served by the UI, not broken
    page.screenshot(path=screenshots() / "evaluate-run.png")


def test_each_candidates_answers_are_a_table_on_its_run(ui, page, remote_pipeline) -> None:
    client = MlflowClient(remote_pipeline.server.uri)
    experiment = remote_pipeline.cold.info.experiment_id
    evaluate = remote_pipeline.cold.data.tags["main.evaluate.run_id"]
    (nested,) = client.search_runs(
        [experiment],
        f"tags.`mlflow.parentRunId` = '{evaluate}' and tags.`model.label` = 'onnx-int8'",
    )
    path = "eval/answers.json"
    page.goto(f"{ui}/#/experiments/{experiment}/runs/{nested.info.run_id}/artifactPath/{path}")
    expect(page.get_by_text("answered_by").first).to_be_visible()
    expect(page.get_by_text("onnx-int8", exact=True).first).to_be_visible()  # who answered
    page.screenshot(path=screenshots() / "candidate-answers.png")


def test_model_list_names_each_build_and_compares_their_metrics(ui, page, remote_pipeline) -> None:
    experiment = remote_pipeline.cold.info.experiment_id
    # Wide enough for both metric groups: the table scrolls sideways on a narrower screen.
    page.set_viewport_size({"width": 3000, "height": 900})
    page.goto(f"{ui}/#/experiments/{experiment}/models")
    for name in MODELS:
        expect(page.get_by_role("link", name=name, exact=True)).to_have_count(1)
    for column in ("accuracy", "tokens_per_s", "kld_mean", "top1_agreement"):
        header = page.get_by_role("columnheader", name=column, exact=True)
        expect(header).to_be_in_viewport()
    for dataset in ("chat-basics-v2", "fidelity-v1"):
        expect(page.get_by_role("columnheader", name=f"Dataset: {dataset}")).to_be_in_viewport()
    page.screenshot(path=screenshots() / "model-list.png")


def test_registered_version_shows_its_model_card_and_alias(ui, page, remote_pipeline) -> None:
    champion = MlflowClient(remote_pipeline.server.uri).get_model_version_by_alias(
        REGISTERED["onnx"], "champion"
    )
    page.goto(f"{ui}/#/models/{REGISTERED['onnx']}/versions/{champion.version}")
    card = f"SmolLM2-135M-Instruct ({champion.tags['model.label']}, cpu)"
    expect(page.get_by_role("heading", name=card)).to_be_visible()
    expect(page.get_by_role("status", name="champion")).to_be_visible()  # the alias's badge
    model = f"smollm2-135m-{champion.tags['model.label']}-cpu"
    expect(page.get_by_role("link", name=model, exact=True)).to_be_visible()
    page.screenshot(path=screenshots() / "registered-version.png")


def test_main_run_shows_what_the_pipeline_made(ui, page, remote_pipeline) -> None:
    page.goto(f"{ui}/#/runs/{remote_pipeline.cold.info.run_id}")
    expect(page.get_by_role("heading", name="main smollm2-135m cpu")).to_be_visible()
    expect(page.get_by_text("Logged models (5)")).to_be_visible()
    expect(page.get_by_text("smollm2-135m-onnx-cpu version 1 is champion")).to_be_visible()
    page.screenshot(path=screenshots() / "main-run.png")
