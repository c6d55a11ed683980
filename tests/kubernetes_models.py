"""Kubernetes manifests as the API sees them: checked against the API's JSON schema strictly
(a misspelled field fails) and read back as the kubernetes client's typed models."""

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
