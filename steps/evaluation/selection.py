"""Which candidate to register: the gate each candidate is held to, and the `fastest_faithful`
policy (the highest decode rate among the candidates that pass, else the reference). Plain
functions of evaluation summaries (label -> metrics), shared by evaluate (its chart marks the
choice) and register (which acts on it)."""

from __future__ import annotations

from dataclasses import dataclass

from steps.config.schema import RegisterConfig


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


@dataclass(frozen=True)
class Selection:
    chosen: str  # a label
    failures: dict[str, list[str]]  # label -> why it fails the gate (empty: passes)
    reasons: dict[str, str]  # label -> one line: why it was or was not chosen


def fastest_faithful(
    summaries: dict[str, dict[str, float]], reference: str, gate: RegisterConfig
) -> Selection:
    """Among the candidates that pass the gate against the reference, the one with the highest
    decode rate; if none passes, the reference."""
    failures = {
        label: gate_failures(summary, gate)
        + ([] if label == reference else fidelity_failures(summary, gate))
        for label, summary in summaries.items()
    }
    passing = [label for label, failed in failures.items() if not failed]
    speed = {label: summary["tokens_per_s"] for label, summary in summaries.items()}
    chosen = max(passing, key=speed.__getitem__) if passing else reference
    reasons = {}
    for label, failed in failures.items():
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
