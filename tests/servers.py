"""Real server processes on loopback ports for the tests: an `mlflow server` (SQLite backend,
local artifact root) and `mlflow models serve`. Each is started, waited for until its health
endpoint answers, and stopped with its whole process group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running(
    command: list[str], env: dict[str, str], health_url: str, log: Path, timeout: float = 180
) -> Iterator[subprocess.Popen]:
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[:4]} exited with {process.returncode}:\n{_tail(log)}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(health_url, timeout=2).ok:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{health_url} did not answer in {timeout} s:\n{_tail(log)}")
            time.sleep(0.5)
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HF_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env | extra


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


@contextlib.contextmanager
def model_server(model_uri: str, tracking_uri: str, log: Path) -> Iterator[str]:
    """`mlflow models serve` of a registered model in this environment; yields its base URL."""
    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
        "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    # The server copies the model into a temp folder it never removes: give it one that goes.
    with tempfile.TemporaryDirectory(prefix="mlflow-serve-") as scratch:
        env = clean_env(MLFLOW_TRACKING_URI=tracking_uri, TMPDIR=scratch)
        with running(command, env, f"{url}/ping", log):
            yield url
