"""A content-addressed cache of model snapshots, laid out like huggingface_hub's own cache.

    <root>/blobs/<sha256>                 file contents, named by their digest, never edited
    <root>/snapshots/<snapshot_id>/...    the model folder: relative symlinks into blobs/
    <root>/manifests/<snapshot_id>.json   the manifest of that snapshot
    <root>/refs/<ref>                     a source's name -> the snapshot_id it produced
    <root>/locks/<ref>.lock               one file lock per source

Every write goes to a uniquely named temp path in the same folder and is renamed into place,
so an interrupted fetch leaves nothing a later run could take for complete. The per-source lock
saves two concurrent fetches from doing the work twice; correctness does not depend on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

from steps.store.manifest import (
    FileEntry,
    Manifest,
    hash_tree,
    mismatched_files,
    sha256_file,
)

log = logging.getLogger(__name__)
_ABANDONED_AFTER_SECONDS = 24 * 3600


def default_cache_root() -> Path:
    """$XDG_CACHE_HOME/llm-to-mlflow, else ~/.cache/llm-to-mlflow."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llm-to-mlflow"


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file beside `path`, then rename: a reader sees the old or the new text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


class SnapshotStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
        for folder in ("blobs", "snapshots", "manifests", "refs", "locks", "tmp"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self._sweep_abandoned_temp()

    @classmethod
    def open(cls, cache_dir: str | None) -> SnapshotStore:
        """The store at cache_dir, or at the default cache location when it is None."""
        return cls(Path(cache_dir) if cache_dir else default_cache_root())

    def _sweep_abandoned_temp(self) -> None:
        """A killed fetch cannot clean up after itself; its scratch space is never read, only
        removed here once it is old enough that no live fetch can still own it."""
        cutoff = time.time() - _ABANDONED_AFTER_SECONDS
        for entry in (self.root / "tmp").iterdir():
            if entry.lstat().st_mtime < cutoff:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    def lock(self, ref: str) -> FileLock:
        return FileLock(self.root / "locks" / f"{ref}.lock")

    def snapshot_path(self, snapshot_id: str) -> Path:
        return self.root / "snapshots" / snapshot_id

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def lookup(self, ref: str) -> Manifest | None:
        """The manifest a source last produced, if its snapshot is still here."""
        ref_file = self.root / "refs" / ref
        if not ref_file.is_file():
            return None
        return self.manifest(ref_file.read_text().strip())

    def manifest(self, snapshot_id: str) -> Manifest | None:
        manifest_file = self.root / "manifests" / f"{snapshot_id}.json"
        if not manifest_file.is_file():
            return None
        return Manifest.from_json(manifest_file.read_text())

    def verified(self, ref: str) -> tuple[Manifest | None, str]:
        """(manifest, "hit") when the source's cached snapshot still matches its manifest;
        else (None, "miss" or "repaired"), with any damaged files already evicted."""
        manifest = self.lookup(ref)
        if manifest is None:
            return None, "miss"
        damaged = self.damaged_files(manifest)
        if not damaged:
            return manifest, "hit"
        log.warning("cached snapshot %s: %s damaged, rebuilding", manifest.snapshot_id, damaged)
        self.evict(manifest, damaged)
        return None, "repaired"

    def damaged_files(self, manifest: Manifest) -> list[str]:
        """Re-hash a cached snapshot: the paths that are missing or no longer match."""
        return mismatched_files(self.snapshot_path(manifest.snapshot_id), manifest.files)

    def evict(self, manifest: Manifest, paths: list[str]) -> None:
        """Drop damaged files (blob and link) so the next ingest writes them afresh."""
        by_path = {entry.path: entry for entry in manifest.files}
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                self.blob_path(by_path[path].sha256).unlink()
            with contextlib.suppress(FileNotFoundError):
                (self.snapshot_path(manifest.snapshot_id) / path).unlink()

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A scratch folder on the cache's filesystem (so ingest can rename, not copy)."""
        folder = Path(tempfile.mkdtemp(dir=self.root / "tmp", prefix="staging-"))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def store_blob(self, source: Path, sha256: str, *, move: bool) -> Path:
        """Put a file whose digest is known into blobs/ (atomically); returns the blob path."""
        blob = self.blob_path(sha256)
        if blob.is_file() and sha256_file(blob) == sha256:
            return blob
        handle, temp = tempfile.mkstemp(dir=blob.parent, prefix=f".{sha256}.", suffix=".tmp")
        os.close(handle)
        try:
            if move:
                os.replace(source, temp)
            else:
                shutil.copyfile(source, temp)
            os.chmod(temp, 0o444)
            os.replace(temp, blob)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        return blob

    def ingest(
        self,
        folder: Path,
        *,
        ref: str,
        model: str,
        source: dict,
        move: bool,
        files: list[FileEntry] | None = None,
    ) -> Manifest:
        """Store a finished folder's files as blobs and publish it as a snapshot (`files`: its
        hashes, when the caller already has them)."""
        files = files if files is not None else hash_tree(folder, "hashing")
        manifest = Manifest(model=model, source=source, files=files)
        for entry in manifest.files:
            self.store_blob(folder / entry.path, entry.sha256, move=move)
        self._publish_snapshot(manifest)
        atomic_write_text(
            self.root / "manifests" / f"{manifest.snapshot_id}.json", manifest.to_json()
        )
        atomic_write_text(self.root / "refs" / ref, manifest.snapshot_id + "\n")
        return manifest

    def _publish_snapshot(self, manifest: Manifest) -> None:
        """Build the folder of links aside, then swap it in with one rename."""
        target = self.snapshot_path(manifest.snapshot_id)
        building = Path(tempfile.mkdtemp(dir=self.root / "tmp", prefix="snapshot-"))
        try:
            for entry in manifest.files:
                link = building / entry.path
                link.parent.mkdir(parents=True, exist_ok=True)
                blob = self.blob_path(entry.sha256)
                link.symlink_to(os.path.relpath(blob, target / Path(entry.path).parent))
            if target.exists():
                # Same id means same content: the old folder only lacks links we evicted.
                retired = self.root / "tmp" / f"retired-{manifest.snapshot_id}-{os.getpid()}"
                os.replace(target, retired)
                shutil.rmtree(retired, ignore_errors=True)
            os.replace(building, target)
        finally:
            shutil.rmtree(building, ignore_errors=True)
