"""A logged chat model of either runtime, loaded for the OpenAI-compatible server: one way to
check a request, and one way to generate that yields text as each token is decoded.

Both runtimes answer the same request dict: `messages` (chat, through the model's chat template)
or `prompt` (plain text), `max_tokens`, `temperature` (0 or absent with greedy defaults:
greedy), `top_p`, `stop`. `generate` yields (text piece, finish reason or None, tokens generated
so far), like the ONNX model's own `generate`; closing the iterator early stops the generation.

- onnx: the wrap_onnx model's `prepare_chat`/`prepare_prompt` and `generate`, so concurrent
  requests share its one batching `og.Engine`.
- transformers: the flavor's pipeline cannot stream through pyfunc, so its model and tokenizer
  generate here, one request at a time (torch already spreads one generation over every core),
  with tokens decoded as they come. The prompt is built the way the flavor builds it (the chat
  template as text, tokenized without special tokens), so greedy answers equal the flavor's.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from steps.errors import PipelineError

log = logging.getLogger(__name__)

Piece = tuple[str, str | None, int]


class RequestError(Exception):
    """A request the model cannot answer; `status` is the HTTP status to answer it with."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code=None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


class ServedModel(Protocol):
    runtime: str

    def prepare(self, request: dict[str, Any]) -> Any:
        """Check one request and build its prompt; raises RequestError."""

    def prompt_tokens(self, prepared: Any) -> int: ...

    def generate(self, prepared: Any) -> Iterator[Piece]: ...

    def close(self) -> None:
        """Free the model (its engine, its weights) once no request uses it any more."""


class OnnxServed:
    runtime = "onnx"

    def __init__(self, chat_model):
        self._chat_model = chat_model

    def prepare(self, request: dict[str, Any]):
        from mlflow.exceptions import MlflowException

        try:
            if "messages" in request:
                return self._chat_model.prepare_chat(request)
            return self._chat_model.prepare_prompt(request)
        except MlflowException as error:
            too_long = error.json_kwargs.get("code") == "context_length_exceeded"
            raise RequestError(
                error.message,
                status=413 if too_long else 400,
                param="messages" if too_long and "messages" in request else None,
                code="context_length_exceeded" if too_long else None,
            ) from None

    def prompt_tokens(self, prepared) -> int:
        return len(prepared.ids)

    def generate(self, prepared) -> Iterator[Piece]:
        return self._chat_model.generate(prepared)

    def close(self) -> None:
        self._chat_model.close()


@dataclass(frozen=True)
class TransformersRequest:
    ids: list[int]
    max_new: int
    sampling: dict[str, Any]  # generate()'s do_sample, temperature, top_p
    stop: tuple[str, ...]


