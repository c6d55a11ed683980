"""The serving rules, written once: what a model request may ask, the sampling defaults, the
context window, the stop-string hold-back, and the shapes of answers, chunks and `usage`.

Its users: the ONNX model file (steps/serving/onnx_chat_model.py, MLflow's `/invocations`),
both runtimes of the OpenAI-compatible server (steps/serving/served_models.py) and its routes
(steps/serving/openai_api.py). The standard library only, and nothing of this project: the file
ships inside every ONNX model (wrap_onnx logs it in `code_paths`, which MLflow puts on
`sys.path` before the model file runs), where it is imported as `chat_protocol`; the project
imports it as `steps.serving.chat_protocol`.

A model request is one dict: `messages` (chat: {role, content} objects, through the model's
chat template) or `prompt` (text as it is), and optional `max_tokens`, `temperature` (0:
greedy, as OpenAI clients send it; absent: the model's logged `generation` defaults), `top_p`,
`stop` (a string or a list) and `n`. A runtime generates a checked request as pieces: (text,
finish reason or None, tokens generated so far), the finish reason "stop" (the model's end
token or a stop string) or "length".
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

ROLES = ("system", "user", "assistant")
MAX_CHOICES = 8
MAX_STOPS = 4
# OpenAI request fields the models cannot honour. Each is accepted only with a value that asks
# for nothing (`asks_for_nothing`), so a client that sends the neutral default still works, and
# one that relies on the feature is told.
UNSUPPORTED = (
    "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "logprobs",
    "top_logprobs", "logit_bias", "frequency_penalty", "presence_penalty", "response_format",
    "seed", "modalities", "audio", "prediction", "reasoning_effort", "web_search_options",
    "echo", "suffix", "best_of",
)  # fmt: skip
# Fields OpenAI defines that change nothing here: accepted and not used.
IGNORED = ("user", "store", "metadata", "service_tier")
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # OpenAI's code for a prompt too long

Piece = tuple[str, str | None, int]  # (text, finish reason or None, tokens generated so far)


class RequestError(Exception):
    """A request the model cannot answer, in one sentence: `status` is the HTTP status to answer
    it with, `param` the field it concerns, `code` OpenAI's error code."""

    def __init__(
        self, message: str, status: int = 400, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


@dataclass(frozen=True)
class Options:
    """How one request generates: what it asked, else the model's `generation` defaults."""

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    n: int
    # A Lark grammar (llguidance's dialect) the answer is held to: set by the OpenAI server's
    # structured outputs and tools (steps/serving/structured.py), never by a model request.
    grammar: str | None = None


@dataclass(frozen=True)
class CheckedRequest:
    """A request that passed the checks: its prompt's token ids, its options, and how many
    tokens it may generate (`max_tokens`, cut to what the context window has left)."""

    ids: Sequence[int]
    options: Options
    max_new: int


class PromptBuilder(Protocol):
    """What a runtime lends the checks: its chat template and tokenizer, and its window."""

    context_length: int

    def chat_ids(self, messages: list[dict[str, str]]) -> Sequence[int]:
        """The token ids of checked messages through the model's chat template."""

    def prompt_ids(self, prompt: str) -> Sequence[int]:
        """The token ids of a plain prompt, as it is."""


# -- requests ---------------------------------------------------------------------------------


def check_request(
    request: dict[str, Any], defaults: dict[str, Any], builder: PromptBuilder
) -> CheckedRequest:
    """A chat request (with `messages`) or a plain-prompt one, checked and tokenized; raises
    RequestError naming the first problem."""
    if "messages" in request:
        return check_chat(request, defaults, builder)
    return check_prompt(request, defaults, builder)


def check_chat(
    request: dict[str, Any], defaults: dict[str, Any], builder: PromptBuilder
) -> CheckedRequest:
    """Check a chat request ({messages, max_tokens, ...}) and build its prompt ids."""
    options = check_options(request, defaults)
    ids = builder.chat_ids(check_messages(request.get("messages")))
    return fit_to_context(ids, options, builder.context_length, param="messages")


def check_prompt(
    request: dict[str, Any], defaults: dict[str, Any], builder: PromptBuilder
) -> CheckedRequest:
    """Check a plain-prompt request ({prompt, max_tokens, ...}) and encode it."""
    prompt = request.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("`prompt` must be a non-empty string")
    options = check_options(request, defaults)
    return fit_to_context(builder.prompt_ids(prompt), options, builder.context_length)


def check_messages(messages: Any) -> list[dict[str, str]]:
    """The conversation as the chat templates take it: {role, content} only, each checked."""
    if not isinstance(messages, list | tuple) or len(messages) == 0:
        raise RequestError("`messages` must be a non-empty list of {role, content} objects")
    clean = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{index}] must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RequestError(f"messages[{index}].role={role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise RequestError(f"messages[{index}].content must be a non-empty string")
        clean.append({"role": role, "content": content})
    return clean


def check_options(request: dict[str, Any], defaults: dict[str, Any]) -> Options:
    """The request's generation options, each checked, the missing ones from `defaults` (the
    model's `generation` config: max_new_tokens, do_sample, temperature, top_p)."""
    check_supported(request)
    if request.get("stream"):
        raise RequestError("set `stream` only through predict_stream / a streaming client")
    max_new = _positive_int(request, "max_tokens", defaults["max_new_tokens"])
    n = _positive_int(request, "n", 1)
    if n > MAX_CHOICES:
        raise RequestError(f"`n` must be at most {MAX_CHOICES}, got {n}")
    do_sample, temperature = sampling(request.get("temperature"), defaults)
    top_p = _number(request.get("top_p", defaults.get("top_p", 1.0)), "top_p")
    if not 0 < top_p <= 1:
        raise RequestError(f"`top_p` must be in (0, 1], got {top_p}")
    stop = request.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stop):
        raise RequestError("`stop` must be a string or a list of non-empty strings")
    return Options(max_new, do_sample, temperature, top_p, stop, n)


