"""What every benchmark writes: a JSON report with what ran, a Markdown table, optional charts,
and the same as an MLflow run in the bench's tracking store."""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path

import mlflow

from bench.models import EXPERIMENT
from steps.tracking.provenance import git_state, package_versions


def provenance(settings: dict[str, object]) -> dict[str, object]:
    commit, dirty = git_state()
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": len(os.sched_getaffinity(0)),
        },
        "git": {"commit": commit, "dirty": dirty},
        "versions": package_versions(),
        "settings": {k: str(v) for k, v in settings.items()},
    }


def write_report(
    name: str,
    report: dict,
    table: str,
    out: Path,
    tracking_uri: str,
    metrics: dict[str, float],
    charts: tuple[Path, ...] = (),
) -> None:
    """`<out>/<name>.json` and `.md`, then a run `bench-<name>` with both files, the charts,
    the metrics, the settings as params and the commit and versions as tags."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"{name}.json", out / f"{name}.md"]
    files[0].write_text(json.dumps(report, indent=2) + "\n")
    files[1].write_text(table + "\n")
    print(table, flush=True)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=f"bench-{name}"):
        mlflow.log_params(report["settings"])
        mlflow.set_tags(
            {"git.commit": report["git"]["commit"], "git.dirty": str(report["git"]["dirty"])}
            | {f"versions.{package}": v for package, v in report["versions"].items()}
        )
        mlflow.log_metrics(metrics)
        for file in (*files, *charts):
            mlflow.log_artifact(str(file))
    print(
        f"wrote {', '.join(str(f) for f in (*files, *charts))}; run bench-{name} in {tracking_uri}"
    )