class TransformersServed:
    runtime = "transformers"

    def __init__(self, pipeline, defaults: dict[str, Any]):
        self._model, self._tokenizer = pipeline.model, pipeline.tokenizer
        self._defaults = defaults
        self._context_length = int(self._model.config.max_position_embeddings)
        eos = self._model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self._one_at_a_time = threading.Lock()

    def prepare(self, request: dict[str, Any]) -> TransformersRequest:
        if "messages" in request:
            try:
                text = self._tokenizer.apply_chat_template(
                    request["messages"], tokenize=False, add_generation_prompt=True
                )
            except Exception as error:  # the template's own raise_exception()
                raise RequestError(
                    f"the model's chat template refused these messages: {error}"
                ) from None
        else:
            text = request["prompt"]
        ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        room = self._context_length - len(ids)
        if room <= 0:
            raise RequestError(
                f"the prompt has {len(ids)} tokens; the model's context window is "
                f"{self._context_length}: shorten the conversation",
                status=413,
                param="messages" if "messages" in request else "prompt",
                code="context_length_exceeded",
            )
        max_new = min(request.get("max_tokens") or self._defaults["max_new_tokens"], room)
        temperature = request.get("temperature")
        if temperature is None:
            do_sample = bool(self._defaults.get("do_sample"))
            temperature = self._defaults.get("temperature", 1.0)
        else:
            do_sample = temperature > 0
        sampling: dict[str, Any] = {"do_sample": do_sample}
        if do_sample:
            sampling |= {
                "temperature": temperature,
                "top_p": request.get("top_p", self._defaults.get("top_p", 1.0)),
            }
        return TransformersRequest(ids, max_new, sampling, tuple(request.get("stop") or ()))

    def prompt_tokens(self, prepared: TransformersRequest) -> int:
        return len(prepared.ids)

    def generate(self, prepared: TransformersRequest) -> Iterator[Piece]:
        from tokenizers.decoders import DecodeStream

        tokens: queue.SimpleQueue[int | BaseException | None] = queue.SimpleQueue()
        cancelled = threading.Event()
        worker = threading.Thread(
            target=self._generate, args=(prepared, tokens, cancelled), daemon=True
        )
        worker.start()
        decoder = DecodeStream(skip_special_tokens=True)
        backend = self._tokenizer.backend_tokenizer
        scanner = StopScanner(prepared.stop)
        count, ended = 0, False
        try:
            while True:
                item = tokens.get()
                if item is None:
                    ended = True
                    yield scanner.rest(), "length", count
                    return
                if isinstance(item, BaseException):
                    ended = True
                    raise RuntimeError(f"generation failed: {item}") from item
                count += 1
                if item in self._eos:
                    ended = True
                    yield scanner.rest(), "stop", count
                    return
                piece, stopped = scanner.add(decoder.step(backend, item) or "")
                if stopped:
                    yield piece, "stop", count
                    return
                if piece:
                    yield piece, None, count
        finally:
            if not ended:  # a stop string, or a reader that went away
                cancelled.set()
                worker.join()  # generate() stops at its next step

    def _generate(self, prepared: TransformersRequest, tokens, cancelled: threading.Event):
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        class Streamer(BaseStreamer):
            prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:  # generate() hands the prompt over first
                    self.prompt_seen = True
                    return
                for token in value.reshape(-1).tolist():
                    tokens.put(int(token))

            def end(self):
                tokens.put(None)

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool)

        with self._one_at_a_time:
            if cancelled.is_set():
                return
            try:
                with torch.inference_mode():
                    self._model.generate(
                        torch.tensor([prepared.ids]),
                        attention_mask=torch.ones(1, len(prepared.ids), dtype=torch.long),
                        max_new_tokens=prepared.max_new,
                        streamer=Streamer(),
                        stopping_criteria=StoppingCriteriaList([Cancelled()]),
                        pad_token_id=self._tokenizer.pad_token_id or next(iter(self._eos), None),
                        **prepared.sampling,
                    )
            except Exception as error:
                tokens.put(error)

    def close(self) -> None:
        self._model = None


class StopScanner:
    """Text that might be the start of a stop string is held back until it is known not to be
    one. (The ONNX model does the same inside its models-from-code file, which cannot import
    this module.)"""

    def __init__(self, stops: tuple[str, ...]):
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._text, self._emitted = "", 0

    def add(self, piece: str) -> tuple[str, bool]:
        """(text that may be sent now, whether a stop string ended the answer)."""
        self._text += piece
        found = [self._text.find(stop) for stop in self._stops if stop in self._text]
        if found:
            out = self._text[self._emitted : min(found)]
            self._emitted = len(self._text)
            return out, True
        safe = len(self._text) - self._hold
        if safe <= self._emitted:
            return "", False
        out, self._emitted = self._text[self._emitted : safe], safe
        return out, False

    def rest(self) -> str:
        out, self._emitted = self._text[self._emitted :], len(self._text)
        return out


def load_served(model_dir: Path) -> ServedModel:
    """Load a downloaded MLflow model of either runtime; refuse any other kind of model."""
    from mlflow.models import Model

    flavors = Model.load(str(model_dir)).flavors
    if "transformers" in flavors:
        import mlflow.transformers

        pipeline = mlflow.transformers.load_model(str(model_dir))
        defaults = flavors["python_function"].get("model_config") or {}
        return TransformersServed(pipeline, {"max_new_tokens": 256} | defaults)
    import mlflow.pyfunc

    chat_model = mlflow.pyfunc.load_model(str(model_dir)).unwrap_python_model()
    if not hasattr(chat_model, "prepare_chat"):
        raise PipelineError(
            f"{model_dir} is neither a transformers chat model nor this pipeline's ONNX chat "
            f"model (flavors: {', '.join(flavors)}); serve a wrap_transformers or wrap_onnx model"
        )
    return OnnxServed(chat_model)
