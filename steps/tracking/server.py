"""The tracking server as the steps meet it: reachable and accepting our credentials before any
heavy work, and its refusals and disappearances as one line instead of a traceback.

Credentials are MLflow's own: MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or
MLFLOW_TRACKING_TOKEN, or ~/.mlflow/credentials), read by MLflow's client; nothing here stores or
prints them. A server that goes away mid-step is retried by MLflow's client for a bounded time
(MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR: about 4 minutes by
default), and a step still without it after that fails with one line saying so.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import requests
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_TRACKING_TOKEN,
)
from mlflow.exceptions import MlflowException
from mlflow.utils.credentials import get_default_host_creds, read_mlflow_creds
from mlflow.utils.rest_utils import http_request

from steps.errors import PipelineError

CREDENTIALS_HINT = (
    "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an "
    "account of that server"
)


def redacted(uri: str) -> str:
    """The URI without a user or password (requests sends `http://user:pass@host` as basic
    auth, so such a URI is a credential)."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=f"***@{netloc}"))


def who() -> str:
    """Whose credentials MLflow sends, without the secret."""
    username = read_mlflow_creds().username
    if username:
        return f"user {username!r}"
    return "the token in MLFLOW_TRACKING_TOKEN" if MLFLOW_TRACKING_TOKEN.get() else "no credentials"


def check_tracking_server(uri: str, timeout: float = 10.0) -> None:
    """Fail in seconds, before any heavy work, when a remote tracking server is not there or
    refuses our credentials (MLflow's own client retries for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        response = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
        response.raise_for_status()
    except requests.RequestException as error:
        raise PipelineError(
            f"the MLflow tracking server at {redacted(uri)} is not reachable "
            f"({type(error).__name__}); start it or point MLFLOW_TRACKING_URI at a running one"
        ) from None
    # /health answers anyone; a search needs a login where the server asks for one.
    with tracking_errors(uri):
        response = http_request(
            get_default_host_creds(uri),
            "/api/2.0/mlflow/experiments/search",
            "GET",
            params={"max_results": 1},
            max_retries=0,
            timeout=timeout,
        )
    if response.status_code in (401, 403):
        raise _refused(uri)


def _refused(uri: str) -> PipelineError:
    return PipelineError(
        f"the MLflow tracking server at {redacted(uri)} refused {who()} (not authenticated): "
        f"{CREDENTIALS_HINT}"
    )


def _lost_connection(error: BaseException) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, requests.ConnectionError | requests.Timeout):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def retry_budget_s() -> float:
    """How long MLflow's client keeps retrying a server that does not answer: urllib3 sleeps
    factor * 2**(n-1) seconds after the n-th failure in a row (none after the first, at most
    120), without its jitter."""
    factor = MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()
    failures = range(2, MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() + 1)
    return sum(min(factor * 2 ** (n - 1), 120) for n in failures)


def explained(error: MlflowException, uri: str, needs: str = "") -> PipelineError | MlflowException:
    """A one-line PipelineError for a refusal or a lost server; other errors as they were."""
    shown = redacted(uri)
    code = error.error_code
    if code in ("UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED"):
        return _refused(uri)
    if code == "PERMISSION_DENIED":
        endpoint = re.search(r"endpoint (\S+)", error.message)
        what = f" ({endpoint.group(1)})" if endpoint else ""
        needed = needs or "the permission that call needs"
        return PipelineError(
            f"the MLflow tracking server at {shown} denied {who()}{what}: this step needs "
            f"{needed}; ask the server's admin to grant it"
        )
    if _lost_connection(error):
        return PipelineError(
            f"lost the MLflow tracking server at {shown}: it did not answer within MLflow's "
            f"retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES={MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()}, "
            f"about {retry_budget_s():.0f} s). This step's run stays unfinished and is never "
            "reused; once the server is back, run the pipeline again: it reuses the steps that "
            "finished"
        )
    return error


@contextlib.contextmanager
def tracking_errors(uri: str, needs: str = "") -> Iterator[None]:
    """Turn the tracking server's refusals and disappearance inside the block into one line;
    `needs` names the permission the block's writes need."""
    try:
        yield
    except MlflowException as error:
        failure = explained(error, uri, needs)
        if failure is error:
            raise
        raise failure from None
