"""compute=k8s-cpu and k8s-cuda: MLflow's own Kubernetes backend code accepts our backend
config and renders the Jobs, which match the Kubernetes API schema; the pod's command runs in a
copy of the project made the way MLflow builds the image; without a cluster, main fails in
seconds. No cluster or Docker engine runs in CI: submission itself is not exercised."""

from __future__ import annotations

import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import PROJECT_ROOT
from kubernetes_models import assert_tracking_credentials_from_the_secret, typed, validate
from mlflow import MlflowClient
from mlflow.exceptions import ExecutionException
from mlflow.projects.docker import _create_docker_build_ctx
from servers import clean_env, free_port

from deploy import images
from steps.backends import kubernetes as kubernetes_backend
from steps.backends.kubernetes import KubernetesTarget, load_target, render_job
from steps.config.compose import compose_config
from steps.config.plan import ENTRY_POINTS, pipeline_steps, step_batches
from steps.config.schema import Backend
from steps.errors import PipelineError
from steps.tracking.provenance import CHECKOUT_ENV, git_state

FLAVORS = {"k8s-cpu": "cpu", "k8s-cuda": "cuda"}


def target(compute: str) -> KubernetesTarget:
    return load_target(compose_config([f"compute={compute}"]).compute.backend)


def rendered(compute: str, entry_point: str, overrides: str = "") -> dict:
    cfg = compose_config([f"compute={compute}"])
    parameters = {"model": cfg.model.name, "compute": compute, "overrides": overrides}
    return render_job(target(compute), entry_point, parameters)


def mlproject(path: Path) -> dict:
    return yaml.safe_load((path / "MLproject").read_text())


@pytest.mark.parametrize("compute", FLAVORS)
def test_k8s_compute_is_the_hardware_option_with_a_kubernetes_backend(compute: str) -> None:
    cfg = compose_config([f"compute={compute}"])
    local = compose_config([f"compute={FLAVORS[compute]}"]).compute
    assert cfg.compute.backend.name is Backend.kubernetes
    assert cfg.compute.target == FLAVORS[compute]
    assert (cfg.compute.torch_device, cfg.compute.onnx_provider) == (
        local.torch_device,
        local.onnx_provider,
    )
    assert cfg.main.parallel is None and local.backend.name is Backend.local


@pytest.mark.parametrize("compute", FLAVORS)
def test_k8s_project_has_the_top_level_entry_points_and_the_pinned_base_image(
    compute: str,
) -> None:
    flavor = FLAVORS[compute]
    project_dir = target(compute).project_dir
    ours, top = mlproject(project_dir), mlproject(PROJECT_ROOT)
    for entry in top["entry_points"].values():
        entry["parameters"]["compute"]["default"] = flavor
    assert ours["entry_points"] == top["entry_points"]
    assert ours["docker_env"]["image"] == images.image_tag(flavor)
    # The image MLflow builds copies what these point at: the code of the commit being run.
    for name in ("steps", "conf"):
        assert (project_dir / name).resolve() == PROJECT_ROOT / name


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
@pytest.mark.parametrize("compute", FLAVORS)
def test_mlflow_renders_a_job_that_matches_the_kubernetes_api(compute: str, entry_point: str):
    job = rendered(compute, entry_point, overrides="evaluate.max_items=3 fetch.cache_dir=/cache")
    validate(job)
    model = typed(job)
    (container,) = model.spec.template.spec.containers
    repository = target(compute).backend_config["repository-uri"]
    commit, _ = git_state()
    assert container.image.startswith(f"{repository}:{commit[:7]}@sha256:")
    assert container.command[:4] == ["python", "-m", "steps", entry_point]
    env = {var.name: var for var in container.env}
    assert {"MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"} <= env.keys()
    token = env["HF_TOKEN"].value_from.secret_key_ref
    assert (token.name, token.key, token.optional) == ("llm-to-mlflow", "hf-token", True)
    assert_tracking_credentials_from_the_secret(env)
    assert env[CHECKOUT_ENV["commit"]].value == commit
    assert env[kubernetes_backend.QUOTED_ARGS_ENV].value == "1"
    (volume,) = model.spec.template.spec.volumes
    assert volume.persistent_volume_claim.claim_name == "llm-to-mlflow-cache"
    assert [(m.name, m.mount_path) for m in container.volume_mounts] == [("cache", "/cache")]
    assert env["XDG_CACHE_HOME"].value == "/cache"
    assert model.spec.backoff_limit == 0 and model.metadata.namespace == "llm-to-mlflow"
    gpus = (container.resources.limits or {}).get("nvidia.com/gpu")
    assert gpus == ("1" if compute == "k8s-cuda" else None)
    assert container.resources.requests["memory"]


