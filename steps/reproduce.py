"""The command that reruns a recorded run: the same code (its git commit), entry point and
resolved config.

    python -m steps reproduce RUN_ID [--repo URI] [--env-manager local|uv|conda|virtualenv]

The config comes from the run's `config.yaml`, not from its MLproject parameters, so runs started
outside `mlflow run` (a step called from Python, a test) are covered too: the overrides are the
leaves where the recorded config differs from the defaults of its model and compute choice. At
the same commit they compose the same config, so the new run's `config.sha256` tag equals the
old one's. What the config does not hold stays in the environment: the tracking server (the
command names the one the run was read from) and the snapshot cache (XDG_CACHE_HOME).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf

from steps.config.compose import compose_config
from steps.errors import PipelineError
from steps.tracking.runs import default_tracking_uri
from steps.tracking.server import check_tracking_server, redacted, tracking_errors

ENTRY_POINT_PARAMS = ("model", "compute", "overrides")


@dataclass(frozen=True)
class Reproduction:
    command: str
    warnings: tuple[str, ...]


def hydra_value(value: Any) -> str:
    """A value in Hydra's override grammar; strings always quoted so that they stay strings."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # Hydra escapes quotes, backslashes right before a quote (the closing one included) and
        # the `${` of an interpolation.
        body = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
        body = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, body).replace("${", "\\${")
        return f"'{body}'"
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{hydra_value(item)}" for key, item in value.items()) + "}"
    raise TypeError(f"no Hydra override syntax for {type(value).__name__}: {value!r}")


def config_overrides(
    recorded: dict, defaults: dict, schema: frozenset[str] = frozenset(), prefix: str = ""
) -> list[str]:
    """Hydra overrides that turn `defaults` into `recorded` (both plain nested dicts).

    A schema field (a path in `schema`) that the recorded config lacks is left alone rather
    than removed: no override can remove one, so the run was made by code from before the
    field existed, and at its commit the field does not exist either. The other way round, a
    recorded key that today's schema no longer has at a schema level (not in a free dict) was
    a field at the run's commit (the schema rejects unknown keys), so it is set there, not
    added with `+` (which Hydra refuses for a key that exists)."""
    overrides = []
    schema_level = any(f"{prefix}{key}" in schema for key in defaults)
    for key, value in recorded.items():
        path = f"{prefix}{key}"
        if key not in defaults:
            overrides.append(f"{'' if schema_level else '+'}{path}={hydra_value(value)}")
        elif isinstance(value, dict) and isinstance(defaults[key], dict):
            overrides += config_overrides(value, defaults[key], schema, f"{path}.")
        elif value != defaults[key]:
            overrides.append(f"{path}={hydra_value(value)}")
    removed = [f"{prefix}{key}" for key in defaults if key not in recorded]
    overrides += [f"~{path}" for path in removed if path not in schema]
    return overrides


def default_config(model: str, compute: str) -> tuple[dict, frozenset[str]]:
    """The defaults of a model and compute choice, and the paths of their schema fields."""
    cfg = compose_config([f"model={model}", f"compute={compute}"])
    values = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    return values, frozenset(_schema_fields(cfg))


def _schema_fields(node: Any, prefix: str = "") -> Iterator[str]:
    """Dataclass fields, nested ones included (also inside dicts of dataclasses, such as
    model.prebuilt_onnx.<target>); the keys of free dicts are not fields."""
    for item in dataclasses.fields(node):
        path = f"{prefix}{item.name}"
        yield path
        value = getattr(node, item.name)
        if dataclasses.is_dataclass(value):
            yield from _schema_fields(value, f"{path}.")
        elif isinstance(value, dict):
            for key, entry in value.items():
                if dataclasses.is_dataclass(entry):
                    yield from _schema_fields(entry, f"{path}.{key}.")


