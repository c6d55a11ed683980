"""Entry point `register`: gate the evaluated models and register the chosen one.

Reads `eval/candidates.json` of an evaluate run (`register.evaluate_run_id`, or the latest
finished one of this model variant and compute target), chooses a model (`register.choose`:
`fastest_faithful`, the highest decode rate among the candidates that stay faithful to the
evaluate run's reference (`register.max_kld_mean`, `min_top1_agreement`, `max_ppl_ratio`, no
significant accuracy loss at `accuracy_alpha`), else the reference; `best`, the best accuracy
with ties broken by decode speed; or a runtime), and checks the quality gate
(`register.min_accuracy`, `register.max_p95_latency_s`). The model card lists every candidate
with why it was or was not chosen.

Passing the gate: a version of the registered model `<variant>-<runtime>-<hardware>` with a
model card as description and tags (git commit, config hash, evaluate run, fetch manifest hash,
metrics), aliased `champion` when it beats the current champion (or there is none), else
`challenger`. Failing it: nothing is registered and the step fails, unless
`register.allow_challenger=true` registers it as `challenger`. Registering the same model again
(the same `model.key`: code, config and weights, even from another pipeline's wrap run) reuses
its version. Registers of one registered model take turns (steps.tracking.registry's lock), so
pipelines that overlap end as if they had run one after another. Run tags: `register.chosen`,
`register.why`, `register.gate`, `register.model_name`, `register.version`, `register.alias`,
`register.created`, `register.champion_before` (the version that was champion when this one
decided, or none). The run lists the chosen model as its input, the version is listed on that
model (as `mlflow.register_model` does), and the run's description says what was registered
where and why.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.entities import LoggedModel, Run
from mlflow.entities.model_registry import ModelVersion

from steps.config.compose import config_digest
from steps.config.schema import Choice, PipelineConfig, RegisterConfig
from steps.errors import PipelineError
from steps.evaluation.report import candidates_table
from steps.evaluation.selection import fastest_faithful, gate_failures, was_asked
from steps.tracking.lineage import finished_run, latest_finished_run
from steps.tracking.models import EvaluatedModel
from steps.tracking.notes import link_models, model_link, run_link, set_note, version_link
from steps.tracking.provenance import git_state
from steps.tracking.registry import (
    register_version,
    registered_model_name,
    registry_lock,
    set_alias,
    version_by_alias,
)
from steps.tracking.runs import step_run
from steps.tracking.server import tracking_errors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegisterResult:
    """The decision: which candidate, whether it passed the gate, under which name."""

    chosen: EvaluatedModel
    failures: list[str]  # gate checks it failed; empty: passed
    registered_name: str
    reasons: dict[str, str]  # candidate label -> why it was or was not chosen

    @property
    def why(self) -> str:
        return self.reasons[self.chosen.model.label].removeprefix("chosen: ")

    @property
    def gate(self) -> str:
        return "passed" if not self.failures else "failed: " + "; ".join(self.failures)


def choose(
    candidates: list[EvaluatedModel], how: Choice, reference: str, gate: RegisterConfig
) -> tuple[EvaluatedModel, dict[str, str]]:
    """The candidate register.choose picks, and one line per candidate saying why or why not."""
    by_label = {c.model.label: c for c in candidates}
    if how is Choice.fastest_faithful:
        if reference not in by_label:
            raise PipelineError(
                f"the evaluate run's reference {reference} is not among its candidates "
                f"({', '.join(by_label)}): evaluate again"
            )
        selection = fastest_faithful({k: c.summary for k, c in by_label.items()}, reference, gate)
        return by_label[selection.chosen], selection.reasons
    of_runtime = [c for c in candidates if how is Choice.best or c.model.runtime is how.runtime]
    if not of_runtime:
        runtimes = sorted({c.model.runtime.value for c in candidates})
        raise PipelineError(f"register.choose={how.value}: no such candidate (have {runtimes})")
    # A candidate that failed fidelity and was not asked has no accuracy to rank it by.
    pool = [c for c in of_runtime if was_asked(c.summary)]
    if not pool:
        raise PipelineError(
            f"register.choose={how.value}: every such candidate failed fidelity and was not "
            f"asked ({', '.join(c.model.label for c in of_runtime)}): evaluate again with "
            "evaluate.ask=all, or choose fastest_faithful"
        )
    chosen = max(pool, key=lambda c: (c.summary["accuracy"], c.summary["tokens_per_s"]))
    reasons = {
        label: f"chosen: register.choose={how.value}"
        if candidate is chosen
        else f"not chosen by register.choose={how.value}"
        for label, candidate in by_label.items()
    }
    return chosen, reasons


def beats(summary: dict[str, float], champion_tags: dict[str, str]) -> bool:
    mine = (summary["accuracy"], summary["tokens_per_s"])
    theirs = (
        float(champion_tags["metrics.accuracy"]),
        float(champion_tags["metrics.tokens_per_s"]),
    )
    return mine > theirs


def pick_alias(
    failed_gate: bool, champion: ModelVersion | None, version: str, summary: dict[str, float]
) -> str:
    """champion when it passed the gate and beats the current champion (or there is none, or
    it already is the champion); challenger otherwise."""
    if failed_gate:
        return "challenger"
    if champion is None or str(champion.version) == version:
        return "champion"
    return "champion" if beats(summary, champion.tags) else "challenger"


def registered_name(cfg: PipelineConfig, chosen: EvaluatedModel) -> str:
    return registered_model_name(cfg.model.name, chosen.model.runtime, cfg.compute.target)


def run(cfg: PipelineConfig, candidates: list[EvaluatedModel], reference: str) -> RegisterResult:
    """Choose and gate (plain values: no MLflow)."""
    chosen, reasons = choose(candidates, cfg.register.choose, reference, cfg.register)
    return RegisterResult(
        chosen, gate_failures(chosen.summary, cfg.register), registered_name(cfg, chosen), reasons
    )


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


def model_card(
    cfg: PipelineConfig, result: RegisterResult, table: str, reference: str, evaluate_run: Run,
    commit: str,
) -> str:  # fmt: skip
    source = cfg.model.source
    where = source.repo_id or source.path or source.package
    chosen = result.chosen
    s = chosen.summary
    tags = evaluate_run.data.tags
    return "\n".join(
        [
            f"# {cfg.model.display_name} ({chosen.model.label}, {cfg.compute.name})",
            "",
            f"- Source: {source.kind.value} `{where}` at revision `{source.revision}`",
            f"- Runtime: {chosen.model.runtime.value}, precision {chosen.model.precision}; "
            f"license {cfg.model.license}",
            f"- Chosen by register.choose={cfg.register.choose.value} against the reference "
            f"{reference}",
            f"- Evaluation: `{tags.get('evaluate.dataset')}` "
            f"(sha256 {tags.get('evaluate.dataset_sha256', '')[:12]}), fidelity text "
            f"`{tags.get('evaluate.fidelity_text')}` "
            f"(sha256 {tags.get('evaluate.fidelity_text_sha256', '')[:12]}), "
            f"run {run_link(evaluate_run.info.run_id)}",
            f"- Accuracy {s['accuracy']:.3f}; latency p50 {s['latency_p50_s']:.2f} s, "
            f"p95 {s['latency_p95_s']:.2f} s; {s['tokens_per_s']:.1f} output tokens/s; "
            f"peak RSS {s['peak_rss_mb']:.0f} MiB",
            f"- Git commit `{commit}`",
            "",
            "## Candidates",
            "",
            table,
        ]
    )


def version_tags(
    cfg: PipelineConfig, chosen: EvaluatedModel, evaluate_run: Run, commit: str,
    wrap_tags: dict[str, str],
) -> dict[str, str]:  # fmt: skip
    fetch_run_id = wrap_tags["fetch.run_id"]
    manifest = mlflow.artifacts.load_text(f"runs:/{fetch_run_id}/manifest.json")
    return {
        "git.commit": commit,
        "config.sha256": config_digest(cfg),
        "evaluate.run_id": evaluate_run.info.run_id,
        "fetch.manifest_sha256": hashlib.sha256(manifest.encode()).hexdigest(),
        "model.runtime": chosen.model.runtime.value,
        "model.precision": chosen.model.precision,
        "model.label": chosen.model.label,
    } | {f"metrics.{k}": f"{v:.6g}" for k, v in chosen.summary.items()}


@dataclass(frozen=True)
class Registered:
    """Where register put the chosen model: the version, its alias, and the champion it was
    compared with."""

    name: str
    version: str
    alias: str
    created: bool
    champion_before: str | None


def register_note(
    cfg: PipelineConfig, result: RegisterResult, table: str, evaluate_run: Run,
    model: LoggedModel, registered: Registered | None,
) -> str:  # fmt: skip
    """The register run's description: what was registered where and why, the candidates, and
    links to the evaluation and the model."""
    chosen = result.chosen.model.label
    if registered is None:
        headline = f"## Nothing registered: {chosen} failed the quality gate"
        outcome = f"Gate: {result.gate}. The champion, if any, is untouched."
    else:
        headline = f"## {registered.name} version {registered.version} is {registered.alias}"
        version = version_link(registered.name, registered.version)
        before = f"version {registered.champion_before}" if registered.champion_before else "none"
        how = "Registered now as" if registered.created else "Already registered (same model) as"
        outcome = (
            f"{how} {version}; gate {result.gate}; champion before: {before}. Load it with "
            f"`models:/{registered.name}@{registered.alias}`."
        )
    return "\n".join(
        [
            headline,
            "",
            f"**{chosen}** chosen by register.choose={cfg.register.choose.value}: "
            f"{result.why}. {outcome}",
            "",
            table,
            "",
            f"- Evaluation: {run_link(evaluate_run.info.run_id)}",
            f"- Model: {model_link(model)}, logged by {run_link(model.source_run_id)}",
        ]
    )


def main(cfg: PipelineConfig) -> RegisterResult:
    with step_run("register", cfg) as active:
        run_id = active.info.run_id
        evaluate_run = find_evaluate_run(cfg, active.info.experiment_id)
        candidates = mlflow.artifacts.load_dict(
            f"runs:/{evaluate_run.info.run_id}/eval/candidates.json"
        )
        evaluated = [EvaluatedModel.from_dict(entry) for entry in candidates]
        reference = evaluate_run.data.tags.get("evaluate.reference", cfg.reference_label)
        result = run(cfg, evaluated, reference)
        chosen, name = result.chosen, result.registered_name
        mlflow.set_tags(
            {
                "register.chosen": chosen.model.label,
                "register.why": result.why[:500],
                "register.gate": result.gate[:500],
            }
        )
        # Every candidate's row and verdict: the run's description and the model card.
        table = candidates_table(
            {c.model.label: c.summary for c in evaluated}, reference, result.reasons,
            {c.model.label: c.answers for c in evaluated},
        )  # fmt: skip
        model = MlflowClient().get_logged_model(chosen.model.model_id)
        link_models(run_id, [model.model_id])
        if result.failures and not cfg.register.allow_challenger:
            set_note(
                run_id,
                register_note(cfg, result, table, evaluate_run, model, None),
            )
            raise PipelineError(
                f"{chosen.model.label} failed the quality gate ({'; '.join(result.failures)}); "
                "nothing was registered. Set register.allow_challenger=true to register it as "
                "challenger"
            )
        commit, _ = git_state()
        wrap_tags = MlflowClient().get_run(chosen.model.wrap_run_id).data.tags
        card = model_card(cfg, result, table, reference, evaluate_run, commit)
        tags = version_tags(cfg, chosen, evaluate_run, commit, wrap_tags)
        key = wrap_tags.get("model.key") or chosen.model.model_uri
        needs = f"EDIT permission on registered model {name!r}"
        with (
            tracking_errors(mlflow.get_tracking_uri(), needs),
            registry_lock(name, run_id),
        ):
            version, created = register_version(name, chosen.model.model_uri, key, card, tags)
            champion = version_by_alias(name, "champion")
            alias = pick_alias(
                bool(result.failures), champion, str(version.version), chosen.summary
            )
            set_alias(name, alias, version.version)
        registered = Registered(
            name, str(version.version), alias, created, str(champion.version) if champion else None
        )
        mlflow.set_tags(
            {
                "register.model_name": name,
                "register.version": registered.version,
                "register.alias": alias,
                "register.created": str(created).lower(),
                "register.champion_before": registered.champion_before or "none",
            }
        )
        set_note(
            run_id,
            register_note(cfg, result, table, evaluate_run, model, registered),
        )
        log.info(
            "registered %s version %s as %s (%s): load it with models:/%s@%s",
            name, version.version, alias, result.gate, name, alias,
        )  # fmt: skip
        return result
