"""The Model Registry: one version per distinct model, the versions that hold an alias, and a lock
that serialises the registers of one registered model, wherever they run.

Why a lock: registering is a read-then-write twice over (is this model already a version? does it
beat the champion?), and MLflow has no transaction across calls. Two pipelines that interleave
would register one model twice, or move `champion` to the worse of two models. Repairing after
the fact (re-read, move the alias back) cannot tell a concurrent register from a person who moved
the alias on purpose, so the registers of one registered model take turns instead.

The lock is a registered model named `<name>.register-lock`, which the tracking server's database
creates at most once (a second create fails), and the holder deletes when done. A lock left by a
holder that died is broken when its holder's run has ended or it is older than STALE_AFTER_S
(by this machine's clock against the server's: they must agree to within that).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from steps.config.schema import Runtime
from steps.errors import PipelineError
from steps.evaluation.selection import alias_for
from steps.tracking.models import logged_model_id
from steps.tracking.server import tracking_errors, who

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".register-lock"
# A register holds the lock for seconds; a lock this old was left by a holder that died.
STALE_AFTER_S = 300.0
WAIT_AT_MOST_S = 900.0
ENDED = ("FINISHED", "FAILED", "KILLED")


def registered_model_name(variant: str, runtime: Runtime, target: str) -> str:
    """`<variant>-<runtime>-<compute target>`: where the register step puts a chosen model."""
    return f"{variant}-{runtime.value}-{target}"


def _already_exists(error: MlflowException) -> bool:
    return error.error_code in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS")


def _held(client: MlflowClient, lock: str) -> RegisteredModel | None:
    try:
        return client.get_registered_model(lock)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None  # released meanwhile
        raise


def _is_stale(client: MlflowClient, held: RegisteredModel) -> str | None:
    """Why the lock's holder is gone, or None while it may still be registering."""
    age = time.time() - held.creation_timestamp / 1000
    if age > STALE_AFTER_S:
        return f"held for {age:.0f} s"
    holder = held.tags.get("register.holder", "")
    with contextlib.suppress(MlflowException):
        status = client.get_run(holder).info.status
        if status in ENDED:
            return f"its holder, run {holder}, is {status}"
    return None


def _break(client: MlflowClient, lock: str, held: RegisteredModel, why: str) -> None:
    log.warning("breaking the registry lock %s: %s", lock, why)
    current = _held(client, lock)
    if current is None or current.creation_timestamp != held.creation_timestamp:
        return  # someone else broke it first (and may hold a fresh one)
    try:
        client.delete_registered_model(lock)
    except MlflowException as error:
        if error.error_code == "PERMISSION_DENIED":
            raise PipelineError(
                f"the registry lock {lock} is stale ({why}) and {who()} may not delete it: ask "
                f"the tracking server's admin to delete the registered model {lock}"
            ) from None
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


@contextlib.contextmanager
def registry_lock(name: str, holder_run_id: str) -> Iterator[None]:
    """Hold the lock of registered model `name` for the block."""
    client = MlflowClient()
    lock = f"{name}{LOCK_SUFFIX}"
    started, delay, announced = time.monotonic(), 0.2, False
    while True:
        try:
            client.create_registered_model(
                lock,
                tags={"register.holder": holder_run_id},
                description=f"Held by register run {holder_run_id} while it registers into "
                f"{name}; deleted when it is done. Delete it only if that run is dead.",
            )
            break
        except MlflowException as error:
            if not _already_exists(error):
                raise
        held = _held(client, lock)
        if held is None:
            continue
        why = _is_stale(client, held)
        if why:
            _break(client, lock, held, why)
            continue
        waited = time.monotonic() - started
        if waited > WAIT_AT_MOST_S:
            raise PipelineError(
                f"waited {waited:.0f} s for the registry lock {lock}, held by run "
                f"{held.tags.get('register.holder')}: run register again later"
            )
        if not announced:
            log.info(
                "waiting for run %s, which is registering into %s",
                held.tags.get("register.holder"), name,
            )  # fmt: skip
            announced = True
        time.sleep(delay)
        delay = min(delay * 2, 2.0)
    try:
        yield
    finally:
        try:
            client.delete_registered_model(lock)
        except MlflowException as error:
            # The registry itself is complete; the next register breaks the lock once stale.
            log.warning("could not release the registry lock %s: %s", lock, error.message)


