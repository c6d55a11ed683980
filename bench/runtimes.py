"""One timed greedy generation on each runtime, raw and wrapped.

A runtime is named by a `RuntimeSpec` (kind + location + threads), so the same runtime can be
opened in this process for timing or in a fresh one for its memory (bench/memory.py).

Raw runtimes take token ids: the prompt is templated and tokenized once, outside the timed
part, by the transformers tokenizer of the fetched snapshot, so every raw runtime reads the
very same ids (llama.cpp included: the GGUF carries the same vocabulary). `ignore_eos=True`
forces exactly `new_tokens` new tokens, for the prompt- and generation-length curves.

- transformers: `model.generate` with a streamer that timestamps each token, under
  `torch.inference_mode` (kind `transformers-no_grad`: under `torch.no_grad`, as a pipeline);
- onnxruntime-genai: an `og.Generator` loop, timed around its first token;
- llama.cpp (llama-cpp-python, the `bench` extra): `Llama.generate` on the bundled GGUF, with
  its KV cache reset before every run so no prompt prefix is reused between repetitions;
- the wrap_onnx pyfunc: `predict_stream`, timed on its first chunk;
- the wrap_transformers pyfunc: `predict`; MLflow's chat flavor cannot stream, so only its
  end-to-end rate is known. Pyfunc models take chat messages and stop at the end token.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

Messages = list[dict[str, str]]
KINDS = ("transformers", "transformers-no_grad", "onnx", "llama.cpp", "pyfunc", "pyfunc-stream")


@dataclass(frozen=True)
class Sample:
    prompt_tokens: int
    new_tokens: int
    total_s: float
    ttft_s: float | None  # None where the runtime cannot stream
    # When each new token was ready, in seconds from the start (raw runtimes only).
    token_s: tuple[float, ...] = ()

    def first(self, tokens: int) -> Sample:
        """The sample of a generation of only its first `tokens` tokens (greedy decoding
        makes the first tokens of a longer generation exactly a shorter one)."""
        if not self.token_s or tokens > len(self.token_s):
            raise ValueError(f"this sample has no timestamps for {tokens} tokens")
        stamps = self.token_s[:tokens]
        return Sample(self.prompt_tokens, tokens, stamps[-1], self.ttft_s, stamps)

    @property
    def prefill_tokens_per_s(self) -> float | None:
        return None if self.ttft_s is None else self.prompt_tokens / self.ttft_s

    @property
    def decode_tokens_per_s(self) -> float | None:
        if self.ttft_s is None or self.new_tokens < 2:
            return None
        return (self.new_tokens - 1) / (self.total_s - self.ttft_s)

    @property
    def end_to_end_tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s


@dataclass(frozen=True)
class RuntimeSpec:
    label: str
    kind: str  # one of KINDS
    location: str  # model folder, GGUF file or model URI
    threads: int | None = None  # None: every core this process may use

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown runtime kind {self.kind!r}; valid: {', '.join(KINDS)}")


def available_cores() -> int:
    """The default thread count of every raw runtime, as the wrap_onnx model counts it."""
    return len(os.sched_getaffinity(0))


def llama_cpp_wanted(asked: bool | None) -> bool:
    """--llama-cpp / --no-llama-cpp, or, when neither is given, whether the `bench` extra that
    installs llama-cpp-python is there."""
    if asked is not None:
        return asked
    installed = importlib.util.find_spec("llama_cpp") is not None
    if not installed:
        print("llama-cpp-python is not installed (pip install -e '.[bench]'): no llama.cpp row")
    return installed


def onnx_config(folder: Path, session_options: dict[str, object]):
    """An `og.Config` of an ONNX build on the CPU provider, with these decoder session options."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()
    config.overlay(json.dumps({"model": {"decoder": {"session_options": session_options}}}))
    return config


class RawRuntime(Protocol):
    def generate(self, ids: list[int], new_tokens: int, ignore_eos: bool = False) -> Sample: ...


Runner = Callable[[Messages, int], Sample]


def open_runner(spec: RuntimeSpec, chat_ids: Callable[[Messages], list[int]]) -> Runner:
    """A chat runner for the spec: raw runtimes get `chat_ids(messages)`, pyfunc models the
    messages themselves."""
    if spec.kind.startswith("pyfunc"):
        return pyfunc(spec.location, stream=spec.kind == "pyfunc-stream")
    runtime = open_raw(spec)
    return lambda messages, new_tokens: runtime.generate(chat_ids(messages), new_tokens)


