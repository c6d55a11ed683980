"""What an evaluation shows: per-model summaries (accuracy with its interval, flips against the
reference, speed), parity between models, the per-item table, the charts and the markdown
summary. Plain functions of measured results."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from steps.evaluation.evalset import EvalSet
from steps.evaluation.measure import CandidateResult
from steps.evaluation.selection import Selection, was_asked
from steps.evaluation.stats import mcnemar_exact_p, wilson_interval


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[index]


def answer_summary(candidate: CandidateResult) -> dict[str, float]:
    """Accuracy (with its 95% Wilson interval) over every item; latency, time to first token
    and decode rate over the items asked one at a time."""
    answered = [r for r in candidate.items if r.error is None]
    timed = [r for r in answered if r.timed]
    latencies = [r.latency_s for r in timed]
    ttfts = [r.ttft_s for r in timed if r.ttft_s is not None]
    correct = sum(r.correct for r in candidate.items)
    low, high = wilson_interval(correct, len(candidate.items))
    summary = {
        "accuracy": correct / len(candidate.items),
        "accuracy_ci_low": low,
        "accuracy_ci_high": high,
        "items": float(len(candidate.items)),
        "errors": float(len(candidate.items) - len(answered)),
        "latency_mean_s": statistics.fmean(latencies) if latencies else float("nan"),
        "latency_p50_s": _percentile(latencies, 0.5),
        "latency_p95_s": _percentile(latencies, 0.95),
        "prompt_tokens": float(sum(r.prompt_tokens for r in answered)),
        "completion_tokens": float(sum(r.completion_tokens for r in answered)),
        "tokens_per_s": candidate.tokens_per_s,
        "items_asked": float(candidate.asked),
        "items_shared": float(len(candidate.items) - candidate.asked),
        "seconds.asking": candidate.ask_seconds,
        "peak_rss_mb": candidate.peak_rss_mb,
    }
    if ttfts:
        summary["ttft_mean_s"] = statistics.fmean(ttfts)
    return summary


def flips(reference: CandidateResult, candidate: CandidateResult) -> dict[str, float]:
    """Items the candidate gets wrong where the reference is right (lost) and the other way
    round (gained), with the exact McNemar p-value of the difference."""
    pairs = list(zip(reference.items, candidate.items, strict=True))
    lost = sum(ref.correct and not mine.correct for ref, mine in pairs)
    gained = sum(mine.correct and not ref.correct for ref, mine in pairs)
    return {
        "flips_lost": float(lost),
        "flips_gained": float(gained),
        "mcnemar_p": mcnemar_exact_p(lost, gained),
    }


def parity(candidates: list[CandidateResult]) -> float:
    """Share of items where every candidate gave exactly the same answer."""
    answers = [[r.answer if r.error is None else None for r in c.items] for c in candidates]
    same = [len(set(row)) == 1 and row[0] is not None for row in zip(*answers, strict=True)]
    return sum(same) / len(same)


def per_item_rows(eval_set: EvalSet, candidates: list[CandidateResult]) -> list[dict[str, Any]]:
    """One row per item: the question, and each candidate's answer, correctness and latency."""
    rows = []
    for index, item in enumerate(eval_set.items):
        row: dict[str, Any] = {
            "id": item.id,
            "category": item.category,
            "question": item.question,
            "reference": item.reference,
        }
        for candidate in candidates:
            result = candidate.items[index]
            row[f"{candidate.label} answer"] = result.answer or f"ERROR {result.error}"
            row[f"{candidate.label} correct"] = result.correct
            row[f"{candidate.label} latency_s"] = round(result.latency_s, 3)
        rows.append(row)
    return rows


# What each candidate's LoggedModel carries, in the order the experiment's model list shows
# its columns: accuracy and speed on the questions, then fidelity on the text. Few enough to
# stand side by side on one screen; every metric stays on the evaluate run.
MODEL_LIST_METRICS = (
    "accuracy", "tokens_per_s", "latency_p95_s", "peak_rss_mb",
    "kld_mean", "top1_agreement", "ppl_ratio",
)  # fmt: skip

