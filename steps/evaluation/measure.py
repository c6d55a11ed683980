"""Ask a logged chat model every item of an evaluation set, and measure it.

Each item is asked through the model's pyfunc interface and checked against the item's accepted
answer patterns. The first `timed_items` are asked one at a time, streamed where the model
streams (for time to first token): speed comes from them alone. The rest are asked
`batch_size` at a time in one predict call, which both runtimes generate together, so that the
accuracy of many items costs less time. A candidate that computes another's distribution (its
fidelity says so) may take that one's answers to the untimed items (take_shared_answers).
Loading needs the tracking store that holds the model;
nothing here needs an open MLflow run.
"""

from __future__ import annotations

import dataclasses
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import psutil
from tqdm.auto import tqdm

from steps.evaluation.evalset import EvalItem, is_correct


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
    shared_from: str | None = None  # the candidate that generated this answer, if not this one


@dataclass
class CandidateResult:
    label: str
    load_seconds: float
    peak_rss_mb: float
    items: list[ItemResult] = field(default_factory=list)
    ask_seconds: float = 0.0  # generating its answers, loading excluded

    @property
    def asked(self) -> int:
        """Items this candidate generated an answer for itself."""
        return sum(item.shared_from is None for item in self.items)

    @property
    def shared_from(self) -> str | None:
        return next((i.shared_from for i in self.items if i.shared_from is not None), None)

    @property
    def tokens_per_s(self) -> float:
        """Decode rate over the items asked alone: completion tokens over the time after the
        first token (NaN: none)."""
        timed = [r for r in self.items if r.timed and r.error is None]
        completion = sum(r.completion_tokens for r in timed)
        generating = sum(r.latency_s - (r.ttft_s or 0.0) for r in timed)
        return completion / generating if generating > 0 else float("nan")


def same_answers(mine: list[ItemResult], theirs: list[ItemResult]) -> bool:
    """Whether two candidates answered the same items with the same text (errors never match)."""
    return len(mine) == len(theirs) and all(
        a.item_id == b.item_id and a.error is None and b.error is None and a.answer == b.answer
        for a, b in zip(mine, theirs, strict=True)
    )


def chat_request(item: EvalItem, max_new_tokens: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": item.question}], "max_tokens": max_new_tokens}


def answered(result: ItemResult, item: EvalItem, answer: str, usage: dict | None) -> ItemResult:
    """The item's result with its answer, whether it is correct, and the tokens it took."""
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


@contextmanager
def model_folder(model_uri: str) -> Iterator[Path]:
    """A logged model's files on this machine, for as long as the block runs: a model in a local
    store is read in place; any other is downloaded once into a temp folder of ours, removed
    after (MLflow's own loaders would copy it again for each load into a temp folder they never
    remove: gigabytes per run for Phi-3)."""
    import mlflow

    location = mlflow.get_logged_model(model_uri.removeprefix("models:/")).artifact_location
    if urlparse(location).scheme in ("", "file"):
        yield Path(url2pathname(urlparse(location).path))
        return
    with tempfile.TemporaryDirectory(prefix="evaluate-") as scratch:
        yield Path(mlflow.artifacts.download_artifacts(location, dst_path=scratch))


def take_shared_answers(candidate: CandidateResult, source: CandidateResult) -> None:
    """Give `candidate` the answers `source` has past the items `candidate` answered itself."""
    candidate.items += [
        dataclasses.replace(item, timed=False, shared_from=source.label)
        for item in source.items[len(candidate.items) :]
    ]


def evaluate_candidate(
    label: str,
    folder: Path,
    timed: tuple[EvalItem, ...],
    untimed: tuple[EvalItem, ...],
    max_new_tokens: int,
    batch_size: int,
    earlier: CandidateResult | None = None,
) -> CandidateResult:
    """Load the model from its folder (model_folder), ask it the `timed` items one at a time
    (streamed where it streams) and the `untimed` ones `batch_size` at a time; continue
    `earlier` (the same candidate's earlier part) if given."""
    import mlflow

    candidate = earlier or CandidateResult(label, 0.0, 0.0)
    with peak_rss() as peak:
        started = time.perf_counter()
        model = mlflow.pyfunc.load_model(str(folder))
        candidate.load_seconds += time.perf_counter() - started
        flavor = model.metadata.flavors.get("python_function", {})
        streamable = bool(flavor.get("streamable"))
        started = time.perf_counter()
        with tqdm(total=len(timed) + len(untimed), desc=f"evaluating {label}", unit="item") as bar:
            for item in timed:
                candidate.items.append(ask(model, item, max_new_tokens, streamable))
                bar.update()
            for start in range(0, len(untimed), batch_size):
                batch = untimed[start : start + batch_size]
                candidate.items.extend(ask_batch(model, batch, max_new_tokens))
                bar.update(len(batch))
        candidate.ask_seconds += time.perf_counter() - started
        del model
    candidate.peak_rss_mb = max(candidate.peak_rss_mb, peak[0])
    return candidate
