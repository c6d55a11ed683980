"""Ask a logged chat model every item of an evaluation set, and measure it.

Each item is asked through the model's pyfunc interface and checked against the item's accepted
answer patterns. The first `timed_items` are asked one at a time, streamed where the model
streams (for time to first token): speed comes from them alone. The rest are asked
`batch_size` at a time in one predict call, which both runtimes generate together, so that the
accuracy of many items costs less time. Loading needs the tracking store that holds the model;
nothing here needs an open MLflow run.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import psutil
from tqdm.auto import tqdm

from steps.evaluation.evalset import EvalItem, EvalSet, is_correct


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
    timed: bool = True  # asked alone: its latency and decode rate count in the speed figures


@dataclass
class CandidateResult:
    label: str
    model_uri: str
    load_seconds: float
    peak_rss_mb: float
    items: list[ItemResult] = field(default_factory=list)


def chat_request(item: EvalItem, max_new_tokens: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": item.question}], "max_tokens": max_new_tokens}


def answered(result: ItemResult, item: EvalItem, answer: str, usage: dict | None) -> ItemResult:
    result.answer = answer
    result.correct = is_correct(answer, item.accept)
    result.prompt_tokens = int((usage or {}).get("prompt_tokens", 0))
    result.completion_tokens = int((usage or {}).get("completion_tokens", 0))
    return result


def ask(model, item: EvalItem, max_new_tokens: int, streamable: bool) -> ItemResult:
    """One item through the pyfunc model; a failure is recorded on the result, not raised."""
    request = chat_request(item, max_new_tokens)
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
    return answered(result, item, answer, usage)


def ask_batch(model, items: tuple[EvalItem, ...], max_new_tokens: int) -> list[ItemResult]:
    """Several items in one predict call, which both runtimes generate together (the
    transformers pipeline in batches of the model's `batch_size`, the ONNX engine all at once).
    Each item's latency is the batch's; if the batch fails, each item is asked alone, so that
    the failure is recorded on the items that cause it."""
    import pandas as pd

    started = time.perf_counter()
    try:
        responses = model.predict(pd.DataFrame([chat_request(i, max_new_tokens) for i in items]))
    except Exception:  # any model failure: find the items it belongs to
        results = [ask(model, item, max_new_tokens, streamable=False) for item in items]
    else:
        seconds = time.perf_counter() - started
        results = [
            answered(
                ItemResult(item.id, latency_s=seconds), item,
                response["choices"][0]["message"]["content"], response.get("usage"),
            )
            for item, response in zip(items, responses, strict=True)
        ]  # fmt: skip
    for result in results:
        result.timed = False
    return results


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
    label: str,
    uri: str,
    eval_set: EvalSet,
    max_new_tokens: int,
    timed_items: int,
    batch_size: int,
) -> CandidateResult:
    import mlflow

    with peak_rss() as peak, tempfile.TemporaryDirectory(prefix=f"evaluate-{label}-") as copy:
        started = time.perf_counter()
        model = mlflow.pyfunc.load_model(uri, dst_path=None if stored_locally(uri) else copy)
        load_seconds = time.perf_counter() - started
        flavor = model.metadata.flavors.get("python_function", {})
        streamable = bool(flavor.get("streamable"))
        candidate = CandidateResult(label, uri, load_seconds, 0.0)
        timed, untimed = eval_set.items[:timed_items], eval_set.items[timed_items:]
        with tqdm(total=len(eval_set.items), desc=f"evaluating {label}", unit="item") as bar:
            for item in timed:
                candidate.items.append(ask(model, item, max_new_tokens, streamable))
                bar.update()
            for start in range(0, len(untimed), batch_size):
                batch = untimed[start : start + batch_size]
                candidate.items.extend(ask_batch(model, batch, max_new_tokens))
                bar.update(len(batch))
        del model
    candidate.peak_rss_mb = peak[0]
    return candidate
