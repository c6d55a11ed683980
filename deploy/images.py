"""The base images' dependency pins and tags, from one source: pyproject.toml's exact pins.

A base image holds only the pinned Python dependencies (and git); MLflow's Kubernetes backend
adds the project files on top, and the scheduled CronJob clones the project at a commit. The
tag is content-addressed, so a pod spec names exactly the dependencies it was written for.

    python deploy/images.py requirements cpu    # one requirement per line (the Dockerfile's input)
    python deploy/images.py tag cuda            # llm-to-mlflow-base:cuda-<12 hex>

Only the standard library: the Dockerfile runs this before anything is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import tomllib
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = Path(__file__).resolve().parent / "Dockerfile"
IMAGE_NAME = "llm-to-mlflow-base"

# onnxruntime and onnxruntime-genai on PyPI are CPU-only; CUDA needs their -gpu/-cuda builds.
# onnxruntime-gpu's newest release is 1.31.1 (one behind the CPU pin), and
# onnxruntime-genai-cuda 0.18.0 needs onnxruntime-gpu>=1.31.0.
CUDA_SWAPS = {
    "onnxruntime": "onnxruntime-gpu==1.31.1",
    "onnxruntime-genai": "onnxruntime-genai-cuda==0.18.0",
}
FLAVORS = ("cpu", "cuda")

_EXACT_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==[A-Za-z0-9.+!_-]+$")


def requirements(flavor: str) -> list[str]:
    """The exact pins a `flavor` image installs: pyproject.toml's dependencies, with the
    CUDA builds of ONNX Runtime for `cuda`."""
    if flavor not in FLAVORS:
        raise ValueError(f"unknown image flavor {flavor!r}: choose one of {', '.join(FLAVORS)}")
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    pins = pyproject["project"]["dependencies"]
    names = [_pinned_name(pin) for pin in pins]
    if flavor == "cpu":
        return list(pins)
    missing = CUDA_SWAPS.keys() - set(names)
    if missing:
        raise ValueError(
            f"pyproject.toml no longer depends on {', '.join(sorted(missing))}: "
            "update CUDA_SWAPS in deploy/images.py"
        )
    return [CUDA_SWAPS.get(name, pin) for name, pin in zip(names, pins, strict=True)]


def image_tag(flavor: str) -> str:
    """`llm-to-mlflow-base:<flavor>-<hash>` for the Dockerfile and pins as they are now."""
    return content_tag(flavor, DOCKERFILE.read_bytes(), requirements(flavor))


def content_tag(flavor: str, dockerfile: bytes, pins: list[str]) -> str:
    """The tag of the image that `dockerfile` builds from `pins`: a change to either gives a
    new tag, so a tag never names two different images."""
    digest = hashlib.sha256(dockerfile)
    digest.update(b"\0")
    digest.update("\n".join(pins).encode())
    return f"{IMAGE_NAME}:{flavor}-{digest.hexdigest()[:12]}"


def _pinned_name(requirement: str) -> str:
    match = _EXACT_PIN.match(requirement)
    if match is None:
        raise ValueError(
            f"pyproject.toml dependency {requirement!r} is not an exact 'name==version' pin; "
            "the images are content-addressed by their pins"
        )
    return re.sub(r"[-_.]+", "-", match["name"]).lower()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("requirements", "tag"))
    parser.add_argument("flavor", choices=FLAVORS)
    args = parser.parse_args(argv)
    if args.what == "requirements":
        print("\n".join(requirements(args.flavor)))
    else:
        print(image_tag(args.flavor))


if __name__ == "__main__":
    main()
