"""The OpenAI-compatible HTTP API over a served chat model (FastAPI): `POST /v1/chat/completions`
and `POST /v1/completions` (answers, or server-sent event streams ending in `data: [DONE]`),
`GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus: steps/serving/metrics.py).
With API keys (steps/serving/api_keys.py) every route but /health needs one, or answers 401.

A body is checked here against OpenAI's shapes, its structured outputs and tools by
steps/serving/structured.py (which also reads each answer back as content or a tool call), then
each model request it becomes against the serving rules (steps/serving/chat_protocol.py, which
the models apply too); each problem is answered in one sentence as OpenAI's error object
(`{"error": {"message", "type", "param", "code"}}`) with the right status: 400 for a bad request
(including a field the model cannot honour, such as `logprobs`, rather than ignoring it), 404
for an unknown model or route, 413 for a prompt longer than the context window, 503 before a
model is loaded and once the server is shutting down (`Api.drain`: streams in flight finish, new
requests go elsewhere), 500 (one line, no traceback) otherwise. Generation runs in one thread
per choice, which hands each decoded piece to the event loop at once; a client that goes away
stops its generation (freeing its slot in the ONNX engine) at the next token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from steps.serving import chat_protocol as protocol
from steps.serving import structured
from steps.serving.api_keys import ApiKeys
from steps.serving.chat_protocol import (
    IGNORED,
    MAX_CHOICES,
    MAX_STOPS,
    UNSUPPORTED,
    CheckedRequest,
    RequestError,
    check_supported,
)
from steps.serving.follow import Holder, Loaded
from steps.serving.metrics import CONTENT_TYPE, Asgi, Metrics
from steps.serving.structured import CallReader, Plan

log = logging.getLogger(__name__)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str


class ToolCall(Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCall], Field(min_length=1)] | None = None
    tool_call_id: str | None = None
    refusal: None = None  # what the client's own assistant message carries back

    @model_validator(mode="after")
    def _fields_of_its_role(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message carries tool_calls")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise ValueError("a tool message, and only a tool message, needs tool_call_id")
        if self.content is None and self.tool_calls is None:
            raise ValueError("content is required (an assistant message may give tool_calls)")
        return self

    def as_template_message(self) -> dict[str, Any]:
        """The {role, content} the chat templates take (OpenAI's `developer` is the system
        prompt of newer clients), with a call's or a result's fields for structured.conversation."""
        text = (
            self.content
            if isinstance(self.content, str) or self.content is None
            else "".join(part.text for part in self.content)
        )
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": text}  # fmt: skip
        if self.tool_calls is not None:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class StreamOptions(Strict):
    include_usage: bool = False


class OpenAIRequest(Strict):
    """What both routes' bodies share: the model and how to generate."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS or not all(stops):
            raise ValueError(f"give at most {MAX_STOPS} non-empty stop strings")
        return stops

    def plan(self) -> Plan:
        """What the request asks beyond text (structured outputs, tools): nothing here."""
        return Plan()

    def options(self, max_tokens: int | None) -> dict[str, Any]:
        """The generation fields of a model request (the ones the body sets)."""
        request = {"max_tokens": max_tokens, "temperature": self.temperature,
                   "top_p": self.top_p, "stop": self.stop}  # fmt: skip
        return {key: value for key, value in request.items() if value is not None}


class ChatRequest(OpenAIRequest):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    # Checked by steps/serving/structured.py, which names each problem's `param` itself.
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    # Accepted either way: an answer makes at most one call (steps/serving/structured.py).
    parallel_tool_calls: bool | None = None

    def plan(self) -> Plan:
        return structured.plan(self.model_dump(include=set(STRUCTURED), exclude_none=True))

    def requests(self, plan: Plan) -> list[dict[str, Any]]:
        """One model request per choice."""
        if None not in (self.max_tokens, self.max_completion_tokens) and (
            self.max_tokens != self.max_completion_tokens
        ):
            raise RequestError(
                "give `max_completion_tokens` or `max_tokens` (its older name), not both with "
                "different values",
                param="max_tokens",
            )
        limit = self.max_completion_tokens or self.max_tokens
        messages = structured.conversation(
            [message.as_template_message() for message in self.messages], plan.presented
        )
        return [{"messages": messages} | self.options(limit)] * self.n