def sampling(temperature: Any, defaults: dict[str, Any]) -> tuple[bool, float]:
    """The temperature rule: (whether to sample, at which temperature). Absent, the model's
    defaults decide; 0 is greedy (what OpenAI clients send for it); above 0 samples."""
    if temperature is None:
        return bool(defaults.get("do_sample")), float(defaults.get("temperature", 1.0))
    temperature = _number(temperature, "temperature")
    if temperature < 0:
        raise RequestError(f"`temperature` must be >= 0, got {temperature}")
    return temperature > 0, temperature


def check_supported(request: dict[str, Any]) -> None:
    """Refuse the first field of UNSUPPORTED that asks for something."""
    for key in UNSUPPORTED:
        if key in request and not asks_for_nothing(key, request[key]):
            raise RequestError(
                f"`{key}` is not supported by this model; leave it out", param=key,
                code="unsupported_parameter",
            )  # fmt: skip


def asks_for_nothing(key: str, value: Any) -> bool:
    """Whether an UNSUPPORTED field holds its neutral value (null, false, 0, empty, "none")."""
    if value is None or value is False or value in ("", "none", "auto", [], {}, {"type": "text"}):
        return True
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and value == (1 if key == "best_of" else 0)


def fit_to_context(
    ids: Sequence[int], options: Options, context_length: int, param: str | None = None
) -> CheckedRequest:
    """The request with as many new tokens as the context window leaves room for; a prompt that
    fills the window is refused with 413 and OpenAI's `context_length_exceeded`."""
    room = context_length - len(ids)
    if room <= 0:
        raise RequestError(
            f"the prompt has {len(ids)} tokens; the model's context window is "
            f"{context_length}: shorten the conversation",
            status=413, param=param, code=CONTEXT_LENGTH_EXCEEDED,
        )  # fmt: skip
    return CheckedRequest(ids, options, min(options.max_new_tokens, room))


