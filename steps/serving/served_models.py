"""A logged chat model of either runtime, loaded for the OpenAI-compatible server: one way to
check a request, and one way to generate that yields text as each token is decoded.

Both runtimes check a request dict with the same rules (steps/serving/chat_protocol.py), each
lending them its chat template, tokenizer and context window, so both refuse the same requests
in the same words. `generate` yields chat_protocol's pieces: (text, finish reason or None,
tokens generated so far); closing the iterator early stops the generation.

- onnx: the wrap_onnx model's tokenizer and `generate`, so concurrent requests share its one
  batching `og.Engine`.
- transformers: the flavor's pipeline cannot stream through pyfunc, so its model and tokenizer
  generate here, one request at a time (torch already spreads one generation over every core),
  with tokens decoded as they come. The prompt is built the way the flavor builds it (the chat
  template as text, tokenized without special tokens), so greedy answers equal the flavor's.

A request with a grammar (structured outputs, tools: steps/serving/structured.py) is held to it
by the ONNX engine itself and, for transformers, by llguidance's token mask in a logits
processor.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from steps.errors import PipelineError
from steps.serving.chat_protocol import CheckedRequest, Piece, RequestError, check_request, pieces
from steps.serving.structured import Plan

log = logging.getLogger(__name__)


class ServedModel(ABC):
    """A loaded model of either runtime: its prompts (chat_protocol's PromptBuilder), the
    checks, and generation."""

    runtime: str
    defaults: dict[str, Any]  # the logged `generation` defaults
    context_length: int

    def check(self, request: dict[str, Any]) -> CheckedRequest:
        """Check one model request and build its prompt ids; raises RequestError."""
        return check_request(request, self.defaults, self)

    def constrain(self, checked: CheckedRequest, plan: Plan) -> CheckedRequest:
        """The checked request with its answer held to the plan's grammar
        (steps/serving/structured.py); raises RequestError where this model cannot hold it."""
        options = dataclasses.replace(checked.options, grammar=plan.grammar)
        return dataclasses.replace(checked, options=options)

    @abstractmethod
    def chat_ids(self, messages: list[dict[str, str]]) -> Sequence[int]:
        """The token ids of checked messages through the model's chat template."""

    @abstractmethod
    def prompt_ids(self, prompt: str) -> Sequence[int]: ...

    @abstractmethod
    def generate(self, checked: CheckedRequest) -> Iterator[Piece]:
        """Start generating now; closing the iterator early stops the generation."""

    @abstractmethod
    def close(self) -> None:
        """Free the model (its engine, its weights) once no request uses it any more."""


class OnnxServed(ServedModel):
    runtime = "onnx"

    def __init__(self, chat_model):
        self._chat_model = chat_model
        self.defaults, self.context_length = chat_model.defaults, chat_model.context_length

    def chat_ids(self, messages: list[dict[str, str]]):
        return self._chat_model.chat_ids(messages)

    def prompt_ids(self, prompt: str):
        return self._chat_model.prompt_ids(prompt)

    def constrain(self, checked: CheckedRequest, plan: Plan) -> CheckedRequest:
        if not getattr(self._chat_model, "constrains_decoding", False):
            raise RequestError(
                f"this model version was logged before its engine could hold an answer to "
                f"`{plan.field}`; serve a version wrapped since (run wrap_onnx again)",
                param=plan.field,
            )
        return super().constrain(checked, plan)

    def generate(self, checked: CheckedRequest) -> Iterator[Piece]:
        return self._chat_model.generate(checked)

    def close(self) -> None:
        self._chat_model.close()


class TransformersServed(ServedModel):
    runtime = "transformers"

    def __init__(self, pipeline, defaults: dict[str, Any]):
        self._model, self._tokenizer = pipeline.model, pipeline.tokenizer
        self.defaults = defaults
        self.context_length = int(self._model.config.max_position_embeddings)
        eos = self._model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self._one_at_a_time = threading.Lock()
        self._grammar_tokenizer = None  # llguidance's view of the vocabulary, made once

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            text = self._tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as error:  # the template's own raise_exception()
            refused = f"the model's chat template refused these messages: {error}"
            raise RequestError(refused) from None
        return self.prompt_ids(text)

    def prompt_ids(self, prompt: str) -> list[int]:
        return self._tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def generate(self, checked: CheckedRequest) -> Iterator[Piece]:
        from tokenizers.decoders import DecodeStream

        tokens: queue.SimpleQueue[int | BaseException | None] = queue.SimpleQueue()
        cancelled = threading.Event()
        worker = threading.Thread(
            target=self._generate, args=(checked, tokens, cancelled), daemon=True
        )
        worker.start()
        decoder = DecodeStream(skip_special_tokens=True)
        backend = self._tokenizer.backend_tokenizer

        def next_event() -> int | str:
            item = tokens.get()
            if item is None:
                return "length"
            if isinstance(item, BaseException):
                raise RuntimeError(f"generation failed: {item}") from item
            return "stop" if item in self._eos else item

        def stop_generating() -> None:
            cancelled.set()
            worker.join()  # generate() stops at its next step

        yield from pieces(
            next_event,
            lambda token: decoder.step(backend, token) or "",
            checked.options.stop,
            stop_generating,
        )

    def _generate(self, checked: CheckedRequest, tokens, cancelled: threading.Event):
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

        options = checked.options
        sampling: dict[str, Any] = {"do_sample": options.do_sample}
        if options.do_sample:
            sampling |= {"temperature": options.temperature, "top_p": options.top_p}
        with self._one_at_a_time:
            if cancelled.is_set():
                return
            try:  # whatever fails reaches the reader, which would otherwise wait forever
                if options.grammar is not None:
                    sampling["logits_processor"] = [self._grammar_mask(options.grammar)]
                with torch.inference_mode():
                    self._model.generate(
                        torch.tensor([checked.ids]),
                        attention_mask=torch.ones(1, len(checked.ids), dtype=torch.long),
                        max_new_tokens=checked.max_new,
                        streamer=Streamer(),
                        stopping_criteria=StoppingCriteriaList([Cancelled()]),
                        pad_token_id=self._tokenizer.pad_token_id or next(iter(self._eos), None),
                        **sampling,
                    )
            except Exception as error:
                tokens.put(error)

    def _grammar_mask(self, grammar: str):
        """A logits processor that allows only the tokens `grammar` allows next (llguidance,
        the engine onnxruntime-genai embeds, so both runtimes hold an answer alike)."""
        import llguidance
        import llguidance.hf
        import llguidance.torch
        from transformers import LogitsProcessor

        vocabulary = int(self._model.config.vocab_size)
        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = llguidance.hf.from_tokenizer(
                self._tokenizer, n_vocab=vocabulary, eos_token=sorted(self._eos)
            )
        matcher = llguidance.LLMatcher(
            self._grammar_tokenizer, llguidance.grammar_from("lark", grammar)
        )
        mask = llguidance.torch.allocate_token_bitmask(1, vocabulary)

        class GrammarMask(LogitsProcessor):
            chose = False  # whether generate() has chosen a token since the prompt

            def __call__(self, input_ids, scores):
                if self.chose and not matcher.consume_token(int(input_ids[0, -1])):
                    raise RuntimeError(f"the grammar refused a token: {matcher.get_error()}")
                self.chose = True
                llguidance.torch.fill_next_token_bitmask(matcher, mask)
                llguidance.torch.apply_token_bitmask_inplace(scores, mask)
                return scores

        return GrammarMask()

    def close(self) -> None:
        self._model = None


def load_served(model_dir: Path) -> ServedModel:
    """Load a downloaded MLflow model of either runtime; refuse any other kind of model."""
    from mlflow.models import Model

    flavors = Model.load(str(model_dir)).flavors
    if "transformers" in flavors:
        import mlflow.transformers

        pipeline = mlflow.transformers.load_model(str(model_dir))
        defaults = flavors["python_function"].get("model_config") or {}
        return TransformersServed(pipeline, {"max_new_tokens": 256} | defaults)
    pyfunc = flavors.get("python_function", {})
    if "onnx_model" in pyfunc.get("artifacts", {}) and not (model_dir / "code").is_dir():
        # An older wrap_onnx built the serving rules into its model file and shipped no code
        # folder; its ONNX folder and settings are what today's model file reads, so it is
        # served with today's rules, like every model logged since.
        return OnnxServed(_onnx_chat_model(model_dir, pyfunc))
    import mlflow.pyfunc

    chat_model = mlflow.pyfunc.load_model(str(model_dir)).unwrap_python_model()
    if not hasattr(chat_model, "chat_ids"):
        raise PipelineError(
            f"{model_dir} is neither a transformers chat model nor this pipeline's ONNX chat "
            f"model (flavors: {', '.join(flavors)}); serve a wrap_transformers or wrap_onnx model"
        )
    return OnnxServed(chat_model)


def _onnx_chat_model(model_dir: Path, pyfunc: dict[str, Any]):
    """Today's ONNX chat model on a logged model's ONNX folder and settings."""
    from mlflow.pyfunc import PythonModelContext

    from steps.serving.onnx_chat_model import OnnxChatModel

    folder = model_dir / pyfunc["artifacts"]["onnx_model"]["path"]
    chat_model = OnnxChatModel()
    chat_model.load_context(
        PythonModelContext({"onnx_model": str(folder)}, pyfunc.get("config") or {})
    )
    return chat_model
