"""What a fetch produced: every file's path, size and sha256, and the source it came from.

The manifest is the contract between the fetch step and everything after it: a later step (on
this machine or another) reads it from the fetch run, materializes the same snapshot and checks
each file against it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

MANIFEST_VERSION = 1
_CHUNK = 8 * 1024 * 1024
# Hashing below this total is instant; a progress bar would only add noise.
_PROGRESS_THRESHOLD = 256 * 1024 * 1024


@dataclass(frozen=True)
class FileEntry:
    path: str  # POSIX path relative to the snapshot root
    size: int
    sha256: str


@dataclass
class Manifest:
    model: str
    source: dict[str, Any]  # the source config, plus what it resolved to (commit, wheel file)
    files: list[FileEntry]
    snapshot_id: str = ""
    version: int = MANIFEST_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.files = sorted(self.files, key=lambda entry: entry.path)
        self.snapshot_id = snapshot_id(self.files)

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files)

    def to_json(self) -> str:
        body = asdict(self)
        body["total_bytes"] = self.total_bytes
        return json.dumps(body, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        body = json.loads(text)
        if body.get("version") != MANIFEST_VERSION:
            raise ValueError(
                f"manifest version {body.get('version')} is not supported "
                f"(this code reads version {MANIFEST_VERSION})"
            )
        manifest = cls(
            model=body["model"],
            source=body["source"],
            files=[FileEntry(**entry) for entry in body["files"]],
            extra=body.get("extra", {}),
        )
        if manifest.snapshot_id != body["snapshot_id"]:
            raise ValueError("manifest snapshot_id does not match its file list: edited by hand?")
        return manifest


def snapshot_id(files: list[FileEntry]) -> str:
    """A content address for a whole tree: equal ids mean byte-identical snapshots."""
    digest = hashlib.sha256()
    for entry in sorted(files, key=lambda entry: entry.path):
        digest.update(f"{entry.path}\0{entry.size}\0{entry.sha256}\n".encode())
    return digest.hexdigest()


def sha256_file(path: Path, progress: tqdm | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress.update(len(chunk))
    return digest.hexdigest()


def list_files(root: Path) -> list[Path]:
    """Regular files under root (following the snapshot's symlinks), skipping hidden entries
    such as .git or huggingface_hub's .cache."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        found.extend(Path(dirpath) / name for name in filenames if not name.startswith("."))
    return sorted(found)


def hash_tree(root: Path, description: str = "hashing") -> list[FileEntry]:
    """Size and sha256 of every file under root, with a progress bar for big trees."""
    paths = list_files(root)
    total = sum(path.stat().st_size for path in paths)
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=description,
        disable=total < _PROGRESS_THRESHOLD,
    ) as progress:
        return [
            FileEntry(
                path=path.relative_to(root).as_posix(),
                size=path.stat().st_size,
                sha256=sha256_file(path, progress),
            )
            for path in paths
        ]


def mismatched_files(root: Path, expected: list[FileEntry]) -> list[str]:
    """Paths under root that are missing or differ from the manifest (size, then sha256)."""
    bad = []
    for entry in expected:
        path = root / entry.path
        if (
            not path.is_file()
            or path.stat().st_size != entry.size
            or sha256_file(path) != entry.sha256
        ):
            bad.append(entry.path)
    return bad
