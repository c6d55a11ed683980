"""The Model Registry: a registered model's version for a logged model (reused when it exists,
so registering twice is a no-op), and the versions that hold an alias."""

from __future__ import annotations

import logging

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from steps.config.schema import Runtime

log = logging.getLogger(__name__)


def registered_model_name(variant: str, runtime: Runtime, target: str) -> str:
    """`<variant>-<runtime>-<compute target>`: where the register step puts a chosen model."""
    return f"{variant}-{runtime.value}-{target}"


def register_version(
    name: str, model_uri: str, description: str, tags: dict[str, str]
) -> tuple[ModelVersion, bool]:
    """(the version holding this model, whether it was created now)."""
    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"{name}: chat model from the pipeline")
    existing = client.search_model_versions(
        f"name = '{name}' and tags.`source.model_uri` = '{model_uri}'"
    )
    if existing:
        log.info("%s is already version %s of %s", model_uri, existing[0].version, name)
        return existing[0], False
    version = mlflow.register_model(model_uri, name, tags=tags | {"source.model_uri": model_uri})
    client.update_model_version(name, version.version, description=description)
    return version, True


def version_by_alias(name: str, alias: str) -> ModelVersion | None:
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def set_alias(name: str, alias: str, version: str) -> None:
    MlflowClient().set_registered_model_alias(name, alias, version)
