"""Entry point `fetch`: get the model into the local content-addressed cache and record exactly
what was fetched.

Run artifacts: `manifest.json` (source, requested and resolved revision, every file's path, size
and sha256), `config.yaml` (the resolved config). Metrics: `fetch_seconds`, `fetch_bytes`
(downloaded now), `snapshot_bytes`, `snapshot_files`, `cache_hit`. Tags: `fetch.cache` (hit, miss
or repaired), `fetch.snapshot_id`, plus the provenance tags every step sets.
"""

from __future__ import annotations

import logging

import mlflow

from steps.core.config import PipelineConfig
from steps.core.snapshot_store import SnapshotStore
from steps.core.snapshots import FetchOutcome, fetch_snapshot
from steps.core.tracking import step_run

log = logging.getLogger(__name__)


def run(cfg: PipelineConfig) -> FetchOutcome:
    store = SnapshotStore.open(cfg.fetch.cache_dir)
    return fetch_snapshot(cfg.model, cfg.compute.target, cfg.fetch.artifact, store)


def main(cfg: PipelineConfig) -> None:
    with step_run("fetch", cfg):
        outcome = run(cfg)
        manifest = outcome.manifest
        mlflow.log_text(manifest.to_json(), "manifest.json")
        mlflow.log_metrics(
            {
                "fetch_seconds": outcome.seconds,
                "fetch_bytes": outcome.bytes_fetched,
                "snapshot_bytes": manifest.total_bytes,
                "snapshot_files": len(manifest.files),
                "cache_hit": float(outcome.cache == "hit"),
            }
        )
        mlflow.set_tags({"fetch.cache": outcome.cache, "fetch.snapshot_id": manifest.snapshot_id})
        log.info(
            "fetched %s: cache %s, %d files, %.1f MiB in %.1f s (%.1f MiB downloaded) -> %s",
            cfg.model.name,
            outcome.cache,
            len(manifest.files),
            manifest.total_bytes / 2**20,
            outcome.seconds,
            outcome.bytes_fetched / 2**20,
            outcome.model_dir,
        )