def _positive_int(request: dict[str, Any], key: str, default: int) -> int:
    value = request.get(key, default)
    if isinstance(value, bool) or not _number(value, key).is_integer() or int(value) <= 0:
        raise RequestError(f"`{key}` must be a positive integer, got {value!r}")
    return int(value)


def _number(value: Any, key: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise RequestError(f"`{key}` must be a number, got {value!r}") from None


# -- generation -------------------------------------------------------------------------------


class StopScanner:
    """Text that might be the start of a stop string is held back until it is known not to be
    one."""

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
        """The text held back so far (the answer has ended without a stop string)."""
        out, self._emitted = self._text[self._emitted :], len(self._text)
        return out


def pieces(
    next_event: Callable[[], int | str],
    decode: Callable[[int], str],
    stops: tuple[str, ...],
    stop_generating: Callable[[], None],
) -> Iterator[Piece]:
    """A runtime's tokens as pieces: `next_event()` gives each generated token id, then the
    finish reason ("stop" for the model's end token, which counts as generated, as the
    transformers flavor counts it; "length"), or raises if generation failed. `decode` turns a
    token into its text. A stop string ends the answer before it; whenever the reader stops
    before the end (a stop string, closing this iterator), `stop_generating()` is called."""
    scanner = StopScanner(stops)
    count, ended = 0, False
    try:
        while True:
            try:
                event = next_event()
            except Exception:
                ended = True  # the generation failed: nothing left to stop
                raise
            if isinstance(event, str):
                ended = True
                yield scanner.rest(), event, count + (event == "stop")
                return
            count += 1
            piece, stopped = scanner.add(decode(event))
            if stopped:
                yield piece, "stop", count
                return
            if piece:
                yield piece, None, count
    finally:
        if not ended:  # a stop string, or a reader that went away
            stop_generating()


@dataclass
class Completion:
    """One choice's answer, put together from its pieces."""

    text: str = ""
    finish_reason: str = "length"
    completion_tokens: int = 0

    def add(self, piece: Piece) -> None:
        text, finish, self.completion_tokens = piece
        self.text += text
        self.finish_reason = finish or self.finish_reason


def collect(generated: Iterable[Piece]) -> Completion:
    """The whole answer of one generation."""
    completion = Completion()
    for piece in generated:
        completion.add(piece)
    return completion


# -- answers ----------------------------------------------------------------------------------


def header(kind: str, model: str, answer_id: str | None = None, **extra: Any) -> dict[str, Any]:
    """The fields an answer or chunk starts with: `id` (a new one unless given), `object` (the
    kind: chat.completion, chat.completion.chunk, text_completion), `created`, `model`."""
    return {
        "id": answer_id or str(uuid.uuid4()),
        "object": kind,
        "created": int(time.time()),
        "model": model,
    } | extra


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def answer(
    start: dict[str, Any], completions: list[Completion], prompt_tokens: int, **choice_extra: Any
) -> dict[str, Any]:
    """A whole answer: `start` (a header) with one choice per completion and their usage. A
    text_completion's choices carry `text`, a chat.completion's an assistant `message`."""
    chat = start["object"] != "text_completion"
    choices = []
    for index, completion in enumerate(completions):
        said = (
            {"message": {"role": "assistant", "content": completion.text}}
            if chat
            else {"text": completion.text}
        )
        choices.append(
            {"index": index, **said, "finish_reason": completion.finish_reason} | choice_extra
        )
    total = sum(completion.completion_tokens for completion in completions)
    return start | {"choices": choices, "usage": usage(prompt_tokens, total)}


def delta_choice(
    index: int, text: str | None, finish: str | None, first: bool = False, **extra: Any
) -> dict[str, Any]:
    """A chat chunk's choice: the role on a choice's first chunk, then its text, and an empty
    `delta` on the chunk that carries the finish reason."""
    if first:
        delta = {"role": "assistant", "content": text or ""}
    else:
        delta = {"content": text} if text else {}
    return {"index": index, "delta": delta, "finish_reason": finish} | extra
