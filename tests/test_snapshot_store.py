"""Invariants of the content-addressed store, on small folders (fast)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from steps.store.manifest import sha256_file
from steps.store.snapshot_store import SnapshotStore

FILES = {
    "a.json": b"{}",
    "a/b.bin": b"nested",  # sorts differently as a string and as a Path against a.json
    "onnx/model.onnx": b"graph",
    "onnx/copy.onnx": b"graph",  # same bytes, one blob
}


def _folder(root: Path) -> Path:
    for name, data in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_each_snapshot_file_links_to_the_blob_of_its_own_content(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "cache")
    manifest = store.ingest(_folder(tmp_path / "src"), ref="r", model="m", source={}, move=False)
    snapshot = store.snapshot_path(manifest.snapshot_id)
    for name, data in FILES.items():
        assert (snapshot / name).is_symlink()
        assert (snapshot / name).read_bytes() == data
    assert len(list((store.root / "blobs").iterdir())) == 3
    assert store.lookup("r") == manifest
    assert (tmp_path / "src" / "a.json").exists()  # copied, not moved


def test_evicted_files_come_back_on_the_next_ingest(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "cache")
    source = _folder(tmp_path / "src")
    manifest = store.ingest(source, ref="r", model="m", source={}, move=False)
    blob = (store.snapshot_path(manifest.snapshot_id) / "a/b.bin").resolve()
    blob.chmod(0o644)
    blob.write_bytes(b"bitrot")
    assert store.damaged_files(manifest) == ["a/b.bin"]
    store.evict(manifest, ["a/b.bin"])
    again = store.ingest(source, ref="r", model="m", source={}, move=False)
    assert again.snapshot_id == manifest.snapshot_id
    assert store.damaged_files(again) == []
    assert sha256_file(blob) == next(e.sha256 for e in again.files if e.path == "a/b.bin")
    assert list((store.root / "tmp").iterdir()) == []


def test_scratch_space_of_a_killed_fetch_is_swept_once_abandoned(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "cache")
    abandoned = store.root / "tmp" / "staging-killed"
    (abandoned / "sub").mkdir(parents=True)
    (abandoned / "sub" / "model.safetensors").write_bytes(b"half")
    recent = store.root / "tmp" / "staging-live"
    recent.mkdir()
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(abandoned, (two_days_ago, two_days_ago))
    SnapshotStore(store.root)
    assert not abandoned.exists()
    assert recent.exists()