def open_raw(spec: RuntimeSpec) -> RawRuntime:
    location = Path(spec.location)
    if spec.kind.startswith("transformers"):
        return Transformers(location, spec.threads, inference_mode=spec.kind == "transformers")
    if spec.kind == "onnx":
        return OnnxGenai(location, spec.threads)
    if spec.kind == "llama.cpp":
        return LlamaCpp(location, spec.threads)
    raise ValueError(f"{spec.label}: a {spec.kind} runtime takes chat messages, not ids")


def chat_template_ids(model_dir: Path) -> Callable[[Messages], list[int]]:
    """The prompt ids every raw runtime gets: the snapshot's own chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def ids(messages: Messages) -> list[int]:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )

    return ids


class Transformers:
    """`inference_mode=False` runs generate under `torch.no_grad` only, as transformers'
    pipelines (and so MLflow's transformers flavor) run it."""

    def __init__(self, model_dir: Path, threads: int | None, inference_mode: bool = True) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self._grad_mode = torch.inference_mode if inference_mode else torch.no_grad
        torch.set_num_threads(threads or available_cores())
        self._torch = torch
        self._model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def generate(self, ids: list[int], new_tokens: int, ignore_eos: bool = False) -> Sample:
        from transformers.generation.streamers import BaseStreamer

        torch = self._torch
        stamps: list[float] = []

        class Stamps(BaseStreamer):
            def put(self, value) -> None:  # the prompt first, then one call per new token
                stamps.append(time.perf_counter())

            def end(self) -> None:
                pass

        started = time.perf_counter()
        with self._grad_mode():
            output = self._model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens if ignore_eos else None,
                do_sample=False,
                streamer=Stamps(),
            )
        total = time.perf_counter() - started
        token_s = tuple(stamp - started for stamp in stamps[1:])
        return Sample(len(ids), output.shape[1] - len(ids), total, token_s[0], token_s)


class OnnxGenai:
    def __init__(self, model_dir: Path, threads: int | None) -> None:
        import onnxruntime_genai as og

        # Set always: onnxruntime's own default ran one thread on a 2-core VM.
        session = {"intra_op_num_threads": threads or available_cores()}
        self._og = og
        self._model = og.Model(onnx_config(model_dir, session))

    def generate(self, ids: list[int], new_tokens: int, ignore_eos: bool = False) -> Sample:
        og = self._og
        params = og.GeneratorParams(self._model)
        length = len(ids) + new_tokens
        params.set_search_options(
            max_length=length, min_length=length if ignore_eos else 0, do_sample=False
        )
        generator = og.Generator(self._model, params)
        started = time.perf_counter()
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        generator.generate_next_token()
        token_s = [time.perf_counter() - started]
        while not generator.is_done():
            generator.generate_next_token()
            token_s.append(time.perf_counter() - started)
        total = time.perf_counter() - started
        del generator
        return Sample(len(ids), len(token_s), total, token_s[0], tuple(token_s))


class LlamaCpp:
    CONTEXT = 2048  # room for the longest prompt-length point (1024) plus 256 new tokens

    def __init__(self, gguf: Path, threads: int | None) -> None:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise SystemExit(
                "llama.cpp is the benchmark's optional peer: pip install -e '.[bench]' "
                "(llama-cpp-python compiles for several minutes), or leave out --llama-cpp"
            ) from None
        threads = threads or available_cores()
        self._llm = Llama(
            model_path=str(gguf),
            n_ctx=self.CONTEXT,
            n_batch=self.CONTEXT,  # the whole prompt in one batch, as the other runtimes do
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )

    def generate(self, ids: list[int], new_tokens: int, ignore_eos: bool = False) -> Sample:
        llm = self._llm
        llm.reset()  # or generate() would reuse the KV cache of the previous run's prompt
        eos = llm.token_eos()
        token_s: list[float] = []
        started = time.perf_counter()
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            token_s.append(time.perf_counter() - started)
            if len(token_s) == new_tokens or (token == eos and not ignore_eos):
                break
        total = time.perf_counter() - started
        return Sample(len(ids), len(token_s), total, token_s[0], tuple(token_s))


def pyfunc(model_uri: str, stream: bool) -> Runner:
    """A logged chat model through `predict_stream` (timed to its first chunk) or `predict`."""
    import mlflow

    model = mlflow.pyfunc.load_model(model_uri)

    def run(messages: Messages, new_tokens: int) -> Sample:
        request = {"messages": messages, "max_tokens": new_tokens, "temperature": 0}
        started = time.perf_counter()
        first, usage = None, {}
        if stream:
            for chunk in model.predict_stream(request):
                first = first or time.perf_counter() - started
                usage = chunk.get("usage", usage)
        else:
            (answer,) = model.predict(request)
            usage = answer["usage"]
        total = time.perf_counter() - started
        return Sample(usage["prompt_tokens"], usage["completion_tokens"], total, first)

    return run
