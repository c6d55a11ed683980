"""main's child runs as Kubernetes Jobs, through MLflow's own Kubernetes backend.

For each step MLflow builds an image FROM the project's docker_env image with the project
folder on top (deploy/kubernetes/<flavor>: an MLproject with the same entry points, and symlinks
that bring steps/ and conf/ along), pushes it to the backend config's repository-uri and creates
a Job from its job template. This module
- reads our backend config (paths relative to the repository root, wherever main runs),
- checks, before the first step, everything a submission needs that can be checked from here
  (a cluster that answers, the namespace, a Docker engine, the base image, a tracking server
  the pods can reach, a real registry), so that a missing piece fails in seconds,
- hands the pods what MLflow does not: the checkout's git state (the image has no .git), as
  env entries of the job template, and
- renders the Job with MLflow's own code, for `python -m steps render_job` and the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from mlflow.exceptions import ExecutionException

from steps.config.compose import compose_config, group_options
from steps.config.schema import Backend, BackendConfig
from steps.errors import ConfigError, PipelineError
from steps.tracking.provenance import PROJECT_ROOT, checkout_env
from steps.tracking.server import redacted

# A registry that cannot exist (RFC 2606): the shipped kubernetes_config.json files name it
# until a user puts theirs in.
EXAMPLE_REGISTRY = "registry.example.com"
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "0.0.0.0")
_TIMEOUT_S = 10
# MLflow's Kubernetes backend shell-quotes each word of the entry point's command but the pod
# runs it without a shell, so `--overrides ''` arrives as the two characters ''. The job
# templates set this variable and the launcher takes that one layer of quoting off.
QUOTED_ARGS_ENV = "LLM_TO_MLFLOW_ARGS_SHELL_QUOTED"


def unquote_args(argv: list[str]) -> list[str]:
    """argv as the entry point's command meant it, when QUOTED_ARGS_ENV says it arrived
    shell-quoted (the variable is consumed, so that child processes see plain arguments)."""
    if os.environ.pop(QUOTED_ARGS_ENV, None) != "1":
        return argv

    def unquote(arg: str) -> str:
        try:
            words = shlex.split(arg)
        except ValueError:
            return arg
        return words[0] if len(words) == 1 and shlex.quote(words[0]) == arg else arg

    return [unquote(arg) for arg in argv]


@dataclass
class KubernetesTarget:
    """What MLflow needs to submit a step: the project folder and its backend config."""

    project_dir: Path
    config_path: Path
    backend_config: dict[str, Any]  # kube-job-template-path made absolute
    job_template: dict[str, Any]  # as MLflow's parser read it from that path

    @property
    def namespace(self) -> str:
        return self.job_template["metadata"]["namespace"]

    @property
    def base_image(self) -> str:
        from mlflow.projects.utils import load_project

        return load_project(str(self.project_dir)).docker_env["image"]


def load_target(backend: BackendConfig, root: Path = PROJECT_ROOT) -> KubernetesTarget:
    """The project and backend config that compute.backend names, checked by MLflow's own
    parser; a ConfigError names what is missing."""
    if backend.name is not Backend.kubernetes:
        raise ConfigError(
            f"compute.backend.name={backend.name.value}: this needs a compute option whose "
            f"backend is kubernetes: {', '.join(kubernetes_compute_options())}"
        )
    project_dir, config_path = root / backend.project_dir, root / backend.config
    if not (project_dir / "MLproject").is_file():
        raise ConfigError(
            f"compute.backend.project_dir={backend.project_dir}: no MLproject in {project_dir}"
        )
    try:
        backend_config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"compute.backend.config={backend.config}: cannot read MLflow's Kubernetes backend "
            f"config ({error})"
        ) from None
    template = backend_config.get("kube-job-template-path")
    if template:
        backend_config["kube-job-template-path"] = str(root / template)
    from mlflow.projects import _parse_kubernetes_config

    try:
        parsed = _parse_kubernetes_config(backend_config)
    except ExecutionException as error:
        raise ConfigError(f"{config_path}: {error.message}") from None
    return KubernetesTarget(project_dir, config_path, backend_config, parsed["kube-job-template"])


def kubernetes_compute_options() -> list[str]:
    return [
        option
        for option in group_options("compute")
        if compose_config([f"compute={option}"]).compute.backend.name is Backend.kubernetes
    ]


def check_can_submit(target: KubernetesTarget, tracking_uri: str) -> None:
    """Everything a submission needs that can be checked before the first step, the most
    basic first: with no cluster at all, that is what the message says."""
    _check_packages()
    check_cluster(target)
    check_docker(target.base_image)
    check_pod_tracking_uri(tracking_uri)
    check_repository(target)


def _check_packages() -> None:
    try:
        import docker  # noqa: F401
        import kubernetes  # noqa: F401
    except ImportError as error:
        raise PipelineError(
            f"the Kubernetes backend needs the {error.name!r} package: "
            "pip install -e '.[kubernetes]'"
        ) from None


def check_cluster(target: KubernetesTarget) -> None:
    """A cluster from the kubeconfig (or the pod's service account) that answers, has the job
    template's namespace and lets us list Jobs there (MLflow polls them)."""
    import kubernetes
    import urllib3
    from kubernetes.config.config_exception import ConfigException

    context = target.backend_config.get("kube-context")
    # The kubernetes package reads KUBECONFIG once, when it is imported.
    kubeconfig = os.environ.get("KUBECONFIG", "~/.kube/config")
    try:
        kubernetes.config.load_kube_config(config_file=kubeconfig, context=context)
    except (OSError, ConfigException, TypeError) as kubeconfig_error:
        try:
            kubernetes.config.load_incluster_config()
        except ConfigException:
            raise PipelineError(
                f"no Kubernetes cluster to run the steps on: the kubeconfig ({kubeconfig}"
                + (f", context {context!r}" if context else "")
                + f") gives none ({kubeconfig_error}) and this is not a pod. Point KUBECONFIG "
                f"at your cluster's kubeconfig, or set kube-context in {target.config_path}; "
                "without a cluster use -P compute=cpu"
            ) from None
    api = kubernetes.client.BatchV1Api()
    host = api.api_client.configuration.host
    try:
        api.list_namespaced_job(target.namespace, limit=1, _request_timeout=_TIMEOUT_S)
    except kubernetes.client.ApiException as error:
        if error.status == 404:
            raise PipelineError(
                f"the cluster at {host} has no namespace {target.namespace!r}: "
                "kubectl apply -f deploy/kubernetes/cache-pvc.yaml creates it and the cache"
            ) from None
        raise PipelineError(
            f"the cluster at {host} refused to list Jobs in namespace {target.namespace!r} "
            f"({error.status} {error.reason}); the kubeconfig's user needs to create, get "
            "and list Jobs there"
        ) from None
    except urllib3.exceptions.HTTPError as error:
        raise PipelineError(
            f"the Kubernetes API server at {host} did not answer ({type(error).__name__}); "
            "is the cluster up and the kubeconfig's context the right one?"
        ) from None


def check_docker(base_image: str) -> None:
    """MLflow builds every step's image on this machine, FROM the prebuilt base image."""
    import docker

    try:
        client = docker.from_env(timeout=_TIMEOUT_S)
        client.ping()
    except docker.errors.DockerException as error:
        raise PipelineError(
            "no Docker engine answers here, and MLflow's Kubernetes backend builds and pushes "
            f"each step's image with it ({error}); start Docker, or submit from a machine "
            "that has one"
        ) from None
    try:
        client.images.get(base_image)
    except docker.errors.ImageNotFound:
        flavor = base_image.split(":", 1)[-1].split("-", 1)[0]
        raise PipelineError(
            f"the base image {base_image} is not on this machine: build it with "
            f"`make image-{flavor}` at this commit (or docker pull it from your registry "
            "and tag it so)"
        ) from None


def check_pod_tracking_uri(tracking_uri: str) -> None:
    """Pods get MLflow's tracking URI (KUBE_MLFLOW_TRACKING_URI when set): it must be a
    server they can reach, not a file or this machine's loopback address."""
    uri = os.environ.get("KUBE_MLFLOW_TRACKING_URI") or tracking_uri
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        raise PipelineError(
            f"the steps would run in pods against the tracking URI {redacted(uri)}, which they "
            "cannot reach; set MLFLOW_TRACKING_URI to an MLflow server the cluster can reach "
            "(README: Run on Kubernetes)"
        )
    if parts.hostname in _LOOPBACK_HOSTS:
        raise PipelineError(
            f"the tracking URI {redacted(uri)} is this machine's loopback address, which a pod "
            "cannot reach; set KUBE_MLFLOW_TRACKING_URI to the address pods use for the same server"
        )


def check_repository(target: KubernetesTarget) -> None:
    """Refuse the example registry of the shipped backend config: nothing could push there."""
    repository = target.backend_config["repository-uri"]
    if repository.split("/", 1)[0] == EXAMPLE_REGISTRY:
        raise PipelineError(
            f"repository-uri in {target.config_path} is still the example {repository}: set it "
            "to a repository of your registry that this machine can push to and the cluster "
            "can pull from"
        )


@contextlib.contextmanager
def submission_config(target: KubernetesTarget, env: dict[str, str]) -> Iterator[dict]:
    """The backend config for one submission, its job template also setting env (MLflow
    reads the template from a file and adds only its own variables)."""
    template = copy.deepcopy(target.job_template)
    container = template["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [
        *container.get("env", []),
        *({"name": k, "value": v} for k, v in env.items()),
    ]
    with tempfile.TemporaryDirectory(prefix="llm-to-mlflow-job-") as scratch:
        path = Path(scratch) / "job-template.yaml"
        path.write_text(yaml.safe_dump(template, sort_keys=False))
        yield {**target.backend_config, "kube-job-template-path": str(path)}


def submit(
    target: KubernetesTarget, entry_point: str, parameters: dict[str, str], experiment_id: str
):
    """Submit one entry point as a Job (MLflow builds and pushes its image first) and return
    MLflow's SubmittedRun without waiting."""
    import docker
    import kubernetes
    from mlflow.projects import run

    try:
        with submission_config(target, checkout_env()) as backend_config:
            return run(
                uri=str(target.project_dir),
                entry_point=entry_point,
                parameters=parameters,
                backend="kubernetes",
                backend_config=backend_config,
                experiment_id=experiment_id,
                synchronous=False,
                # The image layer with this commit's project files on top of the base image.
                build_image=True,
            )
    except docker.errors.DockerException as error:
        raise PipelineError(
            f"building or pushing the image for {entry_point} failed: {error}"
        ) from None
    except kubernetes.client.ApiException as error:
        raise PipelineError(
            f"the cluster refused the Job for {entry_point}: {error.status} {error.reason} "
            f"{error.body}"
        ) from None


def render_job(
    target: KubernetesTarget,
    entry_point: str,
    parameters: dict[str, str],
    run_id: str = "<run id>",
    experiment_id: str = "<experiment id>",
) -> dict[str, Any]:
    """The Job MLflow would create for this entry point, rendered by MLflow's own code; the
    image is the tag MLflow would build at this commit, its digest known only after the push."""
    from mlflow.projects import _parse_kubernetes_config
    from mlflow.projects import kubernetes as mlflow_kubernetes
    from mlflow.projects.docker import _get_docker_image_uri
    from mlflow.projects.utils import (
        get_entry_point_command,
        get_run_env_vars,
        load_project,
    )

    project = load_project(str(target.project_dir))
    image = _get_docker_image_uri(target.backend_config["repository-uri"], str(target.project_dir))
    env = get_run_env_vars(run_id=run_id, experiment_id=experiment_id)
    with submission_config(target, checkout_env()) as backend_config:
        kube_config = _parse_kubernetes_config(backend_config)
    command = get_entry_point_command(project, entry_point, parameters, storage_dir=None)
    return mlflow_kubernetes._get_kubernetes_job_definition(
        project.name,
        image,
        "sha256:<digest of the pushed image>",
        mlflow_kubernetes._get_run_command(command),
        env,
        kube_config["kube-job-template"],
    )


def cli(argv: list[str]) -> int:
    """python -m steps render_job ENTRY_POINT --compute k8s-cpu [--model M] [--overrides ...]"""
    parser = argparse.ArgumentParser(
        prog="python -m steps render_job",
        description="Print the Kubernetes Job that MLflow's backend would submit for a step.",
    )
    parser.add_argument("entry_point")
    parser.add_argument(
        "--compute", default="k8s-cpu", help="a compute option with a kubernetes backend"
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--overrides", default="")
    args = parser.parse_args(argv)
    try:
        chosen = [f"compute={args.compute}"] + ([f"model={args.model}"] if args.model else [])
        cfg = compose_config(chosen)
        target = load_target(cfg.compute.backend)
        parameters = {
            "model": cfg.model.name,
            "compute": cfg.compute.name,
            "overrides": args.overrides,
        }
        job = render_job(target, args.entry_point, parameters)
    except PipelineError as error:
        print(f"error: render_job: {error}", file=sys.stderr)
        return error.exit_code
    except ExecutionException as error:
        print(f"error: render_job: {error.message}", file=sys.stderr)
        return 2
    yaml.safe_dump(job, sys.stdout, sort_keys=False)
    return 0
