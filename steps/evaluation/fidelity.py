"""Fidelity to a reference: how far each candidate's next-token distributions move from the
reference model's on the same text, as llama.cpp's `llama-perplexity --kl-divergence` measures
what quantization costs.

The text (a versioned JSONL of prose and chat transcripts, the transcripts rendered in the
model's own chat template) is tokenized once by the reference, cut into windows of
`window` tokens, and each window is run teacher-forced through every model; positions in the
second half of a window (each with at least window/2 tokens of context) are scored:
KL(reference || candidate), whether both rank the same token first, each model's log-likelihood
of the actual next token. Memory stays bounded by one window: the full-vocabulary logits of one
window per model exist at a time and only per-position numbers are kept.

Each model is loaded from the logged model's own artifacts (the weights it carries):
transformers through MLflow's flavor, ONNX through onnxruntime-genai on the model's folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from steps.errors import PipelineError
from steps.evaluation.stats import wilson_interval

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Document:
    id: str
    kind: str  # prose or chat
    text: str = ""
    messages: tuple[dict[str, str], ...] = ()


@dataclass(frozen=True)
class FidelityText:
    name: str
    path: Path
    sha256: str
    documents: tuple[Document, ...]


def load_fidelity_text(path: Path) -> FidelityText:
    """Parse and check the fidelity text; a bad line is reported by its number."""
    if not path.is_file():
        raise PipelineError(f"evaluate.fidelity.text={path} does not exist")
    raw = path.read_bytes()
    documents = []
    for number, line in enumerate(raw.decode().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            body = json.loads(line)
            document = _document(body)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise PipelineError(
                f"{path}:{number}: not a fidelity document ({type(error).__name__}: {error}); "
                'write {"id", "kind": "prose", "text"} or {"id", "kind": "chat", "messages": '
                '[{"role", "content"}, ...]}'
            ) from None
        documents.append(document)
    if not documents:
        raise PipelineError(f"evaluate.fidelity.text={path} has no documents")
    return FidelityText(path.stem, path, hashlib.sha256(raw).hexdigest(), tuple(documents))


def _document(body: dict[str, Any]) -> Document:
    if body["kind"] == "prose":
        return Document(str(body["id"]), "prose", text=str(body["text"]))
    if body["kind"] == "chat":
        messages = tuple(
            {"role": m["role"], "content": str(m["content"])} for m in body["messages"]
        )
        if not messages or any(m["role"] not in ROLES for m in messages):
            raise ValueError(f"chat messages need roles among {', '.join(ROLES)}")
        return Document(str(body["id"]), "chat", messages=messages)
    raise ValueError(f"kind {body['kind']!r} is neither prose nor chat")


def check_fills_a_window(text: FidelityText, window: int) -> None:
    """Before any model exists: a text with fewer bytes than a window has fewer tokens than one
    under any tokenizer (a token covers at least one byte; chat templates add a few). The exact
    count comes when the reference tokenizes it, before any model is scored."""
    size = sum(
        len(document.text.encode()) + sum(len(m["content"].encode()) + 8 for m in document.messages)
        for document in text.documents
    )
    if size < window:
        raise PipelineError(
            f"evaluate.fidelity.text={text.path} holds about {size} tokens at most, shorter than "
            f"one window of {window}: use a longer text or a smaller evaluate.fidelity.window"
        )


class LogitModel(Protocol):
    """A model scored teacher-forced: the logits at every position of a window."""

    vocab_size: int

    def encode(self, document: Document) -> list[int]: ...

    def logits(self, ids: np.ndarray, first: int) -> np.ndarray:
        """float32 [len(ids) - 1 - first, vocab]: the predictions for ids[first + 1:]."""
        ...


def token_stream(text: FidelityText, model: LogitModel) -> np.ndarray:
    """The whole text as one stream of the model's token ids, document after document."""
    return np.array([t for d in text.documents for t in model.encode(d)], dtype=np.int64)