# Where an evaluate run keeps its charts; the run notes of evaluate and main show the first.
SPEED_CHART, COMPARISON_CHART = "eval/speed_vs_fidelity.png", "eval/comparison.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def comparison_chart(summaries: dict[str, dict[str, float]], path: Path) -> None:
    """Quality and speed side by side, one bar per model, one panel per measure; accuracy with
    its 95% interval."""
    plt = _pyplot()
    panels = [
        ("accuracy", "accuracy (share correct, 95% interval)"),
        ("top1_agreement", "top-1 agreement with the reference"),
        ("ppl_ratio", "perplexity / reference's"),
        ("tokens_per_s", "output tokens / s"),
        ("latency_p95_s", "latency p95 (s)"),
        ("peak_rss_mb", "peak resident memory (MiB)"),
    ]
    labels = list(summaries)
    figure, axes = plt.subplots(2, 3, figsize=(13, 7))
    for axis, (key, title) in zip(axes.flat, panels, strict=True):
        # A candidate not asked the evaluation set has no accuracy or speed: an empty bar says so.
        measured = [key in summaries[label] for label in labels]
        values = [summaries[label].get(key, 0.0) for label in labels]
        errors = None
        if key == "accuracy":
            low = [summaries[label].get("accuracy_ci_low", 0.0) for label in labels]
            high = [summaries[label].get("accuracy_ci_high", 0.0) for label in labels]
            errors = [
                [value - bound for value, bound in zip(values, low, strict=True)],
                [bound - value for value, bound in zip(values, high, strict=True)],
            ]
        bars = axis.bar(
            labels, values, yerr=errors, capsize=4, color=[f"C{i}" for i in range(len(labels))]
        )
        texts = [f"{v:.4g}" if ok else "not asked" for v, ok in zip(values, measured, strict=True)]
        axis.bar_label(bars, labels=texts, label_type="center", fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.tick_params(axis="x", labelrotation=20, labelsize=8)
    figure.suptitle("Candidates on the evaluation set and the fidelity text")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def speed_fidelity_chart(
    summaries: dict[str, dict[str, float]], selection: Selection, path: Path
) -> None:
    """Decode rate against mean KL divergence from the reference: up and to the left is better.
    The chosen build is starred, builds that fail the gate are grey; a build that failed
    fidelity and was not asked (so has no decode rate) is a dotted line at its KLD."""
    plt = _pyplot()
    floor = 1e-6  # the reference (and a build that matches it exactly) sit at KLD 0
    figure, axis = plt.subplots(figsize=(8, 5.5))
    not_asked = [(label, s) for label, s in summaries.items() if not was_asked(s)]
    for index, (label, summary) in enumerate(not_asked):
        kld = max(summary.get("kld_mean", floor), floor)
        axis.axvline(kld, color="0.6", linestyle=":", zorder=1)
        # At the top and the bottom in turn: the failing builds often sit close together.
        axis.annotate(
            f"{label}: not asked, failed fidelity (mean KLD {kld:.2g})",
            (kld, 0.02 if index % 2 else 0.98), xycoords=("data", "axes fraction"),
            textcoords="offset points", xytext=(3, 0), rotation=90,
            va="bottom" if index % 2 else "top", ha="left", fontsize=8, color="0.45",
        )  # fmt: skip
    for index, (label, summary) in enumerate(summaries.items()):
        if not was_asked(summary):
            continue
        kld, speed = max(summary.get("kld_mean", floor), floor), summary["tokens_per_s"]
        failed = bool(selection.failures.get(label))
        chosen = label == selection.chosen
        axis.scatter(
            kld, speed, s=220 if chosen else 70, marker="*" if chosen else "o",
            color="0.7" if failed else ("C3" if chosen else "C0"), zorder=3,
        )  # fmt: skip
        axis.annotate(
            label + (" (chosen)" if chosen else " (fails gate)" if failed else ""),
            # Above and below in turn: neighbouring builds (int4 and its variants) often sit
            # on almost the same point.
            (kld, speed), textcoords="offset points", xytext=(6, 6 if index % 2 else -14),
            fontsize=9,
            color="0.5" if failed else "black",
        )  # fmt: skip
    axis.set_xscale("log")
    # Room on the right for the labels of the least faithful builds.
    widest = max(max(s.get("kld_mean", floor), floor) for s in summaries.values())
    axis.set_xlim(floor / 3, widest * 30)
    axis.set_xlabel(f"mean KL divergence from the reference (log; {floor:g} = identical)")
    axis.set_ylabel("decode rate (output tokens / s)")
    axis.set_title("Speed against fidelity")
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


HEADLINE = (
    "accuracy", "accuracy_ci_low", "accuracy_ci_high", "flips_lost", "flips_gained",
    "mcnemar_p", "kld_mean", "kld_p99", "top1_agreement", "ppl_ratio", "delta_p_rms",
    "tokens_per_s", "latency_p95_s", "ttft_mean_s", "peak_rss_mb",
)  # fmt: skip


def summary_markdown(
    summaries: dict[str, dict[str, float]], selection: Selection | None = None
) -> str:
    """One row per metric (the headline ones first), one column per model; the policy's verdict
    per model below."""
    present = {key for summary in summaries.values() for key in summary}
    keys = [k for k in HEADLINE if k in present] + sorted(present - set(HEADLINE))
    lines = ["| metric | " + " | ".join(summaries) + " |", "|---" * (len(summaries) + 1) + "|"]
    for key in keys:
        cells = [f"{summaries[label].get(key, float('nan')):.4g}" for label in summaries]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    if selection is not None:
        lines += ["", *(f"- {label}: {selection.verdicts[label]}" for label in summaries)]
    return "\n".join(lines) + "\n"


CANDIDATE_COLUMNS = (
    ("accuracy", "accuracy", "{:.3f}"),
    ("95% interval", ("accuracy_ci_low", "accuracy_ci_high"), "{:.3f}-{:.3f}"),
    ("lost / gained", ("flips_lost", "flips_gained"), "{:.0f} / {:.0f}"),
    ("McNemar p", "mcnemar_p", "{:.3g}"),
    ("mean KLD", "kld_mean", "{:.4f}"),
    ("KLD p99", "kld_p99", "{:.4f}"),
    ("top-1", "top1_agreement", "{:.3f}"),
    ("top-1 95% interval", ("top1_agreement_ci_low", "top1_agreement_ci_high"), "{:.3f}-{:.3f}"),
    ("ppl ratio", "ppl_ratio", "{:.3f}"),
    ("decode tok/s", "tokens_per_s", "{:.1f}"),
    ("p95 s", "latency_p95_s", "{:.2f}"),
)


def candidates_table(
    summaries: dict[str, dict[str, float]], reference: str, verdicts: dict[str, str],
    answers: dict[str, str],
) -> str:  # fmt: skip
    """One markdown row per candidate (the model card's and bench.quality's table): who answered
    its items, its measures ("-" where it was not measured: a candidate not asked the
    evaluation set), and why it was or was not chosen."""
    header = ["model", "answers", *(title for title, _, _ in CANDIDATE_COLUMNS), "verdict"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|---|---" + "|---:" * len(CANDIDATE_COLUMNS) + "|---|",
    ]
    for label, s in summaries.items():
        cells = [label + (" (reference)" if label == reference else "")]
        cells.append(answers.get(label, ""))
        for _, keys, fmt in CANDIDATE_COLUMNS:
            keys = (keys,) if isinstance(keys, str) else keys
            measured = all(key in s for key in keys)
            cells.append(fmt.format(*(s[key] for key in keys)) if measured else "-")
        cells.append(verdicts.get(label, ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# What an evaluate run spends its time on, as its `seconds.<phase>` metrics (each candidate's
# as `<label>.seconds.<phase>`); `seconds.total` is their sum and what lies between them.
EVALUATE_PHASES = ("loading", "fidelity", "asking", "logging")


def phase_seconds(metrics: dict[str, float], total: bool = False) -> dict[str, float]:
    """An evaluate run's phases (and its total), in order, from its metrics."""
    phases = (*EVALUATE_PHASES, "total") if total else EVALUATE_PHASES
    return {p: metrics[f"seconds.{p}"] for p in phases if f"seconds.{p}" in metrics}


# Where each candidate's nested evaluate run keeps its answers.
CANDIDATE_ANSWERS = "eval/answers.json"


def candidate_rows(eval_set: EvalSet, candidate: CandidateResult) -> list[dict[str, Any]]:
    """One candidate's answers, one row per item, the same columns for every candidate (so
    MLflow's Evaluation view compares their tables on `question`)."""
    return [
        {
            "id": item.id,
            "question": item.question,
            "reference": item.reference,
            "answer": result.answer if result.error is None else f"ERROR {result.error}",
            "correct": result.correct,
            "latency_s": round(result.latency_s, 3),
            "answered_by": result.shared_from or candidate.label,
        }
        for item, result in zip(eval_set.items, candidate.items, strict=True)
    ]