def test_the_schema_check_catches_a_misspelled_field() -> None:
    job = rendered("k8s-cpu", "fetch")
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(job)


def test_the_pods_command_runs_in_a_copy_of_the_project_without_git(
    bundled_fetch, session_cache: Path, tmp_path: Path
) -> None:
    """The rendered Job's command and env, run as the pod runs them (no shell), in the project
    folder MLflow's image build copies (symlinks followed, no .git): overrides with spaces
    arrive whole, and the run records the commit main handed over."""
    overrides = f"fetch.cache_dir={session_cache} generation.max_new_tokens=7"
    job = rendered("k8s-cpu", "fetch", overrides=overrides)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    with tarfile.open(_create_docker_build_ctx(str(target("k8s-cpu").project_dir), "")) as ctx:
        ctx.extractall(tmp_path / "image", filter="data")
    (workdir,) = (tmp_path / "image").iterdir()
    assert not (workdir / "steps").is_symlink() and not (workdir / ".git").exists()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("pods"))
    env = {var["name"]: var["value"] for var in container["env"] if "value" in var}
    env |= {
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_RUN_ID": run.info.run_id,
        "MLFLOW_EXPERIMENT_ID": run.info.experiment_id,
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "HF_HOME": str(tmp_path / "cache" / "huggingface"),
    }
    result = subprocess.run(
        container["command"],
        cwd=workdir,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    recorded = client.get_run(run.info.run_id).data
    assert recorded.params["generation.max_new_tokens"] == "7"
    assert recorded.params["fetch.cache_dir"] == str(session_cache)
    commit, dirty = git_state()
    assert recorded.tags["git.commit"] == commit
    assert recorded.tags["git.dirty"] == str(dirty).lower()


def test_shell_quoted_arguments_are_unquoted_once(monkeypatch: pytest.MonkeyPatch) -> None:
    meant = ["main", "--overrides", "a=1 b='x y'", "--steps", ""]
    monkeypatch.setenv(kubernetes_backend.QUOTED_ARGS_ENV, "1")
    assert kubernetes_backend.unquote_args([shlex.quote(arg) for arg in meant]) == meant
    # Consumed: main's own child processes get their arguments from a shell.
    assert kubernetes_backend.unquote_args(["'a b'"]) == ["'a b'"]


def test_main_fails_in_seconds_without_a_cluster(tmp_path: Path) -> None:
    store = tmp_path / "mlflow.db"
    result = subprocess.run(
        [sys.executable, "-m", "steps", "main", "--compute", "k8s-cpu"],
        env=clean_env(
            KUBECONFIG=str(tmp_path / "no-kubeconfig"),
            MLFLOW_TRACKING_URI=f"sqlite:///{store}",
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "no Kubernetes cluster to run the steps on" in result.stderr
    assert "KUBECONFIG" in result.stderr and "Traceback" not in result.stderr
    assert not store.exists(), "nothing may be tracked before the backend is checked"


def test_a_cluster_that_does_not_answer_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = f"https://127.0.0.1:{free_port()}"
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "ctx",
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    with pytest.raises(PipelineError, match=f"API server at {server} did not answer"):
        kubernetes_backend.check_cluster(target("k8s-cpu"))


def test_no_docker_engine_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'no-docker.sock'}")
    with pytest.raises(PipelineError, match="no Docker engine answers here"):
        kubernetes_backend.check_docker(target("k8s-cpu").base_image)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("sqlite:///mlflow.db", "which they cannot reach"),
        ("http://127.0.0.1:5000", "loopback address"),
        ("http://localhost:5000", "KUBE_MLFLOW_TRACKING_URI"),
    ],
)
def test_a_tracking_uri_pods_cannot_reach_is_refused(
    uri: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBE_MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(PipelineError, match=expected):
        kubernetes_backend.check_pod_tracking_uri(uri)
    kubernetes_backend.check_pod_tracking_uri("https://mlflow.internal.example:443")
    monkeypatch.setenv("KUBE_MLFLOW_TRACKING_URI", "http://mlflow.mlflow.svc:5000")
    kubernetes_backend.check_pod_tracking_uri(uri)


def test_the_example_registry_must_be_replaced() -> None:
    shipped = target("k8s-cpu")
    with pytest.raises(PipelineError, match="still the example"):
        kubernetes_backend.check_repository(shipped)
    shipped.backend_config["repository-uri"] = "ghcr.io/acme/llm-to-mlflow"
    kubernetes_backend.check_repository(shipped)


def test_a_missing_backend_config_is_a_config_error(tmp_path: Path) -> None:
    backend = compose_config(["compute=k8s-cpu"]).compute.backend
    backend.config = "deploy/kubernetes/cpu/missing.json"
    with pytest.raises(PipelineError, match="cannot read MLflow's Kubernetes backend config"):
        load_target(backend)


@pytest.mark.parametrize(
    ("parallel", "expected"),
    [
        (False, [["fetch"], ["wrap_transformers"], ["wrap_onnx.fp32"], ["wrap_onnx.int8"],
                 ["evaluate"], ["register"]]),
        (True, [["fetch"], ["wrap_transformers", "wrap_onnx.fp32", "wrap_onnx.int8"],
                ["evaluate"], ["register"]]),
    ],
)  # fmt: skip
def test_only_the_wraps_run_at_the_same_time(parallel: bool, expected: list) -> None:
    cfg = compose_config(["compute.onnx_candidates=[fp32,int8]"])
    batches = step_batches(pipeline_steps(cfg), parallel)
    assert [[step.name for step in batch] for batch in batches] == expected
    prebuilt = compose_config(["model=phi3-mini-4k", "main.steps=[fetch,wrap_onnx]"])
    assert [[s.name for s in b] for b in step_batches(pipeline_steps(prebuilt), parallel)] == [
        ["fetch"],
        ["fetch_onnx"],
        ["wrap_onnx"],
    ]


def render_job_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "steps", "render_job", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_render_job_prints_the_job() -> None:
    result = render_job_cli("wrap_onnx", "--compute", "k8s-cuda")
    assert result.returncode == 0, result.stderr
    job = yaml.safe_load(result.stdout)
    validate(job)
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][3] == "wrap_onnx"
    wrong = render_job_cli("fetch", "--compute", "cpu")
    assert wrong.returncode == 2
    assert "k8s-cpu" in wrong.stderr and "Traceback" not in wrong.stderr


def test_a_submission_gets_through_mlflow_up_to_the_image_build(
    tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow loads our docker_env project, takes the parameters and tags the run for the
    Kubernetes backend; the image build is where a machine without Docker stops."""
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'no-docker.sock'}")
    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment("submit")
    parameters = {"model": "smollm2-135m", "compute": "k8s-cpu", "overrides": ""}
    with pytest.raises(ExecutionException, match="docker info"):
        kubernetes_backend.submit(target("k8s-cpu"), "fetch", parameters, experiment_id)
    (run,) = client.search_runs([experiment_id])
    assert run.data.tags["mlflow.project.backend"] == "kubernetes"
    assert run.data.tags["mlflow.project.entryPoint"] == "fetch"
    assert run.data.params["compute"] == "k8s-cpu"
