"""An onnxruntime-genai chat model for MLflow, logged as models-from-code.

MLflow stores this file with the model and runs it at load time (no pickled class), so it
imports nothing from this project: serving needs only onnxruntime-genai, mlflow and numpy.

Requests follow MLflow's `llm/v1/chat` schema, the one the transformers flavor serves:
`messages` plus optional `max_tokens`, `temperature` (0 means greedy, as OpenAI clients send it),
`top_p`, `stop` and `n`. Each answer has `id`, `object`, `created`, `model`, `choices` (with
`message` and `finish_reason` "stop" or "length") and `usage`. The legacy form
`{"prompt": "<already templated text>"}` returns the generated string. Every row of a batch is
answered; `predict_stream` yields OpenAI `chat.completion.chunk` dicts. Concurrent calls are safe:
they share the loaded model and each gets its own generator.

`model_config` (set by the wrap_onnx step): `model_name` (the `model` field of answers),
`provider` (cpu, cuda or dml), `generation` (defaults: max_new_tokens, do_sample, temperature,
top_p).
"""

from __future__ import annotations

import json
import math
import time
import uuid
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


@dataclass
class Completion:
    text: str
    finish_reason: str
    completion_tokens: int


class OnnxChatModel(PythonModel):
    def load_context(self, context) -> None:
        import onnxruntime_genai as og

        settings = context.model_config
        self._model_name = settings["model_name"]
        self._defaults = settings["generation"]
        provider = settings["provider"]
        folder = Path(context.artifacts["onnx_model"])
        config = og.Config(str(folder))
        config.clear_providers()
        if provider != "cpu":
            config.append_provider(provider)
        try:
            self._model = og.Model(config)
        except RuntimeError as error:
            raise MlflowException(
                f"cannot open the ONNX model on the {provider!r} execution provider: {error}. "
                f"It needs the {PROVIDER_PACKAGES[provider]} package and a matching device; "
                "log the model for another compute target to run it here"
            ) from None
        self._tokenizer = og.Tokenizer(self._model)
        genai_config = json.loads((folder / "genai_config.json").read_text())["model"]
        self._context_length = int(genai_config["context_length"])
        eos = genai_config.get("eos_token_id", [])
        self._eos = set(eos if isinstance(eos, list) else [eos])

    # -- pyfunc API ---------------------------------------------------------------------------

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        requests = _requests(model_input, params)
        if all("prompt" in request for request in requests):
            texts = [self._complete_prompt(request) for request in requests]
            return texts[0] if len(texts) == 1 else texts
        return [self._chat(request) for request in requests]

    def predict_stream(
        self, context, model_input: dict, params: dict | None = None
    ) -> Iterator[dict]:
        requests = _requests(model_input, params)
        if len(requests) != 1 or "messages" not in requests[0]:
            raise _bad_request("streaming takes exactly one chat request (with `messages`)")
        options = self._options(requests[0])
        if options.n != 1:
            raise _bad_request("streaming supports n=1 only")
        ids = self._chat_prompt_ids(requests[0]["messages"])
        max_new = self._fit_to_context(ids, options)
        header = self._header("chat.completion.chunk")
        first = True
        for piece, finish, count in self._generate(ids, options, max_new):
            delta = {"role": "assistant", "content": piece} if first else {"content": piece}
            first = False
            if piece:
                yield header | {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            if finish is not None:
                yield header | {
                    "choices": [{"index": 0, "delta": {}, "finish_reason": finish}],
                    "usage": _usage(len(ids), count),
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

    def _fit_to_context(self, ids: np.ndarray, options: Options) -> int:
        room = self._context_length - len(ids)
        if room <= 0:
            raise _bad_request(
                f"the prompt has {len(ids)} tokens; the model's context window is "
                f"{self._context_length}: shorten the conversation"
            )
        return min(options.max_new_tokens, room)

    def _chat(self, request: dict[str, Any]) -> dict[str, Any]:
        options = self._options(request)
        ids = self._chat_prompt_ids(request.get("messages"))
        max_new = self._fit_to_context(ids, options)
        completions = [self._complete(ids, options, max_new) for _ in range(options.n)]
        return self._header("chat.completion") | {
            "choices": [
                {
                    "index": index,
                    "message": {"role": "assistant", "content": completion.text},
                    "finish_reason": completion.finish_reason,
                }
                for index, completion in enumerate(completions)
            ],
            "usage": _usage(len(ids), sum(c.completion_tokens for c in completions)),
        }

    def _complete_prompt(self, request: dict[str, Any]) -> str:
        prompt = request["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise _bad_request("`prompt` must be a non-empty string")
        options = self._options(request)
        ids = self._tokenizer.encode(prompt)
        return self._complete(ids, options, self._fit_to_context(ids, options)).text

    def _header(self, kind: str) -> dict[str, Any]:
        return {
            "id": str(uuid.uuid4()),
            "object": kind,
            "created": int(time.time()),
            "model": self._model_name,
        }

    # -- generation ---------------------------------------------------------------------------

    def _complete(self, ids: np.ndarray, options: Options, max_new: int) -> Completion:
        text, finish, generated = [], "length", 0
        for piece, reason, so_far in self._generate(ids, options, max_new):
            text.append(piece)
            finish, generated = reason or finish, so_far
        return Completion("".join(text), finish, generated)

    def _generate(
        self, ids: np.ndarray, options: Options, max_new: int
    ) -> Iterator[tuple[str, str | None, int]]:
        """Yield (text piece, finish reason or None, tokens generated so far). Text that might
        be the start of a stop string is held back until it is known not to be one."""
        import onnxruntime_genai as og

        params = og.GeneratorParams(self._model)
        search: dict[str, Any] = {"max_length": len(ids) + max_new, "do_sample": options.do_sample}
        if options.do_sample:
            search |= {"temperature": options.temperature, "top_p": options.top_p}
        params.set_search_options(**search)
        generator = og.Generator(self._model, params)
        stream = self._tokenizer.create_stream()
        hold = max((len(s) for s in options.stop), default=1) - 1
        text, emitted, count = "", 0, 0
        try:
            generator.append_tokens(np.asarray(ids, dtype=np.int32))
            while not generator.is_done():
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
                count += 1
                if token in self._eos:
                    yield text[emitted:], "stop", count
                    return
                text += stream.decode(token)
                cut = _first_stop(text, options.stop)
                if cut is not None:
                    yield text[emitted:cut], "stop", count
                    return
                if len(text) - hold > emitted:
                    yield text[emitted : len(text) - hold], None, count
                    emitted = len(text) - hold
            yield text[emitted:], "length", count
        finally:
            del generator


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
