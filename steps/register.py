"""Entry point `register`: gate the evaluated models and register the chosen one.

Reads `eval/candidates.json` of an evaluate run (`register.evaluate_run_id`, or the latest
finished one of this model variant and compute target), chooses a model (`register.choose`:
best accuracy with ties broken by decode speed, or a runtime), and checks the quality gate
(`register.min_accuracy`, `register.max_p95_latency_s`).

Passing the gate: a version of the registered model `<variant>-<runtime>-<compute>` with a model
card as description and tags (git commit, config hash, evaluate run, fetch manifest hash,
metrics), aliased `champion` when it beats the current champion (or there is none), else
`challenger`. Failing it: nothing is registered and the step fails, unless
`register.allow_challenger=true` registers it as `challenger`. Registering the same model again
reuses its version. Run tags: `register.model_name`, `register.version`, `register.alias`,
`register.gate`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from steps.core.config import Choice, PipelineConfig, RegisterConfig
from steps.core.errors import PipelineError
from steps.core.lineage import finished_run, latest_finished_run
from steps.core.provenance import git_state
from steps.core.tracking import resolved_config_yaml, step_run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chosen:
    label: str
    runtime: str
    model_uri: str
    wrap_run_id: str
    summary: dict[str, float]


def choose(candidates: list[dict], how: Choice) -> Chosen:
    pool = [c for c in candidates if how is Choice.best or _runtime_kind(c["runtime"]) == how.value]
    if not pool:
        runtimes = sorted({c["runtime"] for c in candidates})
        raise PipelineError(f"register.choose={how.value}: no such candidate (have {runtimes})")
    best = max(pool, key=lambda c: (c["summary"]["accuracy"], c["summary"]["tokens_per_s"]))
    return Chosen(
        best["label"], best["runtime"], best["model_uri"], best["wrap_run_id"], best["summary"]
    )


def gate_failures(summary: dict[str, float], gate: RegisterConfig) -> list[str]:
    failures = []
    if summary["accuracy"] < gate.min_accuracy:
        failures.append(f"accuracy {summary['accuracy']:.3f} < min_accuracy {gate.min_accuracy}")
    if not summary["latency_p95_s"] <= gate.max_p95_latency_s:
        failures.append(
            f"p95 latency {summary['latency_p95_s']:.2f} s > max_p95_latency_s "
            f"{gate.max_p95_latency_s}"
        )
    return failures


def beats(summary: dict[str, float], champion_tags: dict[str, str]) -> bool:
    mine = (summary["accuracy"], summary["tokens_per_s"])
    theirs = (
        float(champion_tags["metrics.accuracy"]),
        float(champion_tags["metrics.tokens_per_s"]),
    )
    return mine > theirs


def pick_alias(failed_gate: bool, champion, version: str, summary: dict[str, float]) -> str:
    """champion when it passed the gate and beats the current champion (or there is none, or
    it already is the champion); challenger otherwise."""
    if failed_gate:
        return "challenger"
    if champion is None or str(champion.version) == version:
        return "champion"
    return "champion" if beats(summary, champion.tags) else "challenger"


def _runtime_kind(runtime: str) -> str:
    return "transformers" if runtime == "transformers" else "onnx"


def registered_name(cfg: PipelineConfig, chosen: Chosen) -> str:
    return f"{cfg.model.name}-{_runtime_kind(chosen.runtime)}-{cfg.compute.target}"


def find_evaluate_run(cfg: PipelineConfig, experiment_id: str) -> Run:
    if cfg.register.evaluate_run_id:
        return finished_run(cfg.register.evaluate_run_id, ("evaluate",), "register.evaluate_run_id")
    run = latest_finished_run(cfg, experiment_id, "evaluate")
    if run is None:
        raise PipelineError(
            f"no finished evaluate run of model={cfg.model.name} compute={cfg.compute.name}: "
            "run evaluate first, or set register.evaluate_run_id"
        )
    return run


def model_card(cfg: PipelineConfig, chosen: Chosen, evaluate_run, commit: str) -> str:
    source = cfg.model.source
    where = source.repo_id or source.path or source.package
    s = chosen.summary
    return "\n".join(
        [
            f"# {cfg.model.display_name} ({chosen.label}, {cfg.compute.name})",
            "",
            f"- Source: {source.kind.value} `{where}` at revision `{source.revision}`",
            f"- Runtime: {chosen.runtime}, model `{chosen.label}`; license {cfg.model.license}",
            f"- Evaluation: `{evaluate_run.data.tags.get('evaluate.dataset')}` "
            f"(sha256 {evaluate_run.data.tags.get('evaluate.dataset_sha256', '')[:12]}), "
            f"run `{evaluate_run.info.run_id}`",
            f"- Accuracy {s['accuracy']:.3f}; latency p50 {s['latency_p50_s']:.2f} s, "
            f"p95 {s['latency_p95_s']:.2f} s; {s['tokens_per_s']:.1f} output tokens/s; "
            f"peak RSS {s['peak_rss_mb']:.0f} MiB",
            f"- Git commit `{commit}`",
        ]
    )


def register_version(name: str, chosen: Chosen, description: str, tags: dict[str, str]):
    """The version holding this model: an existing one is reused (idempotent)."""
    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"{name}: chat model from the pipeline")
    existing = client.search_model_versions(
        f"name = '{name}' and tags.`source.model_uri` = '{chosen.model_uri}'"
    )
    if existing:
        log.info("%s is already version %s of %s", chosen.model_uri, existing[0].version, name)
        return existing[0], False
    version = mlflow.register_model(chosen.model_uri, name, tags=tags)
    client.update_model_version(name, version.version, description=description)
    return version, True


def main(cfg: PipelineConfig) -> None:
    with step_run("register", cfg) as run:
        evaluate_run = find_evaluate_run(cfg, run.info.experiment_id)
        candidates = mlflow.artifacts.load_dict(
            f"runs:/{evaluate_run.info.run_id}/eval/candidates.json"
        )
        chosen = choose(candidates, cfg.register.choose)
        failures = gate_failures(chosen.summary, cfg.register)
        gate = "passed" if not failures else "failed: " + "; ".join(failures)
        mlflow.set_tags({"register.chosen": chosen.label, "register.gate": gate[:500]})
        if failures and not cfg.register.allow_challenger:
            raise PipelineError(
                f"{chosen.label} failed the quality gate ({'; '.join(failures)}); nothing was "
                "registered. Set register.allow_challenger=true to register it as challenger"
            )
        name = registered_name(cfg, chosen)
        commit, _ = git_state()
        fetch_run_id = MlflowClient().get_run(chosen.wrap_run_id).data.tags["fetch.run_id"]
        manifest = mlflow.artifacts.load_text(f"runs:/{fetch_run_id}/manifest.json")
        tags = {
            "source.model_uri": chosen.model_uri,
            "git.commit": commit,
            "config.sha256": hashlib.sha256(resolved_config_yaml(cfg).encode()).hexdigest(),
            "evaluate.run_id": evaluate_run.info.run_id,
            "fetch.manifest_sha256": hashlib.sha256(manifest.encode()).hexdigest(),
            "model.label": chosen.label,
        } | {f"metrics.{k}": f"{v:.6g}" for k, v in chosen.summary.items()}
        description = model_card(cfg, chosen, evaluate_run, commit)
        version, created = register_version(name, chosen, description, tags)
        client = MlflowClient()
        try:
            champion = client.get_model_version_by_alias(name, "champion")
        except MlflowException:
            champion = None
        alias = pick_alias(bool(failures), champion, str(version.version), chosen.summary)
        client.set_registered_model_alias(name, alias, version.version)
        mlflow.set_tags(
            {
                "register.model_name": name,
                "register.version": str(version.version),
                "register.alias": alias,
                "register.created": str(created).lower(),
            }
        )
        log.info(
            "registered %s version %s as %s (%s): load it with models:/%s@%s",
            name, version.version, alias, gate, name, alias,
        )  # fmt: skip
