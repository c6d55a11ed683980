"""What ran: the git commit of the project (and whether the tree had local changes) and the
versions of the packages that decide the results."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# A pod of MLflow's Kubernetes backend runs a copy of the project without its .git folder; main,
# which submitted the step from the checkout, hands the checkout's state over in these variables.
CHECKOUT_ENV = {
    "commit": "LLM_TO_MLFLOW_GIT_COMMIT",
    "dirty": "LLM_TO_MLFLOW_GIT_DIRTY",
    "diff_sha256": "LLM_TO_MLFLOW_GIT_DIFF_SHA256",
    "repo": "LLM_TO_MLFLOW_GIT_REPO",
}

RECORDED_PACKAGES = (
    "mlflow",
    "transformers",
    "torch",
    "tokenizers",
    "safetensors",
    "accelerate",
    "gguf",
    "onnxruntime",
    "onnxruntime-genai",
    "hydra-core",
    "huggingface-hub",
)


def git_state(root: Path = PROJECT_ROOT) -> tuple[str, bool | None]:
    """(commit, dirty) of the project's checkout; outside a git checkout, the state main handed
    over (CHECKOUT_ENV), else ("unknown", None)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.CalledProcessError):
        if commit := os.environ.get(CHECKOUT_ENV["commit"]):
            dirty_env = os.environ.get(CHECKOUT_ENV["dirty"])
            return commit, {"true": True, "false": False}.get(dirty_env)
        return "unknown", None
    return commit, dirty


def git_repo(root: Path = PROJECT_ROOT) -> str:
    """Where the commit can be cloned from: the `origin` remote (without any credentials in
    it), else the checkout itself."""
    remote = subprocess.run(
        ["git", "-C", str(root), "config", "--get", "remote.origin.url"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if not remote:
        return os.environ.get(CHECKOUT_ENV["repo"]) or root.as_uri()
    parts = urlsplit(remote)
    if parts.scheme in ("http", "https") and "@" in parts.netloc:
        remote = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return remote


def git_diff_sha256(root: Path = PROJECT_ROOT) -> str:
    """A digest of the uncommitted changes (tracked diffs and untracked files), so runs from
    the same dirty tree can be told apart from runs of other local edits."""
    digest = hashlib.sha256()
    try:
        diff = subprocess.run(
            ["git", "-C", str(root), "diff", "HEAD", "--binary"], capture_output=True, check=True
        ).stdout
        untracked = subprocess.run(
            ["git", "-C", str(root), "ls-files", "--others", "--exclude-standard", "-z"],
            capture_output=True,
            check=True,
        ).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get(CHECKOUT_ENV["diff_sha256"], "unknown")
    digest.update(diff)
    for name in sorted(filter(None, untracked)):
        digest.update(name + b"\0")
        with contextlib.suppress(OSError):
            digest.update((root / name.decode()).read_bytes())
    return digest.hexdigest()


def checkout_env(root: Path = PROJECT_ROOT) -> dict[str, str]:
    """This checkout's state as CHECKOUT_ENV variables, for a copy of the project that runs
    elsewhere."""
    commit, dirty = git_state(root)
    env = {
        CHECKOUT_ENV["commit"]: commit,
        CHECKOUT_ENV["dirty"]: "unknown" if dirty is None else str(dirty).lower(),
        CHECKOUT_ENV["repo"]: git_repo(root),
    }
    if dirty:
        env[CHECKOUT_ENV["diff_sha256"]] = git_diff_sha256(root)
    return env


def package_versions() -> dict[str, str]:
    """The installed version of each package a run records (`not installed` where absent)."""
    found = {}
    for name in RECORDED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found
