"""The processes tests start, held to a time: each wait is the smaller of its own bound (sized to
what the test proves) and what is left of the session's budget, and a child that outlives it is
killed with everything it started. One hung `mlflow run` then fails its own test in minutes
instead of holding the two cores until CI's hard limit stops everything.

The budget is LLM_TO_MLFLOW_TEST_BUDGET_S seconds from the session's start (default 70
minutes: CI stops at 90, the install takes a few)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

# What "fails in seconds" means in an assertion: far below what waiting would take (MLflow's
# client retries a silent server for about 4 minutes; a live registry lock is waited for up to
# 15), and met by a loaded 2-core machine, where a Python process start alone takes 4-7 s.
NOT_WAITED_OUT_S = 60
SESSION_STARTED = time.monotonic()
SESSION_BUDGET_S = float(os.environ.get("LLM_TO_MLFLOW_TEST_BUDGET_S", 70 * 60))


def time_left(bound: float) -> float:
    """`bound` seconds, or what is left of the session's budget if that is less (at least 1)."""
    return max(1.0, min(bound, SESSION_STARTED + SESSION_BUDGET_S - time.monotonic()))


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the child and every process under it. By process tree, not process group:
    `mlflow run` starts each step in a session of its own."""
    try:
        tree = [psutil.Process(process.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    process.wait()


def wait(process: subprocess.Popen, bound: float, log: Path | None = None) -> int:
    """The child's exit code; past the bound it is killed and the test fails, naming it."""
    timeout = time_left(bound)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        tail = log.read_text(errors="replace")[-3000:] if log else ""
        pytest.fail(f"{process.args!r} still ran after {timeout:.0f} s: killed\n{tail}")


def start(command: list[str], log: Path, **options) -> subprocess.Popen:
    """Start a child with its output (both streams) going to `log`."""
    with log.open("wb") as sink:
        return subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, **options)


def wait_for_line(log: Path, text: str, process: subprocess.Popen, bound: float = 600) -> None:
    """Until `text` is in the log of a running child (which must not end first)."""
    deadline = time.monotonic() + time_left(bound)
    while text not in log.read_text(errors="replace"):
        if process.poll() is not None:
            pytest.fail(f"{text!r} never came: the child ended first\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            kill_tree(process)
            pytest.fail(f"{text!r} not in {log} after {bound} s: killed the child")
        time.sleep(0.2)


@contextlib.contextmanager
def reaped(processes: list[subprocess.Popen]) -> Iterator[list[subprocess.Popen]]:
    """Kill whatever of `processes` (the list may grow in the block) still runs when the block
    ends: a failed wait on one child leaves none of its siblings behind."""
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                kill_tree(process)


def run(command: list[str], bound: float, **options) -> subprocess.CompletedProcess[str]:
    """`subprocess.run(..., capture_output=True, text=True)` held to the bound."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options
    )
    timeout = time_left(bound)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        stdout, stderr = process.communicate()
        pytest.fail(f"{command!r} still ran after {timeout:.0f} s: killed\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
