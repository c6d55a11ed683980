"""One timed generation on each runtime, raw and wrapped, for the same chat messages.

Every runner takes chat messages and a number of new tokens, decodes greedily, and returns a
Sample. The raw runners apply the chat template outside the timed part (the ids equal the
pyfunc models' own, a test of the wrap steps checks that); the pyfunc models do everything
inside it, as a caller sees them. Runs stop at the end-of-sequence token like a user's request
does, so the harness uses prompts that ask for long answers and compares per-token rates.

- raw transformers: `model.generate` with a streamer that timestamps each token;
- raw onnxruntime-genai: an `og.Generator` loop, timed around its first token;
- the wrap_onnx pyfunc: `predict_stream`, timed on its first chunk;
- the wrap_transformers pyfunc: `predict`; MLflow's chat flavor cannot stream, so only its
  end-to-end rate is known.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Sample:
    prompt_tokens: int
    new_tokens: int
    total_s: float
    ttft_s: float | None  # None where the runtime cannot stream

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


Messages = list[dict[str, str]]
Runner = Callable[[Messages, int], Sample]


def raw_transformers(model_dir: Path, threads: int | None = None) -> Runner:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    if threads:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:  # the prompt first, then one call per new token
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def run(messages: Messages, new_tokens: int) -> Sample:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        stamps = Stamps()
        started = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=new_tokens,
                do_sample=False,
                streamer=stamps,
            )
        total = time.perf_counter() - started
        generated = output.shape[1] - len(ids)
        return Sample(len(ids), generated, total, stamps.times[1] - started)

    return run


def raw_onnx(model_dir: Path) -> Runner:
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    config.clear_providers()
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)

    def run(messages: Messages, new_tokens: int) -> Sample:
        prompt = tokenizer.apply_chat_template(
            messages=json.dumps(messages), add_generation_prompt=True
        )
        ids = tokenizer.encode(prompt)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
        generator = og.Generator(model, params)
        started = time.perf_counter()
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        generator.generate_next_token()
        first = time.perf_counter() - started
        generated = 1
        while not generator.is_done():
            generator.generate_next_token()
            generated += 1
        total = time.perf_counter() - started
        del generator
        return Sample(len(ids), generated, total, first)

    return run


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
