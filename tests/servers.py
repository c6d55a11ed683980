"""A real `mlflow server` (SQLite backend, local artifact root) on a loopback port for the tests,
started and stopped like the model servers of steps/serving/processes.py."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from steps.serving.processes import clean_env, free_port, running


@dataclass(frozen=True)
class TrackingServer:
    uri: str
    backend_store: Path
    artifacts: Path


@contextlib.contextmanager
def tracking_server(root: Path) -> Iterator[TrackingServer]:
    """`mlflow server` with a SQLite backend store and a local artifact root that it serves
    (clients see mlflow-artifacts:/ URIs)."""
    port = free_port()
    server = TrackingServer(f"http://127.0.0.1:{port}", root / "server.db", root / "artifacts")
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{server.backend_store}",
        "--artifacts-destination", str(server.artifacts),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with running(command, clean_env(), f"{server.uri}/health", root / "server.log"):
        yield server