def _versions_tagged(client: MlflowClient, name: str, tag: str, value: str) -> list[ModelVersion]:
    found = client.search_model_versions(f"name = '{name}' and tags.`{tag}` = '{value}'")
    return sorted(found, key=lambda version: int(version.version))


def register_version(
    name: str, model_uri: str, model_key: str, description: str, tags: dict[str, str]
) -> tuple[ModelVersion, bool]:
    """(the version holding this model, whether it was created now). A model is the same model
    when its `model.key` is (two pipelines that both wrapped it), or its URI (versions registered
    before models had keys). Hold registry_lock around it."""
    client = MlflowClient()
    try:
        client.create_registered_model(name, description=f"{name}: chat model from the pipeline")
    except MlflowException as error:
        if not _already_exists(error):
            raise
    existing = _versions_tagged(client, name, "model.key", model_key) or _versions_tagged(
        client, name, "source.model_uri", model_uri
    )
    if existing:
        log.info("%s is already version %s of %s", model_uri, existing[0].version, name)
        version, created = existing[0], False
    else:
        # One call: the version is created whole, with its tags and model card, or not at all.
        version = client.create_model_version(
            name,
            model_uri,
            tags=tags | {"model.key": model_key, "source.model_uri": model_uri},
            description=description,
            model_id=logged_model_id(model_uri),
        )
        created = True
    if model_id := logged_model_id(version.source):
        _list_on_logged_model(client, model_id, name, version.version)
    return version, created


def _list_on_logged_model(client: MlflowClient, model_id: str, name: str, version: str) -> None:
    """What mlflow.register_model records on the logged model, and the UI reads for the
    "Registered models" of the model list and of the runs that logged or used the model."""
    listed = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    entry = {"name": name, "version": int(version)}
    if entry not in listed:
        client.set_logged_model_tags(
            model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*listed, entry])}
        )


def version_by_alias(name: str, alias: str) -> ModelVersion | None:
    """None where the model or the alias does not exist; a refusal or a lost server raises."""
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as error:
        # MLflow answers a missing alias with INVALID_PARAMETER_VALUE.
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def set_alias(name: str, alias: str, version: str) -> None:
    MlflowClient().set_registered_model_alias(name, alias, version)


@dataclass(frozen=True)
class Registered:
    """Where a model was registered: the version, its alias, and the champion it was compared
    with."""

    name: str
    version: str
    alias: str
    created: bool  # False: the same model was already that version
    champion_before: str | None


def register_model(
    name: str, model_uri: str, model_key: str, card: str, tags: dict[str, str],
    summary: dict[str, float], passed_gate: bool, holder_run_id: str, tracking_uri: str,
) -> Registered:  # fmt: skip
    """The registry transaction of one register run, taking its turn under registry_lock: the
    version holding this model (created with its model card and tags, or the existing one of
    the same `model_key`), then its alias (steps.evaluation.selection.alias_for). A refusal or
    a lost server ends as one line."""
    with (
        tracking_errors(tracking_uri, f"EDIT permission on registered model {name!r}"),
        registry_lock(name, holder_run_id),
    ):
        version, created = register_version(name, model_uri, model_key, card, tags)
        champion = version_by_alias(name, "champion")
        alias = alias_for(passed_gate, champion, str(version.version), summary)
        set_alias(name, alias, version.version)
    return Registered(
        name, str(version.version), alias, created, str(champion.version) if champion else None
    )
