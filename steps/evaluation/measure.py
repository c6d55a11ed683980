"""Ask a logged chat model every item of an evaluation set, and measure it.

Each item is asked through the model's pyfunc interface and checked against the item's accepted
answer patterns. The first `timed_items` are asked one at a time, streamed where the model
streams (for time to first token): speed comes from them alone. The rest are asked
`concurrency` at a time, which only models that batch concurrent requests (the ONNX engine)
are given, so that the accuracy of many items costs less time. Loading needs the
tracking store that holds the model; nothing here needs an open MLflow run.
"""

from __future__ import annotations

import functools
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
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
    label: str,
    uri: str,
    eval_set: EvalSet,
    max_new_tokens: int,
    timed_items: int,
    concurrency: int = 1,
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
            untimed_ask = functools.partial(
                ask, model, max_new_tokens=max_new_tokens, streamable=False
            )
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                for result in pool.map(untimed_ask, untimed):
                    result.timed = False
                    candidate.items.append(result)
                    bar.update()
        del model, untimed_ask
    candidate.peak_rss_mb = peak[0]
    return candidate
