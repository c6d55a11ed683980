"""An onnxruntime-genai chat model for MLflow, logged as models-from-code.

MLflow stores this file with the model and runs it at load time (no pickled class). Beside it
ship, as `code_paths` that MLflow puts on `sys.path` first, the serving rules
(steps/serving/chat_protocol.py) and the generation engine (steps/serving/onnx_engine.py),
imported here by their top-level names; nothing else of this project, so serving needs only
onnxruntime-genai, mlflow and numpy. (Imported from the project's tree, to log the model or by
bench/, the file takes the same two modules from the `steps.serving` package.)

Requests follow MLflow's `llm/v1/chat` schema, the one the transformers flavor serves, checked
as chat_protocol checks every request: `messages` plus optional `max_tokens`, `temperature`,
`top_p`, `stop` and `n`. Each answer has `id`, `object`, `created`, `model`, `choices` (with
`message` and `finish_reason` "stop" or "length") and `usage`. The legacy form
`{"prompt": "<already templated text>"}` returns the generated string. Every row of a batch is
answered; `predict_stream` yields OpenAI `chat.completion.chunk` dicts. The OpenAI-compatible
server (steps/serve.py) checks requests with `chat_ids`/`prompt_ids` and `context_length` and
streams through `generate`.

`model_config` (set by the wrap_onnx step): `model_name` (the `model` field of answers),
`provider` (cpu, cuda or dml), `intra_op_threads` (null: every core this process may use,
counted at load time, since onnxruntime's own default can run fewer: bench/README.md),
`generation` (defaults: max_new_tokens, do_sample, temperature, top_p).
"""

from __future__ import annotations

import json
import math
import os
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

try:  # shipped beside this file (code_paths)
    import chat_protocol as protocol
    from onnx_engine import EngineLoop, Finished
except ModuleNotFoundError as missing:  # this file imported from the project's tree
    if missing.name not in ("chat_protocol", "onnx_engine"):
        raise
    from steps.serving import chat_protocol as protocol
    from steps.serving.onnx_engine import EngineLoop, Finished

PROVIDER_PACKAGES = {
    "cpu": "onnxruntime-genai",
    "cuda": "onnxruntime-genai-cuda",
    "dml": "onnxruntime-genai-directml",
}


