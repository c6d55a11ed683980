"""What an evaluation shows: per-model summaries, parity between models, the per-item table,
the comparison chart and the markdown summary. Plain functions of measured results."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from steps.evaluation.evalset import EvalSet
from steps.evaluation.measure import CandidateResult


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[index]


def summarize(candidate: CandidateResult) -> dict[str, float]:
    answered = [r for r in candidate.items if r.error is None]
    latencies = [r.latency_s for r in answered]
    ttfts = [r.ttft_s for r in answered if r.ttft_s is not None]
    completion = sum(r.completion_tokens for r in answered)
    generating = sum(r.latency_s - (r.ttft_s or 0.0) for r in answered)
    summary = {
        "accuracy": sum(r.correct for r in candidate.items) / len(candidate.items),
        "errors": float(len(candidate.items) - len(answered)),
        "latency_mean_s": statistics.fmean(latencies) if latencies else float("nan"),
        "latency_p50_s": _percentile(latencies, 0.5),
        "latency_p95_s": _percentile(latencies, 0.95),
        "prompt_tokens": float(sum(r.prompt_tokens for r in answered)),
        "completion_tokens": float(completion),
        "tokens_per_s": completion / generating if generating > 0 else float("nan"),
        "load_seconds": candidate.load_seconds,
        "peak_rss_mb": candidate.peak_rss_mb,
    }
    if ttfts:
        summary["ttft_mean_s"] = statistics.fmean(ttfts)
    return summary


def parity(candidates: list[CandidateResult]) -> float:
    """Share of items where every candidate gave exactly the same answer."""
    answers = [[r.answer if r.error is None else None for r in c.items] for c in candidates]
    same = [len(set(row)) == 1 and row[0] is not None for row in zip(*answers, strict=True)]
    return sum(same) / len(same)


def per_item_rows(eval_set: EvalSet, candidates: list[CandidateResult]) -> list[dict[str, Any]]:
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


def comparison_chart(summaries: dict[str, dict[str, float]], path: Path) -> None:
    """Quality and speed side by side, one bar per model, one panel per measure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("accuracy", "accuracy (share correct)"),
        ("latency_p50_s", "latency p50 (s)"),
        ("latency_p95_s", "latency p95 (s)"),
        ("tokens_per_s", "output tokens / s"),
        ("ttft_mean_s", "time to first token (s)"),
        ("peak_rss_mb", "peak resident memory (MiB)"),
    ]
    labels = list(summaries)
    figure, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for axis, (key, title) in zip(axes.flat, panels, strict=True):
        values = [summaries[label].get(key, float("nan")) for label in labels]
        bars = axis.bar(labels, values, color=[f"C{i}" for i in range(len(labels))])
        axis.bar_label(bars, fmt="%.3g")
        axis.set_title(title)
        axis.tick_params(axis="x", labelrotation=15)
    figure.suptitle("Candidates on the evaluation set")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def summary_markdown(summaries: dict[str, dict[str, float]]) -> str:
    keys = sorted({key for summary in summaries.values() for key in summary})
    lines = ["| metric | " + " | ".join(summaries) + " |", "|---" * (len(summaries) + 1) + "|"]
    for key in keys:
        cells = [f"{summaries[label].get(key, float('nan')):.4g}" for label in summaries]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def genai_rows(eval_set: EvalSet, candidate: CandidateResult) -> list[dict[str, Any]]:
    """Precomputed answers in the shape `mlflow.genai.evaluate(data=...)` takes."""
    return [
        {
            "inputs": {"question": item.question},
            "outputs": result.answer if result.error is None else f"ERROR {result.error}",
            "expectations": {"accept": list(item.accept), "reference": item.reference},
        }
        for item, result in zip(eval_set.items, candidate.items, strict=True)
    ]
