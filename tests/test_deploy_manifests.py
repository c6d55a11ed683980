"""The deployment files under deploy/: the Kubernetes manifests match the API schema strictly (a
misspelled field fails) and are read back as the kubernetes client's typed models; the GitHub
Actions workflow matches its published schema; the base images' pins and content-addressed tags
come from pyproject.toml. No docker engine runs in CI, so the image itself is not built: the
Dockerfile is checked as text, and its build-time CUDA check is run here as a script."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes.client
import pytest
import yaml
from conftest import PROJECT_ROOT
from kubernetes_models import (
    TRACKING_CREDENTIALS,
    assert_tracking_credentials_from_the_secret,
    typed,
    validate,
)
from packaging.requirements import Requirement

from deploy import images

DEPLOY = PROJECT_ROOT / "deploy"
FULL_COMMIT = re.compile(r"^[0-9a-f]{40}$")
MANIFESTS = ("cronjob.yaml", "cache-pvc.yaml", "serve.yaml")


def manifest(name: str) -> list[dict]:
    text = (DEPLOY / "kubernetes" / name).read_text()
    return [document for document in yaml.safe_load_all(text) if document]


@pytest.fixture(scope="module")
def cronjob() -> kubernetes.client.V1CronJob:
    (document,) = manifest("cronjob.yaml")
    return typed(document)


@pytest.fixture(scope="module")
def pod(cronjob) -> kubernetes.client.V1PodSpec:
    return cronjob.spec.job_template.spec.template.spec


@pytest.fixture(scope="module")
def container(pod) -> kubernetes.client.V1Container:
    (only,) = pod.containers
    return only


def env_of(container: kubernetes.client.V1Container) -> dict[str, kubernetes.client.V1EnvVar]:
    return {var.name: var for var in container.env}


def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


@pytest.mark.parametrize(
    "document",
    [document for name in MANIFESTS for document in manifest(name)],
    ids=lambda document: f"{document['kind']}/{document['metadata']['name']}",
)
def test_every_manifest_matches_the_kubernetes_api_schema_strictly(document: dict) -> None:
    validate(document)
    assert typed(document).metadata.name == document["metadata"]["name"]


def test_the_cronjob_starts_one_pipeline_at_a_time_and_never_retries_it(cronjob) -> None:
    spec = cronjob.spec
    assert len(spec.schedule.split()) == 5, spec.schedule
    assert spec.time_zone
    assert spec.concurrency_policy == "Forbid"
    assert spec.job_template.spec.backoff_limit == 0
    assert spec.job_template.spec.template.spec.restart_policy == "Never"


def test_the_cronjob_runs_main_with_mlflow_at_the_pinned_commit(container) -> None:
    env = env_of(container)
    assert container.command + container.args == [
        "mlflow",
        "run",
        "$(PIPELINE_REPO)",
        "--version",
        "$(PIPELINE_COMMIT)",
        "--env-manager",
        "local",
        "-e",
        "main",
        "-P",
        "model=smollm2-135m",
        "-P",
        "compute=cpu",
    ]
    # Kubernetes leaves $(NAME) as literal text when NAME is not in the container's env.
    assert env["PIPELINE_REPO"].value.startswith("https://")
    assert FULL_COMMIT.match(env["PIPELINE_COMMIT"].value), env["PIPELINE_COMMIT"].value


def test_the_cronjob_image_is_the_cpu_base_image_that_images_py_tags(container) -> None:
    assert container.image.endswith("/" + images.image_tag("cpu")), (
        f"{container.image}: rebuild the image (make image-cpu) and update cronjob.yaml's tag"
    )


def test_credentials_come_from_the_secret_and_no_token_is_written_down(container) -> None:
    env = env_of(container)
    tracking = env["MLFLOW_TRACKING_URI"].value_from.secret_key_ref
    token = env["HF_TOKEN"].value_from.secret_key_ref
    assert (tracking.name, tracking.key) == ("llm-to-mlflow", "tracking-uri")
    assert not tracking.optional
    assert (token.name, token.key, token.optional) == ("llm-to-mlflow", "hf-token", True)
    assert env["MLFLOW_TRACKING_URI"].value is None
    assert env["HF_TOKEN"].value is None
    assert_tracking_credentials_from_the_secret(env)
    text = (DEPLOY / "kubernetes" / "cronjob.yaml").read_text()
    assert not re.search(r"hf_[A-Za-z0-9]{8,}", text)


def test_the_cache_volume_is_the_shared_claim_mounted_at_xdg_cache_home(pod, container) -> None:
    namespace, claim = (typed(document) for document in manifest("cache-pvc.yaml"))
    env = env_of(container)
    (mount,) = container.volume_mounts
    (volume,) = pod.volumes
    assert mount.name == volume.name
    assert volume.persistent_volume_claim.claim_name == claim.metadata.name
    assert claim.metadata.namespace == namespace.metadata.name
    assert mount.mount_path == env["XDG_CACHE_HOME"].value
    assert env["HF_HOME"].value.startswith(mount.mount_path + "/")
    assert f"XDG_CACHE_HOME={mount.mount_path}" in dockerfile()


def test_the_cronjob_requests_resources_and_runs_as_the_image_user(cronjob, pod, container):
    assert cronjob.metadata.namespace == "llm-to-mlflow"
    assert {"cpu", "memory"} <= container.resources.requests.keys()
    assert "memory" in container.resources.limits
    security = pod.security_context
    assert security.run_as_non_root
    assert security.run_as_user == security.fs_group == 1000
    assert "--uid 1000" in dockerfile()


def workflow() -> dict:
    return yaml.safe_load((DEPLOY / "github-actions" / "scheduled-pipeline.yml").read_text())


def test_the_server_deployment_serves_the_champion_at_the_pinned_commit() -> None:
    deployment, service = (typed(document) for document in manifest("serve.yaml"))
    pod = deployment.spec.template.spec
    (checkout,) = pod.init_containers
    (server,) = pod.containers
    assert server.command == ["python", "-m", "steps", "serve"]
    assert "--model-uri" not in server.args  # the default: the champion alias, followed
    assert server.args[server.args.index("--host") + 1] == "0.0.0.0"
    # Ready only once the model is loaded: /health answers 503 until then.
    for probe in (server.readiness_probe, server.startup_probe):
        assert probe.http_get.path == "/health" and probe.http_get.port == "http"
    checkout_env = env_of(checkout)
    assert FULL_COMMIT.match(checkout_env["PIPELINE_COMMIT"].value)
    assert "$(PIPELINE_COMMIT)" in " ".join(checkout.args)
    assert server.working_dir.startswith(checkout.volume_mounts[0].mount_path)
    assert checkout.image == server.image and server.image.endswith("/" + images.image_tag("cpu"))
    tracking = env_of(server)["MLFLOW_TRACKING_URI"].value_from.secret_key_ref
    assert (tracking.name, tracking.key) == ("llm-to-mlflow", "tracking-uri")
    assert_tracking_credentials_from_the_secret(env_of(server))
    assert service.spec.selector == deployment.spec.selector.match_labels
    (port,) = service.spec.ports
    assert port.target_port == "http" and server.ports[0].name == "http"
    assert deployment.spec.strategy.rolling_update.max_unavailable == 0


def test_the_server_deployment_needs_keys_is_scraped_and_drains_within_its_grace_period() -> None:
    from steps.serving.api_keys import ENV_VAR

    deployment, _ = (typed(document) for document in manifest("serve.yaml"))
    pod = deployment.spec.template.spec
    (server,) = pod.containers
    keys = env_of(server)[ENV_VAR].value_from.secret_key_ref
    assert (keys.name, keys.key, keys.optional) == ("llm-to-mlflow", "api-keys", None)
    annotations = deployment.spec.template.metadata.annotations
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/port"] == str(server.ports[0].container_port)
    # The server's drain ends before Kubernetes' SIGKILL, with time left to close the model.
    grace = float(server.args[server.args.index("--grace-period") + 1])
    assert 0 < grace < pod.termination_grace_period_seconds - 10


def test_the_workflow_matches_the_github_actions_schema() -> None:
    checker = Path(sys.executable).parent / "check-jsonschema"
    path = DEPLOY / "github-actions" / "scheduled-pipeline.yml"
    result = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.github-workflows", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_workflow_runs_the_pipeline_on_a_schedule_at_the_pinned_commit() -> None:
    spec = workflow()
    triggers = spec[True]  # PyYAML reads the key `on` as a boolean
    (schedule,) = triggers["schedule"]
    assert len(schedule["cron"].split()) == 5
    assert "workflow_dispatch" in triggers
    (job,) = spec["jobs"].values()
    assert job["env"]["MLFLOW_TRACKING_URI"] == "${{ secrets.MLFLOW_TRACKING_URI }}"
    assert job["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"
    for name in TRACKING_CREDENTIALS:
        assert job["env"][name] == f"${{{{ secrets.{name} }}}}"
    (checkout,) = (
        step for step in job["steps"] if step.get("uses", "").startswith("actions/checkout")
    )
    assert checkout["with"]["ref"] == "${{ vars.PIPELINE_COMMIT }}"
    assert any("mlflow run . " in step.get("run", "") for step in job["steps"])


@pytest.mark.parametrize(
    ("commit", "accepted"),
    [("4570818d8cf35d7acd29a38001faab47f7418553", True), ("main", False), ("4570818", False)],
)
def test_the_workflow_stops_first_unless_pipeline_commit_is_a_full_commit(
    commit: str, accepted: bool
) -> None:
    first = workflow()["jobs"]["pipeline"]["steps"][0]
    assert first["env"]["PIPELINE_COMMIT"] == "${{ vars.PIPELINE_COMMIT }}"
    result = subprocess.run(
        ["bash", "-c", first["run"]],
        env={"PIPELINE_COMMIT": commit},
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert (result.returncode == 0) == accepted, result.stdout
    assert ("must be a full 40-hex commit" in result.stdout) != accepted


def test_the_cpu_image_installs_exactly_pyprojects_dependencies() -> None:
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    assert images.requirements("cpu") == pyproject["project"]["dependencies"]


def test_the_cuda_image_swaps_only_the_onnx_runtime_packages() -> None:
    cpu, cuda = set(images.requirements("cpu")), set(images.requirements("cuda"))
    assert {Requirement(pin).name for pin in cpu - cuda} == {"onnxruntime", "onnxruntime-genai"}
    assert cuda - cpu == {"onnxruntime-gpu==1.31.1", "onnxruntime-genai-cuda==0.18.0"}


@pytest.mark.parametrize("flavor", images.FLAVORS)
def test_every_image_requirement_is_an_exact_pin(flavor: str) -> None:
    for line in images.requirements(flavor):
        (specifier,) = Requirement(line).specifier
        assert specifier.operator == "==", line


def test_the_image_tag_changes_with_the_pins_and_with_the_dockerfile() -> None:
    pins = images.requirements("cpu")
    tag = images.content_tag("cpu", b"FROM python", pins)
    assert re.fullmatch(r"llm-to-mlflow-base:cpu-[0-9a-f]{12}", tag)
    assert images.content_tag("cpu", b"FROM python", pins) == tag
    assert images.content_tag("cpu", b"FROM python:3.11", pins) != tag
    assert images.content_tag("cpu", b"FROM python", [*pins[:-1], "matplotlib==0.0.1"]) != tag
    assert images.image_tag("cpu") != images.image_tag("cuda")


def test_an_unknown_image_flavor_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown image flavor 'rocm': choose one of cpu, cuda"):
        images.requirements("rocm")


def test_the_image_command_line_prints_the_tag_and_one_pin_per_line() -> None:
    def cli(*args: str) -> str:
        command = [sys.executable, str(DEPLOY / "images.py"), *args]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout

    assert cli("tag", "cuda") == images.image_tag("cuda") + "\n"
    assert cli("requirements", "cuda").splitlines() == images.requirements("cuda")


def test_the_cpu_image_takes_torch_alone_from_the_cpu_index_before_the_rest() -> None:
    text = dockerfile()
    torch_alone = text.index(
        "--index-url https://download.pytorch.org/whl/cpu \"$(grep '^torch==' requirements.txt)\""
    )
    assert "--no-deps" in text[text.rindex("pip install", 0, torch_alone) : torch_alone]
    assert text.index("pip install --no-cache-dir -r requirements.txt") > torch_alone
    assert "RUN pip check" in text


def test_the_build_context_holds_only_what_the_dockerfile_copies() -> None:
    copied = {
        source
        for line in dockerfile().splitlines()
        if line.startswith("COPY ")
        for source in line.split()[1:-1]
    }
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line.removeprefix("!") for line in ignore if line.startswith("!")}
    assert "*" in ignore
    assert copied == allowed == {"pyproject.toml", "deploy/images.py"}


def _build_time_check() -> str:
    (script,) = re.findall(r"<<'CHECK'\n(.*?)\nCHECK\n", dockerfile(), re.DOTALL)
    return script


@pytest.mark.parametrize(("flavor", "fails"), [("cpu", True), ("cuda", False)])
def test_the_build_time_check_rejects_nvidia_wheels_only_in_the_cpu_image(
    tmp_path: Path, flavor: str, fails: bool
) -> None:
    # The project's venv holds the CPU torch; one fake nvidia-* distribution stands in for CUDA.
    dist_info = tmp_path / "nvidia_cublas-13.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: nvidia-cublas\nVersion: 13.0\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", _build_time_check()],
        env={"FLAVOR": flavor, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode != 0) == fails, result.stderr
    assert ("the cpu image holds CUDA" in result.stderr) == fails