def windows(stream: np.ndarray, window: int, scored_tokens: int | None) -> list[np.ndarray]:
    """Consecutive, non-overlapping windows: as many as `scored_tokens` needs (all if None)."""
    available = len(stream) // window
    if available == 0:
        raise PipelineError(
            f"the fidelity text is {len(stream)} tokens, shorter than one window of {window}: "
            "use a longer evaluate.fidelity.text or a smaller evaluate.fidelity.window"
        )
    per_window = window - 1 - window // 2
    wanted = available if scored_tokens is None else -(-scored_tokens // per_window)
    if wanted > available:
        log.warning(
            "the fidelity text has %d windows of %d tokens (%d scored tokens), fewer than the "
            "%d asked for: scoring them all",
            available, window, available * per_window, scored_tokens,
        )  # fmt: skip
    return [stream[i * window : (i + 1) * window] for i in range(min(wanted, available))]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities in float32 (float64 costs several times as much here)."""
    logits = logits.astype(np.float32, copy=False)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def check_same_vocabulary(name: str, shape: tuple[int, ...], reference: tuple[int, ...]) -> None:
    """Logits of different vocabularies cannot be compared: stop with a line that says so."""
    if shape != reference:
        raise PipelineError(
            f"{name}'s logits have shape {shape}, the reference's {reference}: they do not "
            "share a vocabulary, so they cannot be compared"
        )


@dataclass(frozen=True)
class ReferenceWindow:
    """What every candidate is compared with on one window, computed once per window."""

    log_probs: np.ndarray  # [n, vocab]
    probs: np.ndarray
    top1: np.ndarray  # [n]
    targets: np.ndarray  # the n actual next tokens
    nll: np.ndarray  # the reference's negative log-likelihood of each

    @classmethod
    def of(cls, logits: np.ndarray, targets: np.ndarray) -> ReferenceWindow:
        log_probs = log_softmax(logits)
        nll = -log_probs[np.arange(len(targets)), targets]
        return cls(log_probs, np.exp(log_probs), log_probs.argmax(axis=-1), targets, nll)


@dataclass
class Agreement:
    """Per-position measures of one candidate against the reference, accumulated window by
    window (a few numbers per scored token, never the distributions)."""

    kld: list[np.ndarray] = field(default_factory=list)
    same_top1: list[np.ndarray] = field(default_factory=list)
    reference_nll: list[np.ndarray] = field(default_factory=list)
    nll: list[np.ndarray] = field(default_factory=list)
    delta_p: list[np.ndarray] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, reference: np.ndarray, candidate: np.ndarray, targets: np.ndarray) -> None:
        """reference, candidate: logits [n, vocab]; targets: the n actual next tokens."""
        check_same_vocabulary("the candidate", candidate.shape, reference.shape)
        self.add_window(ReferenceWindow.of(reference, targets), log_softmax(candidate))

    def add_window(self, reference: ReferenceWindow, log_probs: np.ndarray) -> None:
        """The candidate's log-probabilities [n, vocab] on a window the reference scored."""
        kld = (reference.probs * (reference.log_probs - log_probs)).sum(axis=-1)
        self.kld.append(np.maximum(kld, 0.0))  # rounding can give -1e-9 for equal rows
        self.same_top1.append(reference.top1 == log_probs.argmax(axis=-1))
        nll = -log_probs[np.arange(len(reference.targets)), reference.targets]
        self.reference_nll.append(reference.nll)
        self.nll.append(nll)
        self.delta_p.append(np.exp(-nll) - np.exp(-reference.nll))

    def summary(self) -> dict[str, float]:
        kld = np.concatenate(self.kld).astype(np.float64)
        same = np.concatenate(self.same_top1)
        ref_nll = np.concatenate(self.reference_nll).astype(np.float64)
        nll = np.concatenate(self.nll).astype(np.float64)
        delta_p = np.concatenate(self.delta_p).astype(np.float64)
        low, high = wilson_interval(int(same.sum()), len(same))
        ppl, ref_ppl = float(np.exp(nll.mean())), float(np.exp(ref_nll.mean()))
        return {
            "kld_mean": float(kld.mean()),
            "kld_p99": float(np.percentile(kld, 99)),
            "kld_max": float(kld.max()),
            "top1_agreement": float(same.mean()),
            "top1_agreement_ci_low": low,
            "top1_agreement_ci_high": high,
            "ppl": ppl,
            "ppl_reference": ref_ppl,
            "ppl_ratio": ppl / ref_ppl,
            "delta_p_rms": float(np.sqrt((delta_p**2).mean())),
            "scored_tokens": float(len(kld)),
            "seconds.fidelity": self.seconds,
        }


def score(
    reference: LogitModel,
    candidates: dict[str, LogitModel],
    stream_windows: list[np.ndarray],
) -> dict[str, dict[str, float]]:
    """Every candidate against the reference over the windows; a candidate that is the reference
    object itself is compared with the reference's own logits (KLD 0, top-1 1)."""
    agreements = {label: Agreement() for label in candidates}
    for ids in tqdm(stream_windows, desc="fidelity", unit="window"):
        first = len(ids) // 2
        started = time.perf_counter()
        window = ReferenceWindow.of(reference.logits(ids, first), ids[first + 1 :])
        reference_seconds = time.perf_counter() - started
        for label, model in candidates.items():
            started = time.perf_counter()
            if model is reference:
                log_probs = window.log_probs
            else:
                logits = model.logits(ids, first)
                check_same_vocabulary(label, logits.shape, window.log_probs.shape)
                log_probs = log_softmax(logits)
            agreements[label].add_window(window, log_probs)
            # The reference's own time is the forward pass it shares with everyone.
            agreements[label].seconds += (
                time.perf_counter() - started + (reference_seconds if model is reference else 0.0)
            )
    return {label: agreement.summary() for label, agreement in agreements.items()}


# -- models from their logged artifacts -------------------------------------------------------


class TransformersLogits:
    def __init__(self, model, tokenizer) -> None:
        self._model, self._tokenizer = model.eval(), tokenizer
        self.vocab_size = int(model.config.vocab_size)

    def encode(self, document: Document) -> list[int]:
        return _encode(self._tokenizer, document)

    def logits(self, ids: np.ndarray, first: int) -> np.ndarray:
        import torch

        keep = len(ids) - first
        with torch.inference_mode():
            output = self._model(torch.from_numpy(ids[None, :]), logits_to_keep=keep)
        return output.logits[0, :-1].float().numpy()


class OnnxLogits:
    def __init__(self, folder: Path) -> None:
        import onnxruntime_genai as og
        from transformers import AutoTokenizer

        # As the served model does (steps/serving/onnx_chat_model.py): no usage telemetry and no
        # session file in the temp folder.
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        config = og.Config(str(folder))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        session = {"intra_op_num_threads": cores or os.cpu_count() or 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
        self._og, self._model = og, og.Model(config)
        self._tokenizer = AutoTokenizer.from_pretrained(folder)
        genai = json.loads((folder / "genai_config.json").read_text())["model"]
        self.vocab_size = int(genai["vocab_size"])

    def encode(self, document: Document) -> list[int]:
        return _encode(self._tokenizer, document)

    def logits(self, ids: np.ndarray, first: int) -> np.ndarray:
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(max_length=len(ids))
        generator = self._og.Generator(self._model, params)
        generator.append_tokens(ids.astype(np.int32)[None, :])
        logits = generator.get_output("logits")
        return np.asarray(logits[0, first:-1], dtype=np.float32)


def _encode(tokenizer, document: Document) -> list[int]:
    if document.kind == "chat":
        text = tokenizer.apply_chat_template(list(document.messages), tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(document.text + "\n\n")["input_ids"]


@contextmanager
def loaded(runtime: str, folder: Path) -> Iterator[LogitModel]:
    """A logged chat model's weights, loaded for scoring from its folder
    (steps.evaluation.measure.model_folder)."""
    import mlflow

    if runtime == "transformers":
        parts = mlflow.transformers.load_model(str(folder), return_type="components")
        yield TransformersLogits(parts["model"], parts["tokenizer"])
    else:
        flavor = mlflow.models.Model.load(folder).flavors["python_function"]
        yield OnnxLogits(folder / flavor["artifacts"]["onnx_model"]["path"])


def score_models(
    text: FidelityText, reference: str, folders: dict[str, tuple[str, Path]], window: int,
    scored_tokens: int | None,
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:  # fmt: skip
    """Every model (label -> its runtime and folder) scored against the `reference` label on
    the text, all loaded at once so that the reference runs each window once. Returns the
    scores and each model's loading seconds."""
    with ExitStack() as stack:
        models, loading = {}, {}
        for label, (runtime, folder) in folders.items():
            started = time.perf_counter()
            models[label] = stack.enter_context(loaded(runtime, folder))
            loading[label] = time.perf_counter() - started
        stream = token_stream(text, models[reference])
        cut = windows(stream, window, scored_tokens)
        log.info(
            "fidelity: %d windows of %d tokens from %s (%d tokens), against %s",
            len(cut), window, text.name, len(stream), reference,
        )  # fmt: skip
        scores = score(models[reference], models, cut)
    return scores, loading
