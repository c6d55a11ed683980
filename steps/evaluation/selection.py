"""Which candidate to register: the gate each candidate is held to, the `fastest_faithful`
policy (the highest decode rate among the candidates that pass, else the reference), and which
candidates are worth asking the evaluation set once their fidelity is known. Plain functions of
evaluation summaries (label -> metrics), shared by evaluate (its chart marks the choice) and
register (which acts on it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from steps.config.schema import Asking, EvaluateConfig, RegisterConfig


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
    reasons: dict[str, str]  # label -> one line: why it was or was not chosen


def fastest_faithful(
    summaries: dict[str, dict[str, float]], reference: str, gate: RegisterConfig
) -> Selection:
    """Among the candidates that pass the gate against the reference, the one with the highest
    decode rate; if none passes, the reference. A candidate that was not asked the evaluation
    set (it failed fidelity) fails."""
    failures, reasons = {}, {}
    for label, summary in summaries.items():
        if not was_asked(summary):
            failed = fidelity_failures(summary, gate)
            reasons[label] = not_asked_reason(failed) if failed else "not asked"
            failures[label] = failed or ["not asked the evaluation set"]
            continue
        failures[label] = gate_failures(summary, gate) + (
            [] if label == reference else fidelity_failures(summary, gate)
        )
    passing = [label for label, failed in failures.items() if not failed]
    speed = {label: summary.get("tokens_per_s", 0.0) for label, summary in summaries.items()}
    chosen = max(passing, key=speed.__getitem__) if passing else reference
    for label, failed in failures.items():
        if label in reasons:
            continue
        if label == chosen:
            reasons[label] = (
                f"chosen: the fastest of the {len(passing)} that pass the gate"
                if passing
                else "chosen: no candidate passes the gate, so the reference"
            )
        elif failed:
            reasons[label] = "fails: " + "; ".join(failed)
        else:
            reasons[label] = f"passes, but slower ({speed[label]:.1f} vs {speed[chosen]:.1f} tok/s)"
    return Selection(chosen, failures, reasons)