class CompletionRequest(OpenAIRequest):
    prompt: str | Annotated[list[str], Field(min_length=1)]

    def requests(self, plan: Plan) -> list[dict[str, Any]]:
        """One model request per prompt and choice, each prompt's choices together."""
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        return [
            {"prompt": prompt} | self.options(self.max_tokens)
            for prompt in prompts
            for _ in range(self.n)
        ]


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None):
    """OpenAI's error object; `kind` is its `type`."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
               404: "not_found_error", 413: "invalid_request_error",
               503: "service_unavailable", 500: "server_error"}  # fmt: skip
# The request fields the server honours for the chat route though the models' own rules
# (chat_protocol.UNSUPPORTED, which /invocations keeps) do not: structured outputs and tools.
STRUCTURED = ("response_format", "tools", "tool_choice", "parallel_tool_calls")
# Every route, as the 404 names them and the metrics count them.
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
DRAINING = "the server is shutting down; send the request again (another replica takes it)"


def error_response(status: int, message: str, param=None, code=None) -> JSONResponse:
    """The error object with its status, its `type` the one OpenAI gives that status."""
    kind = ERROR_TYPES.get(status, "invalid_request_error")
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


def parse(kind: type[OpenAIRequest], body: Any) -> OpenAIRequest:
    """The request, or a RequestError naming the first thing wrong with it in one sentence."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    handled = [key for key in STRUCTURED if key in kind.model_fields]
    check_supported({key: value for key, value in body.items() if key not in handled})
    body = {
        key: value
        for key, value in body.items()
        if key in handled or key not in (*UNSUPPORTED, *IGNORED)
    }
    try:
        return kind.model_validate(body)
    except ValidationError as error:
        raise RequestError(*_first_problem(error)) from None


def _first_problem(error: ValidationError) -> tuple[str, int, str]:
    problem = error.errors(include_url=False)[0]
    param = "".join(
        f"[{part}]" if isinstance(part, int) else f".{part}"
        for part in problem["loc"]
        if not _union_branch(part)
    ).lstrip(".")
    if problem["type"] == "extra_forbidden":
        return f"`{param}` is not a field of this request", 400, param
    if problem["type"] == "missing":
        return f"`{param}` is required", 400, param
    message = problem["msg"].removeprefix("Value error, ")
    return f"`{param}`: {message[0].lower()}{message[1:]}, got {problem['input']!r}", 400, param


def _union_branch(part: str | int) -> bool:
    """pydantic names the branch of a union it tried (`str`, `list[TextPart]`) in the path."""
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool") or any(c in part for c in "[]()-")
    )


