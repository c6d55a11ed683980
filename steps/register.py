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
its version. Registers of one registered model take turns (steps.tracking.registry's
transaction), so pipelines that overlap end as if they had run one after another. Run tags:
`register.chosen`, `register.why` (its verdict), `register.gate`, `register.model_name`,
`register.version`, `register.alias`, `register.created`, `register.champion_before` (the
version that was champion when this one decided, or none). The run lists the chosen model as
its input, the version is listed on that model (as `mlflow.register_model` does), and the run's
description says what was registered where and why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run

from steps.config import plan
from steps.config.compose import config_digest
from steps.config.schema import PipelineConfig
from steps.errors import PipelineError
from steps.evaluation.selection import choose, gate_failures
from steps.tracking.lineage import evaluate_run_to_register
from steps.tracking.models import EvaluatedModel, evaluated_models
from steps.tracking.pages import evaluated_table, link_models, model_card, register_page, set_note
from steps.tracking.provenance import git_state
from steps.tracking.registry import register_model, registered_model_name
from steps.tracking.runs import step_run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegisterResult:
    """The decision: which candidate, whether it passed the gate, under which name."""

    chosen: EvaluatedModel
    failures: list[str]  # gate checks it failed; empty: passed
    registered_name: str
    verdicts: dict[str, str]  # candidate label -> why it was or was not chosen

    @property
    def why(self) -> str:
        """The chosen candidate's verdict (the run's `register.why` tag)."""
        return self.verdicts[self.chosen.model.label].removeprefix("chosen: ")

    @property
    def gate(self) -> str:
        return "passed" if not self.failures else "failed: " + "; ".join(self.failures)


def run(cfg: PipelineConfig, candidates: list[EvaluatedModel], reference: str) -> RegisterResult:
    """Choose and gate (plain values: no MLflow)."""
    by_label = {c.model.label: c for c in candidates}
    label, verdicts = choose(
        {k: c.summary for k, c in by_label.items()},
        {k: c.model.runtime for k, c in by_label.items()},
        cfg.register.choose, reference, cfg.register,
    )  # fmt: skip
    chosen = by_label[label]
    name = registered_model_name(cfg.model.name, chosen.model.runtime, cfg.compute.target)
    return RegisterResult(chosen, gate_failures(chosen.summary, cfg.register), name, verdicts)


def version_tags(
    cfg: PipelineConfig, chosen: EvaluatedModel, evaluate_run: Run, commit: str,
    wrap_tags: dict[str, str],
) -> dict[str, str]:  # fmt: skip
    """The registered version's record: code, config, evaluation, weights and the metrics a
    later register compares with."""
    manifest = mlflow.artifacts.load_text(f"runs:/{wrap_tags['fetch.run_id']}/manifest.json")
    return {
        "git.commit": commit,
        "config.sha256": config_digest(cfg),
        "evaluate.run_id": evaluate_run.info.run_id,
        "fetch.manifest_sha256": hashlib.sha256(manifest.encode()).hexdigest(),
        "model.runtime": chosen.model.runtime.value,
        "model.precision": chosen.model.precision,
        "model.label": chosen.model.label,
    } | {f"metrics.{k}": f"{v:.6g}" for k, v in chosen.summary.items()}


def main(cfg: PipelineConfig) -> RegisterResult:
    with step_run("register", cfg) as active:
        run_id = active.info.run_id
        evaluate_run = evaluate_run_to_register(cfg, active.info.experiment_id)
        evaluated = evaluated_models(evaluate_run.info.run_id)
        reference = evaluate_run.data.tags.get("evaluate.reference", plan.reference_label(cfg))
        result = run(cfg, evaluated, reference)
        chosen, name = result.chosen, result.registered_name
        mlflow.set_tags(
            {
                "register.chosen": chosen.model.label,
                "register.why": result.why[:500],
                "register.gate": result.gate[:500],
            }
        )
        # Every candidate's row with this decision's verdict: the page and the model card.
        table = evaluated_table(
            [dataclasses.replace(c, verdict=result.verdicts[c.model.label]) for c in evaluated],
            reference,
        )
        model = MlflowClient().get_logged_model(chosen.model.model_id)
        link_models(run_id, [model.model_id])
        registered = None
        if not result.failures or cfg.register.allow_challenger:
            commit, _ = git_state()
            wrap_tags = MlflowClient().get_run(chosen.model.wrap_run_id).data.tags
            registered = register_model(
                name, chosen.model.model_uri, wrap_tags.get("model.key") or chosen.model.model_uri,
                model_card(cfg, chosen, table, reference, evaluate_run, commit),
                version_tags(cfg, chosen, evaluate_run, commit, wrap_tags), chosen.summary,
                not result.failures, run_id, mlflow.get_tracking_uri(),
            )  # fmt: skip
            mlflow.set_tags(
                {
                    "register.model_name": name,
                    "register.version": registered.version,
                    "register.alias": registered.alias,
                    "register.created": str(registered.created).lower(),
                    "register.champion_before": registered.champion_before or "none",
                }
            )
        page = register_page(
            cfg, chosen.model.label, result.why, result.gate, table, evaluate_run, model,
            registered,
        )  # fmt: skip
        set_note(run_id, page)
        if registered is None:
            raise PipelineError(
                f"{chosen.model.label} failed the quality gate ({'; '.join(result.failures)}); "
                "nothing was registered. Set register.allow_challenger=true to register it as "
                "challenger"
            )
        log.info(
            "registered %s version %s as %s (%s): load it with models:/%s@%s",
            name, registered.version, registered.alias, result.gate, name, registered.alias,
        )  # fmt: skip
        return result