def _available_cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the host's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class OnnxChatModel(PythonModel):
    # Its engine holds a turn to Options.grammar: the OpenAI server asks before it constrains
    # (a model logged before this ships an engine that would ignore the grammar).
    constrains_decoding = True

    def load_context(self, context) -> None:
        import onnxruntime_genai as og

        # onnxruntime-genai's usage telemetry is on by default and writes a session file into
        # the temp folder of every process that opens a model; a served model should neither
        # report on its users nor leave files behind. Set ORT_DISABLE_TELEMETRY=0 to allow it.
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        settings = context.model_config
        self._model_name = settings["model_name"]
        self.defaults = settings["generation"]
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
        self.context_length = int(genai_config["context_length"])
        self._engine = EngineLoop(self._model)
        # The loop's thread holds the og.Model; end it when this model object goes away.
        weakref.finalize(self, self._engine.close)

    def close(self) -> None:
        """End the engine's thread, which frees the model, once no request uses it."""
        self._engine.close()

    # -- pyfunc API ---------------------------------------------------------------------------

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        try:
            requests = _requests(model_input, params)
            # Every request is checked before any is started: a bad row wastes no generation.
            prompts_only = all("prompt" in request for request in requests)
            check = protocol.check_prompt if prompts_only else protocol.check_chat
            checked = [check(request, self.defaults, self) for request in requests]
        except protocol.RequestError as error:
            raise _bad_request(error) from None
        if prompts_only:
            started = [self.generate(one) for one in checked]
            texts = [protocol.collect(pieces).text for pieces in started]
            return texts[0] if len(texts) == 1 else texts
        choices = [[self.generate(one) for _ in range(one.options.n)] for one in checked]
        return [
            protocol.answer(
                protocol.header("chat.completion", self._model_name),
                [protocol.collect(pieces) for pieces in started],
                len(one.ids),
            )
            for one, started in zip(checked, choices, strict=True)
        ]

    def predict_stream(
        self, context, model_input: dict, params: dict | None = None
    ) -> Iterator[dict]:
        try:
            requests = _requests(model_input, params)
            if len(requests) != 1 or "messages" not in requests[0]:
                raise protocol.RequestError(
                    "streaming takes exactly one chat request (with `messages`)"
                )
            checked = protocol.check_chat(requests[0], self.defaults, self)
            if checked.options.n != 1:
                raise protocol.RequestError("streaming supports n=1 only")
        except protocol.RequestError as error:
            raise _bad_request(error) from None
        start = protocol.header("chat.completion.chunk", self._model_name)
        first = True
        for piece, finish, count in self.generate(checked):
            if piece:
                yield start | {"choices": [protocol.delta_choice(0, piece, None, first)]}
            first = False
            if finish is not None:
                yield start | {
                    "choices": [protocol.delta_choice(0, None, finish)],
                    "usage": protocol.usage(len(checked.ids), count),
                }

    # -- what chat_protocol's checks and the OpenAI-compatible server use -----------------------

    def chat_ids(self, messages: list[dict[str, str]]) -> np.ndarray:
        """The token ids of checked messages through the model's chat template."""
        prompt = self._tokenizer.apply_chat_template(
            messages=json.dumps(messages), add_generation_prompt=True
        )
        return self._tokenizer.encode(prompt)

    def prompt_ids(self, prompt: str) -> np.ndarray:
        return self._tokenizer.encode(prompt)

    def generate(self, checked: protocol.CheckedRequest) -> Iterator[protocol.Piece]:
        """Hand the prompt to the engine now; the returned iterator yields (text piece, finish
        reason or None, tokens generated so far). Closing it early cancels the generation."""
        turn = self._engine.submit(checked.ids, checked.options, checked.max_new)

        def next_event() -> int | str:
            item = turn.events.get()
            if not isinstance(item, Finished):
                return item
            if item.error:
                raise MlflowException(f"generation failed: {item.error}")
            return "stop" if item.eos else "length"

        return protocol.pieces(next_event, self._decoder(), checked.options.stop, turn.cancel)

    def _decoder(self) -> Callable[[int], str]:
        """Token ids to text through one tokenizer stream, so that partial UTF-8 is buffered."""
        stream = self._tokenizer.create_stream()
        strip_space = self._strips_leading_space

        def decode(token: int) -> str:
            nonlocal strip_space
            piece = stream.decode(token)
            if strip_space and piece:
                piece, strip_space = piece.removeprefix(" "), False
            return piece

        return decode


def _bad_request(error: protocol.RequestError) -> MlflowException:
    """The MLflow form of a refused request: a scoring server answers it with 400."""
    code = {"code": error.code} if error.code else {}
    return MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE, **code)


def _requests(model_input: Any, params: dict | None) -> list[dict[str, Any]]:
    """One dict per request, whatever shape the input came in (DataFrame from the signature,
    dict from predict_stream, list without a signature); absent columns dropped, arrays (a
    DataFrame's lists) as lists."""
    if isinstance(model_input, pd.DataFrame):
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):
        rows = [model_input]
    elif isinstance(model_input, str):
        rows = [{"prompt": model_input}]
    elif isinstance(model_input, list) and all(isinstance(row, dict) for row in model_input):
        rows = model_input
    else:
        raise protocol.RequestError(
            "send a chat request {'messages': [...]} or a legacy {'prompt': '...'}, "
            f"not {type(model_input).__name__}"
        )
    requests = []
    for row in rows:
        request = {
            key: value.tolist() if isinstance(value, np.ndarray) else value
            for key, value in row.items()
            if not _absent(value)
        }
        request |= {key: value for key, value in (params or {}).items() if key not in request}
        if ("messages" in request) == ("prompt" in request):
            raise protocol.RequestError(
                "each request needs either `messages` (chat) or `prompt` (legacy), not "
                + ("both" if "messages" in request else "neither")
            )
        requests.append(request)
    if not requests:
        raise protocol.RequestError(
            "each request needs either `messages` (chat) or `prompt` (legacy)"
        )
    return requests


def _absent(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, float) and math.isnan(value)


set_model(OnnxChatModel())
