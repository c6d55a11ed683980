"""An onnxruntime-genai chat model for MLflow, logged as models-from-code.

MLflow stores this file with the model and runs it at load time (no pickled class), so it
imports nothing from this project: serving needs only onnxruntime-genai, mlflow and numpy.

Requests follow MLflow's `llm/v1/chat` schema, the one the transformers flavor serves:
`messages` plus optional `max_tokens`, `temperature` (0 means greedy, as OpenAI clients send it),
`top_p`, `stop` and `n`. Each answer has `id`, `object`, `created`, `model`, `choices` (with
`message` and `finish_reason` "stop" or "length") and `usage`. The legacy form
`{"prompt": "<already templated text>"}` returns the generated string. Every row of a batch is
answered; `predict_stream` yields OpenAI `chat.completion.chunk` dicts. An in-process server
(steps/serve.py) uses `prepare_chat`/`prepare_prompt` and `generate` directly, to stream any
request form.

Generation goes through one `og.Engine`, which batches the requests that are in flight at the
same time: concurrent calls (a threaded model server), the rows of a batch and the `n` choices
of a request decode together, with the same greedy tokens as one request at a time (what that
buys under concurrent clients: bench/README.md, bench/concurrent_generation.py).

`model_config` (set by the wrap_onnx step): `model_name` (the `model` field of answers),
`provider` (cpu, cuda or dml), `intra_op_threads` (null: every core this process may use,
counted at load time, since onnxruntime's own default can run fewer: bench/README.md),
`generation` (defaults: max_new_tokens, do_sample, temperature, top_p).
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

PROVIDER_PACKAGES = {
    "cpu": "onnxruntime-genai",
    "cuda": "onnxruntime-genai-cuda",
    "dml": "onnxruntime-genai-directml",
}
ROLES = ("system", "user", "assistant")
MAX_CHOICES = 8
UNSUPPORTED = ("tools", "frequency_penalty", "presence_penalty")


def _available_cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the host's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


@dataclass(frozen=True)
class Options:
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    n: int


@dataclass(frozen=True)
class Prepared:
    """A checked request: its prompt ids, options, and how many tokens it may generate."""

    ids: np.ndarray
    options: Options
    max_new: int


@dataclass
class Completion:
    text: str
    finish_reason: str
    completion_tokens: int


class OnnxChatModel(PythonModel):
    def load_context(self, context) -> None:
        import onnxruntime_genai as og

        # onnxruntime-genai's usage telemetry is on by default and writes a session file into
        # the temp folder of every process that opens a model; a served model should neither
        # report on its users nor leave files behind. Set ORT_DISABLE_TELEMETRY=0 to allow it.
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        settings = context.model_config
        self._model_name = settings["model_name"]
        self._defaults = settings["generation"]
        provider = settings["provider"]
        folder = Path(context.artifacts["onnx_model"])
        config = og.Config(str(folder))
        config.clear_providers()
        if provider != "cpu":
            config.append_provider(provider)
        threads = settings.get("intra_op_threads") or _available_cores()
        session = {"intra_op_num_threads": threads}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
        try:
            self._model = og.Model(config)
        except RuntimeError as error:
            raise MlflowException(
                f"cannot open the ONNX model on the {provider!r} execution provider: {error}. "
                f"It needs the {PROVIDER_PACKAGES[provider]} package and a matching device; "
                "log the model for another compute target to run it here"
            ) from None
        self._tokenizer = og.Tokenizer(self._model)
        # SentencePiece tokenizers (Llama's, Phi-3's) mark a word's space in front of it, so
        # an answer's first token decodes with a space that transformers' decoder strips.
        # Stripped here too, so both runtimes give the same content.
        probe = self._tokenizer.decode(self._tokenizer.encode("a"))
        self._strips_leading_space = probe == " a"
        genai_config = json.loads((folder / "genai_config.json").read_text())["model"]
        self._context_length = int(genai_config["context_length"])
        self._engine = EngineLoop(self._model)
        # The loop's thread holds the og.Model; end it when this model object goes away.
        weakref.finalize(self, self._engine.close)

    def close(self) -> None:
        """End the engine's thread, which frees the model, once no request uses it."""
        self._engine.close()

    # -- pyfunc API ---------------------------------------------------------------------------

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        requests = _requests(model_input, params)
        # Every request is checked before any is started, so a bad row wastes no generation.
        if all("prompt" in request for request in requests):
            prepared = [self.prepare_prompt(request) for request in requests]
            started = [self.generate(turn) for turn in prepared]
            texts = [_collect(tokens).text for tokens in started]
            return texts[0] if len(texts) == 1 else texts
        prepared = [self.prepare_chat(request) for request in requests]
        started = [[self.generate(turn) for _ in range(turn.options.n)] for turn in prepared]
        return [
            self._chat_answer(len(turn.ids), [_collect(tokens) for tokens in choices])
            for turn, choices in zip(prepared, started, strict=True)
        ]

    def predict_stream(
        self, context, model_input: dict, params: dict | None = None
    ) -> Iterator[dict]:
        requests = _requests(model_input, params)
        if len(requests) != 1 or "messages" not in requests[0]:
            raise _bad_request("streaming takes exactly one chat request (with `messages`)")
        turn = self.prepare_chat(requests[0])
        if turn.options.n != 1:
            raise _bad_request("streaming supports n=1 only")
        header = self._header("chat.completion.chunk")
        first = True
        for piece, finish, count in self.generate(turn):
            delta = {"role": "assistant", "content": piece} if first else {"content": piece}
            first = False
            if piece:
                yield header | {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            if finish is not None:
                yield header | {
                    "choices": [{"index": 0, "delta": {}, "finish_reason": finish}],
                    "usage": _usage(len(turn.ids), count),
                }

    # -- requests -----------------------------------------------------------------------------

    def _options(self, request: dict[str, Any]) -> Options:
        for key in UNSUPPORTED:
            if request.get(key):
                raise _bad_request(f"`{key}` is not supported by this model")
        if request.get("stream"):
            raise _bad_request("set `stream` only through predict_stream / a streaming client")
        defaults = self._defaults
        max_new = _positive_int(request, "max_tokens", defaults["max_new_tokens"])
        n = _positive_int(request, "n", 1)
        if n > MAX_CHOICES:
            raise _bad_request(f"`n` must be at most {MAX_CHOICES}, got {n}")
        temperature = request.get("temperature")
        if temperature is None:
            do_sample = bool(defaults["do_sample"])
            temperature = float(defaults.get("temperature", 1.0))
        else:
            temperature = _number(temperature, "temperature")
            if temperature < 0:
                raise _bad_request(f"`temperature` must be >= 0, got {temperature}")
            do_sample = temperature > 0
        top_p = _number(request.get("top_p", defaults.get("top_p", 1.0)), "top_p")
        if not 0 < top_p <= 1:
            raise _bad_request(f"`top_p` must be in (0, 1], got {top_p}")
        stop = request.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise _bad_request("`stop` must be a string or a list of non-empty strings")
        return Options(max_new, do_sample, temperature, top_p, stop, n)

    def _chat_prompt_ids(self, messages: Any) -> np.ndarray:
        if not isinstance(messages, list | tuple | np.ndarray) or len(messages) == 0:
            raise _bad_request("`messages` must be a non-empty list of {role, content} objects")
        clean = []
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                raise _bad_request(f"messages[{index}] must be an object with role and content")
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise _bad_request(
                    f"messages[{index}].role={role!r} is not one of {', '.join(ROLES)}"
                )
            if not isinstance(content, str) or not content.strip():
                raise _bad_request(f"messages[{index}].content must be a non-empty string")
            clean.append({"role": role, "content": content})
        prompt = self._tokenizer.apply_chat_template(
            messages=json.dumps(clean), add_generation_prompt=True
        )
        return self._tokenizer.encode(prompt)

    def _fit_to_context(self, ids: np.ndarray, options: Options) -> Prepared:
        room = self._context_length - len(ids)
        if room <= 0:
            # OpenAI's code for this case, so that a server can answer it with its own status.
            raise MlflowException(
                f"the prompt has {len(ids)} tokens; the model's context window is "
                f"{self._context_length}: shorten the conversation",
                error_code=INVALID_PARAMETER_VALUE,
                code="context_length_exceeded",
            )
        return Prepared(ids, options, min(options.max_new_tokens, room))

    def prepare_chat(self, request: dict[str, Any]) -> Prepared:
        """Check a chat request ({messages, max_tokens, ...}) and build its prompt ids."""
        options = self._options(request)
        return self._fit_to_context(self._chat_prompt_ids(request.get("messages")), options)

    def prepare_prompt(self, request: dict[str, Any]) -> Prepared:
        """Check a plain-prompt request ({prompt, max_tokens, ...}) and encode it."""
        prompt = request["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise _bad_request("`prompt` must be a non-empty string")
        options = self._options(request)
        return self._fit_to_context(self._tokenizer.encode(prompt), options)

    def _chat_answer(self, prompt_tokens: int, completions: list[Completion]) -> dict[str, Any]:
        return self._header("chat.completion") | {
            "choices": [
                {
                    "index": index,
                    "message": {"role": "assistant", "content": completion.text},
                    "finish_reason": completion.finish_reason,
                }
                for index, completion in enumerate(completions)
            ],
            "usage": _usage(prompt_tokens, sum(c.completion_tokens for c in completions)),
        }

    def _header(self, kind: str) -> dict[str, Any]:
        return {
            "id": str(uuid.uuid4()),
            "object": kind,
            "created": int(time.time()),
            "model": self._model_name,
        }

    # -- generation ---------------------------------------------------------------------------

    def generate(self, turn: Prepared) -> Iterator[tuple[str, str | None, int]]:
        """Hand the prompt to the engine now; the returned iterator yields (text piece, finish
        reason or None, tokens generated so far). Closing it early cancels the generation."""
        return self._read(self._engine.submit(turn.ids, turn.options, turn.max_new), turn.options)

    def _read(self, turn: Turn, options: Options) -> Iterator[tuple[str, str | None, int]]:
        """Yield (text piece, finish reason or None, tokens generated so far). Text that might
        be the start of a stop string is held back until it is known not to be one."""
        stream = self._tokenizer.create_stream()
        hold = max((len(s) for s in options.stop), default=1) - 1
        text, emitted, count = "", 0, 0
        finished, strip_space = False, self._strips_leading_space
        try:
            while True:
                item = turn.events.get()
                if isinstance(item, Finished):
                    finished = True
                    if item.error:
                        raise MlflowException(f"generation failed: {item.error}")
                    # Counted like the transformers flavor counts: the end-of-sequence token too.
                    count += item.eos
                    yield text[emitted:], "stop" if item.eos else "length", count
                    return
                count += 1
                piece = stream.decode(item)
                if strip_space and piece:
                    piece, strip_space = piece.removeprefix(" "), False
                text += piece
                cut = _first_stop(text, options.stop)
                if cut is not None:
                    yield text[emitted:cut], "stop", count
                    return
                if len(text) - hold > emitted:
                    yield text[emitted : len(text) - hold], None, count
                    emitted = len(text) - hold
        finally:
            if not finished:  # a stop string, or a caller that stopped reading
                turn.cancel()


@dataclass(frozen=True)
class Finished:
    eos: bool
    error: str | None = None


class Turn:
    """One request's place in the engine: its prompt and options, and the queue its tokens
    (ints), then one Finished, arrive on."""

    def __init__(self, loop: EngineLoop, ids: np.ndarray, options: Options, max_new: int):
        self.ids, self.options, self.max_new = ids, options, max_new
        self.events: queue.SimpleQueue[int | Finished] = queue.SimpleQueue()
        self._loop = loop

    def cancel(self) -> None:
        self._loop.inbox.put(("cancel", self))


class EngineLoop:
    """An og.Engine driven by its own thread, since Engine calls must come from the thread that
    owns it. Callers on any thread submit turns; the loop starts them between engine steps, so
    requests that arrive while others decode join the next batch."""

    def __init__(self, model):
        self._model = model
        self.inbox: queue.SimpleQueue[tuple[str, Turn | None]] = queue.SimpleQueue()
        self._broken: str | None = None
        threading.Thread(target=self._serve, name="og-engine", daemon=True).start()

    def submit(self, ids: np.ndarray, options: Options, max_new: int) -> Turn:
        if self._broken:
            raise MlflowException(f"the generation engine stopped: {self._broken}")
        turn = Turn(self, ids, options, max_new)
        self.inbox.put(("begin", turn))
        return turn

    def close(self) -> None:
        self.inbox.put(("close", None))

    def _serve(self) -> None:
        active: dict[Any, Turn] = {}  # og.Request -> turn
        try:
            self._loop(active)
        except BaseException as error:  # no caller may wait forever on a dead loop
            self._broken = f"{type(error).__name__}: {error}"
            waiting = [turn for kind, turn in self._arrivals(block=False) if kind == "begin"]
            for turn in [*active.values(), *waiting]:
                turn.events.put(Finished(eos=False, error=self._broken))
            raise

    def _loop(self, active: dict[Any, Turn]) -> None:
        import onnxruntime_genai as og

        engine = og.Engine(self._model)
        buffer = engine.create_event_buffer(256)
        started: dict[Turn, tuple[Any, int]] = {}  # turn -> (og.Request, turn id)
        done = og.EngineEventFlags.TURN_FINISHED | og.EngineEventFlags.FAILED
        while True:
            for kind, turn in self._arrivals(block=not active):
                if kind == "close":
                    return
                if kind == "begin":
                    try:
                        request, turn_id = self._begin(engine, turn)
                    except RuntimeError as error:
                        turn.events.put(Finished(eos=False, error=str(error)))
                        continue
                    active[request] = turn
                    started[turn] = request, turn_id
                elif turn in started:
                    request, turn_id = started[turn]
                    request.cancel_turn(turn_id)
            if not active:
                continue
            try:
                events = engine.run(buffer)
            except RuntimeError as error:
                for turn in active.values():
                    turn.events.put(Finished(eos=False, error=str(error)))
                active.clear()
                started.clear()
                continue
            for event in events:
                turn = active[event.request]
                if event.flags & og.EngineEventFlags.TOKEN:
                    turn.events.put(int(event.token))
                if event.flags & done:
                    failed = event.flags & og.EngineEventFlags.FAILED
                    turn.events.put(
                        Finished(
                            eos=event.finish_reason == og.FinishReason.EOS,
                            error=f"engine error {event.error_code.name}" if failed else None,
                        )
                    )
                    del active[event.request], started[turn]
                    event.request.close()

    def _arrivals(self, block: bool) -> list[tuple[str, Turn | None]]:
        """Everything queued so far; when `block`, wait for at least one item first."""
        arrived = []
        try:
            arrived.append(self.inbox.get(block=block))
            while True:
                arrived.append(self.inbox.get_nowait())
        except queue.Empty:
            return arrived

    @staticmethod
    def _begin(engine, turn: Turn) -> tuple[Any, int]:
        import onnxruntime_genai as og

        # Size the request's cache for this prompt and answer, not the model's whole window.
        request_options = og.RequestOptions()
        request_options.set_max_session_tokens(len(turn.ids) + turn.max_new)
        request = engine.create_request(options=request_options)
        turn_options = og.TurnOptions(request)
        turn_options.set_max_generated_tokens(turn.max_new)
        turn_options.set_do_sample(turn.options.do_sample)
        if turn.options.do_sample:
            turn_options.set_temperature(turn.options.temperature)
            turn_options.set_top_p(turn.options.top_p)
        return request, request.begin_turn(np.asarray(turn.ids, dtype=np.int32), turn_options)


def _collect(tokens: Iterator[tuple[str, str | None, int]]) -> Completion:
    text, finish, generated = [], "length", 0
    for piece, reason, so_far in tokens:
        text.append(piece)
        finish, generated = reason or finish, so_far
    return Completion("".join(text), finish, generated)


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [text.find(stop) for stop in stops if stop in text]
    return min(found) if found else None


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _requests(model_input: Any, params: dict | None) -> list[dict[str, Any]]:
    """One dict per request, whatever shape the input came in (DataFrame from the signature,
    dict from predict_stream, list without a signature); absent columns dropped."""
    if isinstance(model_input, pd.DataFrame):
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):
        rows = [model_input]
    elif isinstance(model_input, str):
        rows = [{"prompt": model_input}]
    elif isinstance(model_input, list) and all(isinstance(row, dict) for row in model_input):
        rows = model_input
    else:
        raise _bad_request(
            "send a chat request {'messages': [...]} or a legacy {'prompt': '...'}, "
            f"not {type(model_input).__name__}"
        )
    requests = []
    for row in rows:
        request = {key: value for key, value in row.items() if not _absent(value)}
        request |= {key: value for key, value in (params or {}).items() if key not in request}
        if ("messages" in request) == ("prompt" in request):
            raise _bad_request(
                "each request needs either `messages` (chat) or `prompt` (legacy), not "
                + ("both" if "messages" in request else "neither")
            )
        requests.append(request)
    if not requests:
        raise _bad_request("each request needs either `messages` (chat) or `prompt` (legacy)")
    return requests


def _absent(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, float) and math.isnan(value)


def _positive_int(request: dict[str, Any], key: str, default: int) -> int:
    value = request.get(key, default)
    if isinstance(value, bool) or not _number(value, key).is_integer() or int(value) <= 0:
        raise _bad_request(f"`{key}` must be a positive integer, got {value!r}")
    return int(value)


def _number(value: Any, key: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _bad_request(f"`{key}` must be a number, got {value!r}") from None


set_model(OnnxChatModel())
