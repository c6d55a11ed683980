"""Model servers as child processes on loopback ports: `mlflow models serve` of a registered
model, or this project's OpenAI-compatible server (`python -m steps serve`), started, waited for
until it answers, and stopped with its whole process group. The tests and bench/serving.py start
their servers through here.
"""

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
from pathlib import Path

import requests


def free_port() -> int:
    """A loopback port no one listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running(
    command: list[str], env: dict[str, str], health_url: str, log: Path, timeout: float = 180
) -> Iterator[subprocess.Popen]:
    """Start `command` in a process group of its own, its output into `log`; yield it once
    `health_url` answers, and stop the whole group when the block ends. A child that exits or
    does not answer within `timeout` seconds fails with the tail of its log."""
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


# Who the caller is on the tracking server travels; MLflow and Hub settings do not.
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment for a child server: no MLflow or Hub settings but the credentials, this
    Python's folder first on PATH, and `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k in CREDENTIALS or not k.startswith(("MLFLOW_", "HF_"))
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env | extra


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


@contextlib.contextmanager
def openai_server(
    model_uri: str | None, tracking_uri: str, log: Path, poll_interval: float = 30.0,
    args: tuple[str, ...] = (), **env: str,
) -> Iterator[str]:  # fmt: skip
    """`python -m steps serve` of a model (None: its default, the champion) in this environment,
    with more `args` and `env`; yields its base URL once the model is loaded (its /health
    answers 200)."""
    with openai_server_process(model_uri, tracking_uri, log, poll_interval, args, **env) as started:
        yield started[0]


@contextlib.contextmanager
def openai_server_process(
    model_uri: str | None, tracking_uri: str, log: Path, poll_interval: float = 30.0,
    args: tuple[str, ...] = (), **env: str,
) -> Iterator[tuple[str, subprocess.Popen]]:  # fmt: skip
    """openai_server, yielding its process too (to signal it)."""
    port = free_port()
    command = [
        sys.executable, "-m", "steps", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--poll-interval", str(poll_interval), *args,
    ]  # fmt: skip
    if model_uri:
        command += ["--model-uri", model_uri]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="steps-serve-") as scratch:
        env = clean_env(MLFLOW_TRACKING_URI=tracking_uri, TMPDIR=scratch, **env)
        with running(command, env, f"{url}/health", log) as process:
            yield url, process