class Counter:
    """Generations running now (GET /health's `generating`): a generation counts until the
    model has stopped it, not merely until its client has gone."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def add(self, step: int) -> None:
        with self._lock:
            self.value += step


class Pumps:
    """One thread per choice moves the model's pieces onto the event loop's queue; when the
    reader goes away (`abandon`), each thread stops reading, which stops its generation."""

    DONE = object()

    def __init__(self, loaded: Loaded, checked: list[CheckedRequest], running: Counter):
        self._loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self._abandoned = threading.Event()
        self._running = running
        for index, request in enumerate(checked):
            pieces = loaded.model.generate(request)  # the ONNX engine takes the request now
            running.add(1)
            threading.Thread(target=self._pump, args=(index, pieces), daemon=True).start()

    def _pump(self, index: int, pieces: Iterator) -> None:
        try:
            for piece in pieces:
                if self._abandoned.is_set():
                    break
                self._loop.call_soon_threadsafe(self.queue.put_nowait, (index, piece))
            outcome: Any = self.DONE
        except Exception as error:
            outcome = error
        finally:
            pieces.close()  # stops the generation (the ONNX engine drops it at its next step)
            self._running.add(-1)
        self._loop.call_soon_threadsafe(self.queue.put_nowait, (index, outcome))

    def abandon(self) -> None:
        self._abandoned.set()


async def pieces_of(
    loaded: Loaded, checked: list[CheckedRequest], running: Counter
) -> AsyncIterator[tuple[int, tuple]]:
    """(choice index, (text, finish reason or None, tokens so far)) as they are decoded."""
    pumps = Pumps(loaded, checked, running)
    remaining = len(checked)
    try:
        while remaining:
            index, item = await pumps.queue.get()
            if item is Pumps.DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:  # answered, failed, or the client went away
        pumps.abandon()


class Api:
    """The routes over a Holder."""

    def __init__(self, holder: Holder):
        self.holder = holder
        self.generations = Counter()
        self.metrics = Metrics(ROUTES)
        self.draining = threading.Event()

    def drain(self) -> None:
        """Stop taking requests (/health and new requests answer 503); those in flight go on."""
        self.draining.set()

    async def pieces(
        self, loaded: Loaded, checked: list[CheckedRequest], arrived: float
    ) -> AsyncIterator[tuple[int, tuple]]:
        """pieces_of, measured: waiting until the first token, its time, the tokens made."""
        counts, waiting = [0] * len(checked), True
        self.metrics.waiting.inc()
        try:
            async for index, piece in pieces_of(loaded, checked, self.generations):
                if waiting:
                    waiting = False
                    self.metrics.waiting.dec()
                    self.metrics.first_token.observe(time.perf_counter() - arrived)
                counts[index] = piece[2]
                yield index, piece
        finally:
            if waiting:
                self.metrics.waiting.dec()
            self.metrics.tokens.inc(sum(counts))

    def check_model(self, loaded: Loaded, requested: str) -> None:
        """Refuse (404) a `model` other than the one served."""
        if requested != loaded.served.model_id:
            raise RequestError(
                f"model {requested!r} is not served here; this server serves "
                f"{loaded.served.model_id!r} (GET /v1/models)",
                status=404, param="model", code="model_not_found",
            )  # fmt: skip

    def fingerprint(self, loaded: Loaded) -> str:
        """`system_fingerprint`: `<model id>:<version>`, which version answered."""
        return f"{loaded.served.model_id}:{loaded.served.version or loaded.model.runtime}"

    async def respond(self, request: Request, kind: type[OpenAIRequest], chat: bool):
        """Answer one route's request: whole, or as a stream of server-sent events."""
        arrived = time.perf_counter()
        if self.draining.is_set():
            return error_response(503, DRAINING)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return error_response(400, f"the request body is not valid JSON: {error}")
        loaded = self.holder.lease()
        if loaded is None:
            return error_response(503, "the model is still loading; retry shortly (GET /health)")
        try:
            parsed = parse(kind, body)
            self.check_model(loaded, parsed.model)
            plan = parsed.plan()
            checked = [loaded.model.check(one) for one in parsed.requests(plan)]
            if plan.grammar is not None:
                checked = [loaded.model.constrain(one, plan) for one in checked]
        except RequestError as error:
            loaded.release()
            return error_response(error.status, str(error), error.param, error.code)
        except BaseException:  # answered as a 500 by the app's handler
            loaded.release()
            raise
        prompt_tokens = sum(len(one.ids) for one in checked[:: parsed.n])
        start = protocol.header(
            ("chat.completion.chunk" if parsed.stream else "chat.completion")
            if chat
            else "text_completion",
            loaded.served.model_id,
            f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            system_fingerprint=self.fingerprint(loaded),
        )
        if parsed.stream:
            include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
            release: list[Callable[[], Any]] = []
            events = self._events(
                loaded, checked, plan, start, chat, prompt_tokens, include_usage, release, arrived
            )
            # The lease ends when the stream does, or, for a stream that never started (its
            # client gone before the first byte), when the generator is collected: once.
            release.append(weakref.finalize(events, loaded.release))
            return StreamingResponse(
                events,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            return await self._whole(loaded, checked, plan, start, prompt_tokens, arrived)
        finally:
            loaded.release()

    async def _whole(self, loaded, checked, plan: Plan, start, prompt_tokens: int, arrived: float):
        completions = [protocol.Completion() for _ in checked]
        async for index, piece in self.pieces(loaded, checked, arrived):
            completions[index].add(piece)
        answer = protocol.answer(start, completions, prompt_tokens, logprobs=None)
        if plan.callable:  # the text of each choice read as content or a call
            for choice, completion in zip(answer["choices"], completions, strict=True):
                reader = CallReader(plan.callable)
                reader.feed(completion.text)
                _, choice["finish_reason"] = reader.finish(completion.finish_reason)
                choice["message"] = reader.message()
        return JSONResponse(answer)

    async def _events(
        self, loaded, checked, plan, start, chat, prompt_tokens, include_usage, release, arrived
    ):
        counts = [0] * len(checked)
        readers = [CallReader(plan.callable) for _ in checked] if plan.callable else None

        def event(choices: list[dict], **extra) -> str:
            chunk = start | {"choices": choices} | extra
            if include_usage and "usage" not in extra:
                chunk["usage"] = None
            return f"data: {json.dumps(chunk)}\n\n"

        def choice(index: int, text: str | None, finish: str | None, first: bool = False):
            if chat:
                return protocol.delta_choice(index, text, finish, first, logprobs=None)
            return {"index": index, "text": text or "", "finish_reason": finish,
                    "logprobs": None}  # fmt: skip

        try:
            if chat:  # OpenAI's first chunk of each choice names the role
                yield event([choice(i, "", None, first=True) for i in range(len(checked))])
            async for index, (piece, finish, count) in self.pieces(loaded, checked, arrived):
                counts[index] = count
                if readers is None:
                    if piece:
                        yield event([choice(index, piece, None)])
                else:  # content or a call's pieces, as the reader makes them out
                    deltas = readers[index].feed(piece)
                    if finish is not None:
                        held, finish = readers[index].finish(finish)
                        deltas += held
                    for delta in deltas:
                        yield event([{"index": index, "delta": delta, "finish_reason": None,
                                      "logprobs": None}])  # fmt: skip
                if finish is not None:
                    yield event([choice(index, None, finish)])
            if include_usage:
                yield event([], usage=protocol.usage(prompt_tokens, sum(counts)))
            yield "data: [DONE]\n\n"
        except Exception as error:  # the status line is sent: say it in the stream
            log.exception("generation failed")
            message = f"generation failed: {str(error).splitlines()[0]}"
            yield f"data: {json.dumps(error_body(message, 'server_error'))}\n\n"
        finally:
            release[0]()


def require_api_key(app: Asgi, keys: ApiKeys) -> Asgi:
    """ASGI middleware: a request without a valid key (ApiKeys.problem) is answered 401."""

    async def checked(scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            authorization = headers.get(b"authorization", b"").decode("latin-1")
            if problem := keys.problem(scope["path"], authorization):
                response = error_response(401, problem, code="invalid_api_key")
                response.headers["WWW-Authenticate"] = "Bearer"
                return await response(scope, receive, send)
        return await app(scope, receive, send)

    return checked


def create_app(holder: Holder, keys: ApiKeys | None = None) -> tuple[FastAPI, Api]:
    """The server's FastAPI app: the OpenAI routes, /health and /metrics over the version
    `holder` serves, every error as OpenAI's error object (404 for an unknown route, 500 in one
    line), every route but /health behind `keys` where there are any; and its Api (to drain)."""
    app = FastAPI(title="llm-to-mlflow OpenAI-compatible server", docs_url=None, redoc_url=None)
    api = Api(holder)
    if keys is not None and keys.required:
        app.add_middleware(require_api_key, keys=keys)
    # Outermost: 401s are counted too.
    app.add_middleware(api.metrics.middleware)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        if error.status_code == 404:
            answered = f"{', '.join(ROUTES[:-1])} and {ROUTES[-1]}"
            return error_response(404, f"no route {request.method} {request.url.path}; this "
                                  f"server answers {answered}")  # fmt: skip
        if error.status_code == 405:
            return error_response(400, f"{request.method} is not allowed on {request.url.path}")
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        log.exception("request failed")
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        return error_response(500, f"the server failed to answer: {first_line}")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await api.respond(request, ChatRequest, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await api.respond(request, CompletionRequest, chat=False)

    @app.get("/v1/models")
    async def models():
        loaded = holder.current
        if loaded is None:
            return error_response(503, "the model is still loading; retry shortly")
        served = loaded.served
        entry = {
            "id": served.model_id,
            "object": "model",
            "created": int(loaded.loaded_at),
            "owned_by": "llm-to-mlflow",
            "runtime": loaded.model.runtime,
            "model_uri": served.uri,
            "registered_name": served.registered_name,
            "alias": served.alias,
            "version": served.version,
        }
        return {"object": "list", "data": [entry]}

    @app.get("/metrics")
    async def metrics():
        if (loaded := holder.current) is not None:
            served = loaded.served
            api.metrics.serving(served.model_id, served.version, loaded.model.runtime)
        return Response(api.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/health")
    async def health():
        loaded = holder.current
        if api.draining.is_set():
            return error_response(503, DRAINING)
        if loaded is None:
            return error_response(503, "the model is still loading")
        return {"status": "ok", "model": loaded.served.model_id,
                "version": loaded.served.version, "generating": api.generations.value}  # fmt: skip

    return app, api
