"""Kubernetes manifests as the API sees them: checked against the API's JSON schema strictly
(a misspelled field fails) and read back as the kubernetes client's typed models; and what every
pod that talks to the tracking server must take from the Secret."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import kubernetes.client
import kubernetes_validate

KUBERNETES_VERSION = "1.32.0"


@dataclass
class _JsonResponse:
    """What `ApiClient.deserialize` reads from an HTTP response: the body as JSON text."""

    data: str


def validate(document: dict) -> None:
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def typed(document: dict) -> Any:
    """The document as the kubernetes client's model class (V1CronJob, V1Job, ...)."""
    version = document["apiVersion"].rsplit("/", 1)[-1]
    model = f"{version.capitalize()}{document['kind']}"
    with kubernetes.client.ApiClient() as client:
        return client.deserialize(_JsonResponse(json.dumps(document)), model)


TRACKING_CREDENTIALS = {
    "MLFLOW_TRACKING_USERNAME": "tracking-username",
    "MLFLOW_TRACKING_PASSWORD": "tracking-password",
    "MLFLOW_TRACKING_TOKEN": "tracking-token",
}


def assert_tracking_credentials_from_the_secret(env: dict) -> None:
    """MLflow's own credential variables, each from an optional key of the Secret (a server
    without logins needs none), never a value written down."""
    for name, key in TRACKING_CREDENTIALS.items():
        ref = env[name].value_from.secret_key_ref
        assert (ref.name, ref.key, ref.optional) == ("llm-to-mlflow", key, True)
        assert env[name].value is None
