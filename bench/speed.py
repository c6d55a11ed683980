"""Decode speed of every runtime, raw and wrapped, against the memory-bandwidth bound and
against llama.cpp, with each runtime's peak memory.

    python -m bench.speed [--model smollm2-135m] [--compute cpu] [--new-tokens 64]
        [--repetitions 5] [--variants fp32 int8 int4 int4:algo_config=k_quant_last]
        [--threads N] [--no-llama-cpp] [--no-memory] [--out bench/results]

Timed side by side in one process, interleaved repetition by repetition (runtime A, B, C, ...,
then A again, so slow drift of the machine hits all alike), after one untimed warm-up each:
raw transformers, the wrap_transformers pyfunc, raw onnxruntime-genai for every variant, the
wrap_onnx pyfunc, and llama.cpp on the bundled GGUF (if the `bench` extra is installed). Then
each runtime's peak memory, one fresh process each (bench/memory.py).

Results: --out/speed.json and --out/speed.md (also printed), and a run `bench-speed` in the
bench's tracking store (bench/models.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import asdict, dataclass

from bench.bandwidth import read_bandwidth
from bench.decode_bytes import (
    DecodeBytes,
    gguf_decode_bytes,
    onnx_decode_bytes,
    safetensors_decode_bytes,
)
from bench.memory import Memory, peak_memory
from bench.models import BenchModels, add_model_arguments, bench_models, onnx_build, variant_label
from bench.reporting import provenance, write_report
from bench.runtimes import (
    RuntimeSpec,
    Sample,
    chat_template_ids,
    llama_cpp_wanted,
    open_runner,
)

# A request that asks for a long answer, so that greedy decoding runs to --new-tokens.
MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
REFERENCE, PEER = "transformers", "llama.cpp"
NO_GRAD = "transformers no_grad"


@dataclass(frozen=True)
class Timed:
    spec: RuntimeSpec
    decode_bytes: DecodeBytes


@dataclass(frozen=True)
class Result:
    runtime: str
    kind: str
    decode_bytes: int  # what one decode step reads, mid-answer
    prompt_tokens: int
    new_tokens: int
    ttft_s: float | None
    prefill_tokens_per_s: float | None
    decode_tokens_per_s: float | None
    decode_spread: tuple[float, float] | None  # min, max over the repetitions
    end_to_end_tokens_per_s: float
    end_to_end_spread: tuple[float, float]
    total_s: float  # end-to-end latency of the whole request, median
    memory: Memory | None

    @property
    def wrapped(self) -> bool:
        return self.kind.startswith("pyfunc")

    @property
    def rate(self) -> float:
        """The rate ratios compare: decode where the runtime streams, else end-to-end."""
        return self.decode_tokens_per_s or self.end_to_end_tokens_per_s


def runtimes(
    models: BenchModels, variants: list[str], threads: int | None, llama_cpp: bool
) -> list[Timed]:
    """What to time, in table order, each with the bytes its decode step reads."""
    weights = safetensors_decode_bytes(models.snapshot_dir)
    snapshot = str(models.snapshot_dir)
    timed = [
        Timed(RuntimeSpec(REFERENCE, "transformers", snapshot, threads), weights),
        # The mode transformers' pipelines (and so the pyfunc) generate in: the wrapper's cost
        # apart from the grad mode is pyfunc over this row.
        Timed(RuntimeSpec(NO_GRAD, "transformers-no_grad", snapshot, threads), weights),
        Timed(RuntimeSpec(f"{REFERENCE} pyfunc", "pyfunc", models.transformers_uri), weights),
    ]
    for variant in dict.fromkeys([models.onnx_variant, *variants]):
        label = variant_label(variant)
        folder = onnx_build(models, variant)
        onnx_bytes = onnx_decode_bytes(folder)
        timed.append(Timed(RuntimeSpec(label, "onnx", str(folder), threads), onnx_bytes))
        if variant == models.onnx_variant:
            spec = RuntimeSpec(f"{label} pyfunc", "pyfunc-stream", models.onnx_uri)
            timed.append(Timed(spec, onnx_bytes))
    if llama_cpp:
        if models.gguf is None:
            raise SystemExit(
                f"model={models.cfg.model.name} has no bundled GGUF for llama.cpp: use "
                "--no-llama-cpp"
            )
        spec = RuntimeSpec(PEER, "llama.cpp", str(models.gguf), threads)
        timed.append(Timed(spec, gguf_decode_bytes(models.gguf)))
    return timed


def measure(
    timed: list[Timed], chat_ids, new_tokens: int, repetitions: int
) -> dict[str, list[Sample]]:
    runners = {t.spec.label: open_runner(t.spec, chat_ids) for t in timed}
    for name, run in runners.items():
        run(MESSAGES, new_tokens)  # warm-up
        print(f"warmed up {name}", flush=True)
    samples: dict[str, list[Sample]] = {name: [] for name in runners}
    for repetition in range(repetitions):
        for name, run in runners.items():
            samples[name].append(run(MESSAGES, new_tokens))
        print(f"repetition {repetition + 1}/{repetitions} done", flush=True)
    return samples


def summarize(timed: Timed, samples: list[Sample], memory: Memory | None) -> Result:
    first = samples[0]
    decode = [s.decode_tokens_per_s for s in samples if s.decode_tokens_per_s is not None]
    end_to_end = [s.end_to_end_tokens_per_s for s in samples]
    ttft = [s.ttft_s for s in samples if s.ttft_s is not None]
    prefill = [s.prefill_tokens_per_s for s in samples if s.prefill_tokens_per_s is not None]
    return Result(
        runtime=timed.spec.label,
        kind=timed.spec.kind,
        decode_bytes=timed.decode_bytes.at(first.prompt_tokens + first.new_tokens // 2),
        prompt_tokens=first.prompt_tokens,
        new_tokens=first.new_tokens,
        ttft_s=statistics.median(ttft) if ttft else None,
        prefill_tokens_per_s=statistics.median(prefill) if prefill else None,
        decode_tokens_per_s=statistics.median(decode) if decode else None,
        decode_spread=(min(decode), max(decode)) if decode else None,
        end_to_end_tokens_per_s=statistics.median(end_to_end),
        end_to_end_spread=(min(end_to_end), max(end_to_end)),
        total_s=statistics.median(s.total_s for s in samples),
        memory=memory,
    )


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(results: list[Result], bandwidth: float) -> str:
    by_name = {r.runtime: r for r in results}
    lines = [
        f"Read bandwidth {bandwidth / 1e9:.1f} GB/s. Bound = bandwidth / bytes one decode step "
        "reads (weights at their stored precision, one embedding row, the KV cache so far).",
        "",
        "| runtime | prompt | new | TTFT s | prefill tok/s | decode tok/s (min-max) | "
        f"total s | end-to-end tok/s | x {REFERENCE} | x {PEER} | MB read / step | bound tok/s | "
        "decode / bound | peak MB (model) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        bound = bandwidth / r.decode_bytes
        spread = "" if r.decode_spread is None else "({:.1f}-{:.1f})".format(*r.decode_spread)
        fraction = None if r.decode_tokens_per_s is None else r.decode_tokens_per_s / bound
        ratios = [
            _number(r.rate / by_name[other].rate, 2)
            if other in by_name and r.kind != "pyfunc"
            else ""
            for other in (REFERENCE, PEER)
        ]
        memory = "-" if r.memory is None else f"{r.memory.peak_mb:.0f} ({r.memory.model_mb:.0f})"
        lines.append(
            f"| {r.runtime} | {r.prompt_tokens} | {r.new_tokens} | {_number(r.ttft_s, 3)} | "
            f"{_number(r.prefill_tokens_per_s, 0)} | {_number(r.decode_tokens_per_s)} {spread} | "
            f"{r.total_s:.2f} | {r.end_to_end_tokens_per_s:.1f} | {ratios[0]} | {ratios[1]} | "
            f"{r.decode_bytes / 1e6:.1f} | {bound:.1f} | "
            f"{'-' if fraction is None else f'{fraction:.0%}'} | {memory} |"
        )
    lines += ["", *overhead_lines(results)]
    return "\n".join(lines)


def overhead_lines(results: list[Result]) -> list[str]:
    """Wrapped over raw, per runtime, on the rate both report."""
    by_name = {r.runtime: r for r in results}
    lines = []
    pairs = [(r, by_name[r.runtime.removesuffix(" pyfunc")]) for r in results if r.wrapped]
    if NO_GRAD in by_name:
        pairs.append((by_name[f"{REFERENCE} pyfunc"], by_name[NO_GRAD]))
        pairs.append((by_name[NO_GRAD], by_name[REFERENCE]))
    for wrapped, raw in pairs:
        if wrapped.decode_tokens_per_s and raw.decode_tokens_per_s:
            ratio, rate = wrapped.decode_tokens_per_s / raw.decode_tokens_per_s, "decode"
        else:
            ratio = wrapped.end_to_end_tokens_per_s / raw.end_to_end_tokens_per_s
            rate = "end-to-end"
        lines.append(f"- {wrapped.runtime} / {raw.runtime}: {ratio:.3f} of its {rate} tokens/s")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument(
        "--variants", nargs="+", default=["fp32", "int8", "int4"], help="ONNX builds to time"
    )
    parser.add_argument("--threads", type=int, help="intra-op threads for every raw runtime")
    parser.add_argument("--llama-cpp", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    args.llama_cpp = llama_cpp_wanted(args.llama_cpp)
    models = bench_models(args.model, args.compute, args.out)
    timed = runtimes(models, args.variants, args.threads, args.llama_cpp)
    chat_ids = chat_template_ids(models.snapshot_dir)
    bandwidth = read_bandwidth()
    samples = measure(timed, chat_ids, args.new_tokens, args.repetitions)
    env = os.environ | {"MLFLOW_TRACKING_URI": models.tracking_uri}
    ids = chat_ids(MESSAGES)
    memory = {
        t.spec.label: peak_memory(t.spec, ids, MESSAGES, args.new_tokens, env)
        if args.memory
        else None
        for t in timed
    }
    results = [summarize(t, samples[t.spec.label], memory[t.spec.label]) for t in timed]
    report = provenance(vars(args)) | {
        "read_bandwidth_bytes_per_s": bandwidth,
        "results": [asdict(r) for r in results],
    }
    metrics = {"read_bandwidth_gb_per_s": bandwidth / 1e9}
    for r in results:
        name = r.runtime.replace(" ", "_")
        for key in ("ttft_s", "decode_tokens_per_s", "end_to_end_tokens_per_s"):
            if getattr(r, key) is not None:
                metrics[f"{name}.{key}"] = getattr(r, key)
        if r.memory:
            metrics[f"{name}.peak_mb"] = r.memory.peak_mb
    write_report(
        "speed", report, markdown(results, bandwidth), args.out, models.tracking_uri, metrics
    )


if __name__ == "__main__":
    main()
