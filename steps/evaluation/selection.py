"""The choice rules: the gate each candidate is held to, the `fastest_faithful` policy (the
highest decode rate among the candidates that pass, else the reference), the other
register.choose rules (`choose`), whether a registered model `beats` the champion, and which
candidates are worth asking the evaluation set once their fidelity is known. Plain functions of
evaluation summaries (label -> metrics), shared by evaluate (its chart marks the choice),
register (which acts on it) and the registry transaction (which moves the champion alias)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlflow.entities.model_registry import ModelVersion

from steps.config.schema import Asking, Choice, EvaluateConfig, RegisterConfig, Runtime
from steps.errors import PipelineError


def gate_failures(summary: dict[str, float], gate: RegisterConfig) -> list[str]:
    """The absolute gate every registered model passes: accuracy and p95 latency."""
    failures = []
    if summary["accuracy"] < gate.min_accuracy:
        failures.append(f"accuracy {summary['accuracy']:.3f} < min_accuracy {gate.min_accuracy}")
    if not summary["latency_p95_s"] <= gate.max_p95_latency_s:
        failures.append(
            f"p95 latency {summary['latency_p95_s']:.2f} s > max_p95_latency_s "
            f"{gate.max_p95_latency_s}"
        )
    return failures


def fidelity_failures(summary: dict[str, float], gate: RegisterConfig) -> list[str]:
    """How a candidate falls short of the reference: its distributions moved too far, or it
    answers significantly fewer items right."""
    failures = []
    if "kld_mean" not in summary:
        return ["not scored against the reference"]
    if not summary["kld_mean"] <= gate.max_kld_mean:
        failures.append(f"mean KLD {summary['kld_mean']:.4f} > max_kld_mean {gate.max_kld_mean}")
    if not summary["top1_agreement"] >= gate.min_top1_agreement:
        failures.append(
            f"top-1 agreement {summary['top1_agreement']:.3f} < min_top1_agreement "
            f"{gate.min_top1_agreement}"
        )
    if not summary["ppl_ratio"] <= gate.max_ppl_ratio:
        failures.append(
            f"perplexity ratio {summary['ppl_ratio']:.3f} > max_ppl_ratio {gate.max_ppl_ratio}"
        )
    lost, gained = summary.get("flips_lost", 0.0), summary.get("flips_gained", 0.0)
    if lost > gained and summary.get("mcnemar_p", 1.0) < gate.accuracy_alpha:
        failures.append(
            f"accuracy significantly below the reference ({lost:.0f} items lost, {gained:.0f} "
            f"gained, McNemar p {summary['mcnemar_p']:.3g} < accuracy_alpha {gate.accuracy_alpha})"
        )
    return failures


def was_asked(summary: dict[str, float]) -> bool:
    """Whether the candidate answered the evaluation set (else it was scored on fidelity only)."""
    return "accuracy" in summary


def not_asked_reason(failures: list[str]) -> str:
    return "not asked: failed fidelity (" + "; ".join(failures) + ")"


@dataclass(frozen=True)
class AskPlan:
    """Who answers the evaluation set, decided from the fidelity scores before any is asked."""

    asked: list[str]  # in candidate order
    # The reference and the candidates that compute its distribution (empty: none does): they
    # give the same greedy answers, so past the timed items one answers for all.
    twins: list[str] = field(default_factory=list)
    not_asked: dict[str, str] = field(default_factory=dict)  # label -> why not


def plan_asking(
    scores: dict[str, dict[str, float]], reference: str, evaluation: EvaluateConfig,
    gate: RegisterConfig,
) -> AskPlan:  # fmt: skip
    """The reference is always asked. With evaluate.ask=contenders a candidate that fails the
    fidelity gate is not: it cannot be chosen whatever it answers. Candidates whose mean KLD
    is below evaluate.share_answers_below_kld with top-1 agreement 1.0 are the reference's
    twins."""
    not_asked = {}
    if evaluation.ask is Asking.contenders:
        for label, score in scores.items():
            if label != reference and (failed := fidelity_failures(score, gate)):
                not_asked[label] = not_asked_reason(failed)
    asked = [label for label in scores if label not in not_asked]
    threshold = evaluation.share_answers_below_kld
    twins = [
        label
        for label in asked
        if label == reference
        or (
            threshold is not None
            and scores[label]["kld_mean"] < threshold
            and scores[label]["top1_agreement"] == 1.0
        )
    ]
    return AskPlan(asked, twins if len(twins) > 1 else [], not_asked)


@dataclass(frozen=True)
class Selection:
    chosen: str  # a label
    failures: dict[str, list[str]]  # label -> why it fails the gate (empty: passes)
    verdicts: dict[str, str]  # label -> one line: why it was or was not chosen


def fastest_faithful(
    summaries: dict[str, dict[str, float]], reference: str, gate: RegisterConfig
) -> Selection:
    """Among the candidates that pass the gate against the reference, the one with the highest
    decode rate; if none passes, the reference. A candidate that was not asked the evaluation
    set (it failed fidelity) fails."""
    failures, verdicts = {}, {}
    for label, summary in summaries.items():
        if not was_asked(summary):
            failed = fidelity_failures(summary, gate)
            verdicts[label] = not_asked_reason(failed) if failed else "not asked"
            failures[label] = failed or ["not asked the evaluation set"]
            continue
        failures[label] = gate_failures(summary, gate) + (
            [] if label == reference else fidelity_failures(summary, gate)
        )
    passing = [label for label, failed in failures.items() if not failed]
    speed = {label: summary.get("tokens_per_s", 0.0) for label, summary in summaries.items()}
    chosen = max(passing, key=speed.__getitem__) if passing else reference
    for label, failed in failures.items():
        if label in verdicts:
            continue
        if label == chosen:
            verdicts[label] = (
                f"chosen: the fastest of the {len(passing)} that pass the gate"
                if passing
                else "chosen: no candidate passes the gate, so the reference"
            )
        elif failed:
            verdicts[label] = "fails: " + "; ".join(failed)
        else:
            verdicts[label] = (
                f"passes, but slower ({speed[label]:.1f} vs {speed[chosen]:.1f} tok/s)"
            )
    return Selection(chosen, failures, verdicts)


def choose(
    summaries: dict[str, dict[str, float]], runtimes: dict[str, Runtime], how: Choice,
    reference: str, gate: RegisterConfig,
) -> tuple[str, dict[str, str]]:  # fmt: skip
    """The label register.choose picks among the candidates (label -> summary, and each one's
    runtime), and each candidate's verdict: why it was or was not chosen."""
    if how is Choice.fastest_faithful:
        if reference not in summaries:
            raise PipelineError(
                f"the evaluate run's reference {reference} is not among its candidates "
                f"({', '.join(summaries)}): evaluate again"
            )
        selection = fastest_faithful(summaries, reference, gate)
        return selection.chosen, selection.verdicts
    of_runtime = [
        label for label in summaries if how is Choice.best or runtimes[label] is how.runtime
    ]
    if not of_runtime:
        have = sorted({runtime.value for runtime in runtimes.values()})
        raise PipelineError(f"register.choose={how.value}: no such candidate (have {have})")
    # A candidate that failed fidelity and was not asked has no accuracy to rank it by.
    pool = [label for label in of_runtime if was_asked(summaries[label])]
    if not pool:
        raise PipelineError(
            f"register.choose={how.value}: every such candidate failed fidelity and was not "
            f"asked ({', '.join(of_runtime)}): evaluate again with evaluate.ask=all, or choose "
            "fastest_faithful"
        )
    chosen = max(pool, key=lambda k: (summaries[k]["accuracy"], summaries[k]["tokens_per_s"]))
    verdicts = {
        label: f"chosen: register.choose={how.value}"
        if label == chosen
        else f"not chosen by register.choose={how.value}"
        for label in summaries
    }
    return chosen, verdicts


def beats(summary: dict[str, float], champion_tags: dict[str, str]) -> bool:
    """Whether a model beats the champion version (its `metrics.*` tags): better accuracy, then
    a higher decode rate."""
    mine = (summary["accuracy"], summary["tokens_per_s"])
    theirs = (
        float(champion_tags["metrics.accuracy"]),
        float(champion_tags["metrics.tokens_per_s"]),
    )
    return mine > theirs


def alias_for(
    passed_gate: bool, champion: ModelVersion | None, version: str, summary: dict[str, float]
) -> str:
    """`champion` when the model passed the gate and beats the current champion (or there is
    none, or it already is the champion); `challenger` otherwise."""
    if not passed_gate:
        return "challenger"
    if champion is None or str(champion.version) == version:
        return "champion"
    return "champion" if beats(summary, champion.tags) else "challenger"
