"""Snapshots from an HF-format folder on disk: hashed, then ingested into the snapshot store
(so a later change to the folder cannot change what a recorded run used)."""

from __future__ import annotations

from pathlib import Path

from steps.config.schema import SourceConfig
from steps.errors import FetchError
from steps.store.manifest import Manifest, hash_tree, snapshot_id
from steps.store.snapshot_store import SnapshotStore


def ingest_local_folder(
    model: str, source: SourceConfig, store: SnapshotStore
) -> tuple[Manifest, str, int]:
    """An HF-format folder on disk, hashed and ingested into the store (once per content):
    its manifest, the store's cache outcome, and the bytes downloaded (none: it is local)."""
    folder = Path(source.path).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise FetchError(
            f"model.source.path={source.path!r} is not an HF-format model folder "
            "(no config.json); point it at a folder saved with save_pretrained"
        )
    files = hash_tree(folder, f"hashing {folder.name}")
    ref = f"local--{snapshot_id(files)}"
    with store.lock(ref):
        cached, cache = store.verified(ref)
        if cached:
            return cached, cache, 0
        record = source.record(path=str(folder))
        manifest = store.ingest(
            folder, ref=ref, model=model, source=record, move=False, files=files
        )
        return manifest, cache, 0