def reproduce_command(
    run: Run,
    recorded_config: dict,
    tracking_uri: str,
    experiment_name: str,
    repo: str | None = None,
    env_manager: str | None = None,
) -> Reproduction:
    """The `mlflow run` command that reruns a recorded run: its repository at its git commit,
    its entry point, model and compute, and as overrides only the recorded values that differ
    from that commit's defaults here; with warnings where the rerun cannot be exact (a dirty
    tree, a different tracking store)."""
    tags = run.data.tags
    commit = tags.get("git.commit", "unknown")
    if commit == "unknown" or "pipeline.step" not in tags:
        raise PipelineError(
            f"run {run.info.run_id} records no git commit or pipeline step: it was not made by "
            "this pipeline from a git checkout, so there is nothing to check out"
        )
    repo = repo or tags.get("git.repo")
    if not repo:
        raise PipelineError(f"run {run.info.run_id} records no repository: pass --repo URI")
    model, compute = recorded_config["model"]["name"], recorded_config["compute"]["name"]
    overrides = config_overrides(recorded_config, *default_config(model, compute))
    warnings = []
    if tags.get("git.dirty") != "false":
        warnings.append(
            f"run {run.info.run_id} was made from a tree with uncommitted changes "
            f"(git.diff_sha256 {tags.get('git.diff_sha256', 'unknown')[:12]}): commit "
            f"{commit[:12]} alone does not hold the code that ran"
        )
    if tags["pipeline.step"] == "main" and not recorded_config["main"]["rerun"]:
        warnings.append(
            "main reuses the finished steps of the same commit and config in this tracking "
            "store: add main.rerun=true to the overrides to compute them again"
        )
    mlflow_run = [
        "mlflow", "run", "$project", "--version", commit,
        "-e", tags["pipeline.step"],
        "--experiment-name", experiment_name,
        "-P", f"model={model}", "-P", f"compute={compute}",
        "-P", f"overrides={shlex.join(overrides)}",
    ]  # fmt: skip
    if env_manager:
        mlflow_run += ["--env-manager", env_manager]
    # `mlflow run` checks --version out in place in a local repository, so the command runs it
    # in a fresh clone and leaves the user's checkout alone.
    shown_uri = redacted(tracking_uri)
    mlflow_args = " ".join('"$project"' if a == "$project" else shlex.quote(a) for a in mlflow_run)
    command = (
        f"project=$(mktemp -d)/{run.info.run_id[:8]} && "
        f'git clone --quiet {shlex.quote(repo)} "$project" && '
        f"MLFLOW_TRACKING_URI={shlex.quote(shown_uri)} {mlflow_args}"
    )
    if shown_uri != tracking_uri:
        warnings.append(
            "the tracking URI holds credentials, which the command leaves out: export "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) and "
            "put the server's plain address in MLFLOW_TRACKING_URI"
        )
    return Reproduction(command, tuple(warnings))


def reproduce_run(
    run_id: str, repo: str | None = None, env_manager: str | None = None
) -> Reproduction:
    """The reproduction of a run in the current tracking store (reproduce_command on its
    recorded config)."""
    uri = default_tracking_uri()
    check_tracking_server(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    try:
        with tracking_errors(uri, needs=f"READ permission on run {run_id}'s experiment"):
            run = client.get_run(run_id)
            recorded = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml"))
    except MlflowException as error:  # not a refusal or a lost server: most likely no such run
        raise PipelineError(
            f"cannot read run {run_id} and its config.yaml from {redacted(uri)}: {error.message}. "
            "Point MLFLOW_TRACKING_URI at the store that holds it"
        ) from None
    experiment = client.get_experiment(run.info.experiment_id).name
    return reproduce_command(run, recorded, uri, experiment, repo, env_manager)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m steps reproduce", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("run_id")
    parser.add_argument("--repo", help="git repository to clone (default: the run's git.repo tag)")
    parser.add_argument(
        "--env-manager", choices=("local", "uv", "virtualenv", "conda"), help="for mlflow run"
    )
    args = parser.parse_args(argv)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # stdout and stderr stay terse
    try:
        reproduction = reproduce_run(args.run_id, args.repo, args.env_manager)
    except PipelineError as error:
        print(f"error: reproduce: {error}", file=sys.stderr)
        return error.exit_code
    for warning in reproduction.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(reproduction.command)
    return 0
