"""Entry point `fetch`: get the model into the local content-addressed cache and record exactly
what was fetched.

Run artifacts: `manifest.json` (source, requested and resolved revision, every file's path, size
and sha256), `config.yaml` (the resolved config). Metrics: `fetch_seconds`, `fetch_bytes`
(downloaded now), `snapshot_bytes`, `snapshot_files`, `cache_hit`. Tags: `fetch.cache` (hit, miss
or repaired), `fetch.snapshot_id`, plus the provenance tags every step sets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlflow

from steps.config.schema import PipelineConfig
from steps.sources.snapshots import FetchOutcome, fetch_snapshot
from steps.store.snapshot_store import SnapshotStore
from steps.tracking.runs import step_run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchResult:
    snapshot: FetchOutcome

    @property
    def metrics(self) -> dict[str, float]:
        manifest = self.snapshot.manifest
        return {
            "fetch_seconds": self.snapshot.seconds,
            "fetch_bytes": self.snapshot.bytes_fetched,
            "snapshot_bytes": manifest.total_bytes,
            "snapshot_files": len(manifest.files),
            "cache_hit": float(self.snapshot.cache == "hit"),
        }

    @property
    def tags(self) -> dict[str, str]:
        return {"fetch.cache": self.snapshot.cache, "fetch.snapshot_id": self.snapshot_id}

    @property
    def snapshot_id(self) -> str:
        return self.snapshot.manifest.snapshot_id


def run(cfg: PipelineConfig) -> FetchResult:
    """Fetch what the config asks for into the snapshot store (no MLflow involved)."""
    store = SnapshotStore.open(cfg.fetch.cache_dir)
    result = FetchResult(fetch_snapshot(cfg.model, cfg.compute.target, cfg.fetch.artifact, store))
    snapshot = result.snapshot
    log.info(
        "fetched %s: cache %s, %d files, %.1f MiB in %.1f s (%.1f MiB downloaded) -> %s",
        cfg.model.name,
        snapshot.cache,
        len(snapshot.manifest.files),
        snapshot.manifest.total_bytes / 2**20,
        snapshot.seconds,
        snapshot.bytes_fetched / 2**20,
        snapshot.model_dir,
    )
    return result


def main(cfg: PipelineConfig) -> FetchResult:
    with step_run("fetch", cfg):
        result = run(cfg)
        mlflow.log_text(result.snapshot.manifest.to_json(), "manifest.json")
        mlflow.log_metrics(result.metrics)
        mlflow.set_tags(result.tags)
        return result
