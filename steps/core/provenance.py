"""What ran: the git commit of the project (and whether the tree had local changes) and the
versions of the packages that decide the results."""

from __future__ import annotations

import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]

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
    """(commit, dirty) of the project's checkout; ("unknown", None) outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.CalledProcessError):
        return "unknown", None
    return commit, dirty


def package_versions() -> dict[str, str]:
    found = {}
    for name in RECORDED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found
