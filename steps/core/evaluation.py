"""Ask logged chat models every item of an evaluation set, and measure them.

Plain functions over plain values: the evaluate step wires them to MLflow. Each item is asked
through the model's pyfunc interface, streamed where the model streams (for time to first
token), and checked against the item's accepted answer patterns.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import psutil
from mlflow.genai.scorers import scorer
from tqdm.auto import tqdm

from steps.core.errors import PipelineError


@dataclass(frozen=True)
class EvalItem:
    id: str
    category: str
    question: str
    reference: str
    accept: tuple[str, ...]


@dataclass(frozen=True)
class EvalSet:
    name: str
    path: Path
    sha256: str
    items: tuple[EvalItem, ...]


@dataclass
class ItemResult:
    item_id: str
    answer: str = ""
    correct: bool = False
    latency_s: float = 0.0
    ttft_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class CandidateResult:
    label: str
    model_uri: str
    load_seconds: float
    peak_rss_mb: float
    items: list[ItemResult] = field(default_factory=list)


def load_eval_set(path: Path, max_items: int | None = None) -> EvalSet:
    """Parse and check a JSONL evaluation set; bad lines are reported by line number."""
    if not path.is_file():
        raise PipelineError(f"evaluate.dataset={path} does not exist")
    raw = path.read_bytes()
    items = []
    for number, line in enumerate(raw.decode().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            body = json.loads(line)
            item = EvalItem(
                id=str(body["id"]),
                category=str(body.get("category", "")),
                question=str(body["question"]),
                reference=str(body["reference"]),
                accept=tuple(body["accept"]),
            )
            for pattern in item.accept:
                re.compile(pattern)
        except (json.JSONDecodeError, KeyError, TypeError, re.error) as error:
            raise PipelineError(
                f"{path}:{number}: not an evaluation item ({type(error).__name__}: {error}); "
                "each line needs id, question, reference and accept (a list of regexes)"
            ) from None
        if not item.accept:
            raise PipelineError(f"{path}:{number}: item {item.id} has no accepted patterns")
        items.append(item)
    if not items:
        raise PipelineError(f"evaluate.dataset={path} has no items")
    return EvalSet(
        name=path.stem,
        path=path,
        sha256=hashlib.sha256(raw).hexdigest(),
        items=tuple(items[:max_items] if max_items else items),
    )


def is_correct(reply: str, accept: tuple[str, ...]) -> bool:
    """A reply is right when it matches any accepted pattern (case-insensitive)."""
    return any(re.search(pattern, reply, re.IGNORECASE) for pattern in accept)


@scorer
def answer_matches(outputs: Any, expectations: dict[str, Any]) -> bool:
    """MLflow scorer: the model's own reply matches one of the item's accepted patterns."""
    return is_correct(str(outputs), tuple(expectations["accept"]))


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


def ask(model, item: EvalItem, max_new_tokens: int, streamable: bool) -> ItemResult:
    """One item through the pyfunc model; a failure is recorded on the result, not raised."""
    request = {
        "messages": [{"role": "user", "content": item.question}],
        "max_tokens": max_new_tokens,
    }
    result = ItemResult(item_id=item.id)
    usage = None
    started = time.perf_counter()
    try:
        if streamable:
            pieces = []
            for chunk in model.predict_stream(request):
                choice = chunk["choices"][0]
                piece = choice.get("delta", {}).get("content") or ""
                if piece and result.ttft_s is None:
                    result.ttft_s = time.perf_counter() - started
                pieces.append(piece)
                usage = chunk.get("usage")
            answer = "".join(pieces)
        else:
            (response,) = model.predict(request)
            answer = response["choices"][0]["message"]["content"]
            usage = response["usage"]
    except Exception as error:  # any model failure: record it on the item and go on
        result.latency_s = time.perf_counter() - started
        result.error = f"{type(error).__name__}: {error}"[:500]
        return result
    result.latency_s = time.perf_counter() - started
    result.answer = answer
    result.correct = is_correct(answer, item.accept)
    result.prompt_tokens = int((usage or {}).get("prompt_tokens", 0))
    result.completion_tokens = int((usage or {}).get("completion_tokens", 0))
    return result


@contextmanager
def peak_rss() -> Iterator[list[float]]:
    """Sample this process's resident memory while the block runs; yields [peak MiB]."""
    process, peak, done = psutil.Process(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss / 2**20)
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()


def stored_locally(model_uri: str) -> bool:
    """Whether a `models:/m-<id>` model's files already lie on this machine. MLflow reads those
    in place; any other store it copies into a temp folder it never removes (gigabytes per run
    for Phi-3), unless the copy is given a folder of ours."""
    import mlflow

    if not model_uri.startswith("models:/m-"):
        return False
    location = mlflow.get_logged_model(model_uri.removeprefix("models:/")).artifact_location
    return urlparse(location).scheme in ("", "file")


def evaluate_candidate(
    label: str, uri: str, eval_set: EvalSet, max_new_tokens: int
) -> CandidateResult:
    import mlflow

    with peak_rss() as peak, tempfile.TemporaryDirectory(prefix=f"evaluate-{label}-") as copy:
        started = time.perf_counter()
        model = mlflow.pyfunc.load_model(uri, dst_path=None if stored_locally(uri) else copy)
        load_seconds = time.perf_counter() - started
        flavor = model.metadata.flavors.get("python_function", {})
        streamable = bool(flavor.get("streamable"))
        candidate = CandidateResult(label, uri, load_seconds, 0.0)
        for item in tqdm(eval_set.items, desc=f"evaluating {label}", unit="item"):
            candidate.items.append(ask(model, item, max_new_tokens, streamable))
        del model
    candidate.peak_rss_mb = peak[0]
    return candidate


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
