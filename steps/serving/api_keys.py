"""Who may call the server: API keys, sent as OpenAI clients send theirs (`Authorization: Bearer
<key>`), checked on every route but /health (which probes and load balancers call without one).

Keys come from `--api-key` (repeatable), `--api-key-file` (one per line; blank lines and `#`
comments skipped: a Kubernetes Secret mounted as a file) and the LLM_TO_MLFLOW_API_KEYS
environment variable (comma-separated). A key is never logged or echoed: the server keeps only
their SHA-256 digests and compares digests in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from steps.errors import ConfigError

ENV_VAR = "LLM_TO_MLFLOW_API_KEYS"
OPEN_PATHS = frozenset({"/health"})


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def load_keys(
    keys: Iterable[str], files: Iterable[Path], environ: Mapping[str, str] = os.environ
) -> frozenset[bytes]:
    """The digests of every key given; ConfigError naming the source of an unusable one."""
    found: list[tuple[str, str]] = [("--api-key", key) for key in keys]
    for path in files:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as error:
            raise ConfigError(f"--api-key-file {path} cannot be read ({error.strerror})") from None
        file_keys = [line.strip() for line in lines if line.strip()]
        file_keys = [key for key in file_keys if not key.startswith("#")]
        if not file_keys:
            raise ConfigError(f"--api-key-file {path} holds no key (one per line)")
        found += [(f"--api-key-file {path}", key) for key in file_keys]
    found += [(ENV_VAR, key.strip()) for key in environ.get(ENV_VAR, "").split(",") if key.strip()]
    for source, key in found:
        if not key or any(c.isspace() for c in key):
            raise ConfigError(
                f"an API key from {source} is empty or holds a space (keys are tokens)"
            )
    return frozenset(_digest(key) for _, key in found)


class ApiKeys:
    """The check: which requests carry a valid key."""

    def __init__(self, digests: frozenset[bytes]):
        self._digests = digests

    @property
    def required(self) -> bool:
        return bool(self._digests)

    def problem(self, path: str, authorization: str | None) -> str | None:
        """Why a request to `path` with this Authorization header is refused (None: allowed)."""
        if not self._digests or path in OPEN_PATHS:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "this server needs an API key: send it as `Authorization: Bearer <key>`"
        digest = _digest(token.strip())
        # Every digest compared, each in constant time: nothing about the keys leaks by timing.
        if not any([hmac.compare_digest(digest, known) for known in self._digests]):
            return "the API key is not valid for this server"
        return None
