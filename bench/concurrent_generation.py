"""How fast one onnxruntime-genai model answers concurrent chat clients, three ways.

`--clients` client threads share a queue of `--requests` chat questions (greedy decoding, at most
`--max-new-tokens` new tokens each). Each client sends its next question as soon as its previous
answer arrives, so up to `--clients` requests are in flight at once. The server side is one of:

* serial: one `og.Generator` per request, one request at a time (one worker thread, FIFO);
* threaded: one `og.Generator` per request, all clients at once on one shared `og.Model`
  (what the pyfunc model did before it used the engine);
* engine: the pyfunc model's own `EngineLoop` (steps/serving/onnx_engine.py): one `og.Engine`
  owned by its own thread, which batches the requests in flight. `--engine-max-batch-sizes`
  adds runs with `engine.static_batching.max_batch_size` set in the model config;
  `--engine-counts 2` adds runs with that many engine loops on the one model, each request
  going to the loop with the fewest requests in flight.

Prompts are built as the pyfunc model builds them (the tokenizer's chat template). Each mode is
warmed up with one untimed round of `--clients` requests, then the modes run interleaved
`--repeat` times; the table shows each mode's median run (by wall time): wall time, requests/s,
output tokens/s (end-of-sequence tokens not counted), p50/p95 request latency (from a client
sending a question to receiving its whole answer) and how many answers differ from the serial
ones.

    source .venv/bin/activate
    python -m bench.concurrent_generation --model-dir <folder with genai_config.json> \\
        [--clients 8] [--requests 16] [--max-new-tokens 64] [--repeat 1] \\
        [--intra-op-threads N] [--engine-max-batch-sizes 8 16] [--engine-counts 2]
        [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

from bench.runtimes import available_cores, onnx_config
from steps.serving.chat_protocol import Options
from steps.serving.onnx_engine import EngineLoop, Finished

QUESTIONS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 times 7?",
    "Write a haiku about the sea.",
    "Why is the sky blue?",
    "Give me one tip for learning Python.",
    "What is photosynthesis?",
    'How do you say "good morning" in Spanish?',
    "Explain what a black hole is in two sentences.",
    "List four fruits that are red.",
    "What does a CPU do?",
    "Suggest a name for a pet turtle.",
    "Who wrote Romeo and Juliet?",
    "How many legs does a spider have?",
    "Describe a rainy day in one sentence.",
    "What is the boiling point of water in Celsius?",
)

Complete = Callable[[np.ndarray], list[int]]


@dataclass
class Run:
    wall_s: float
    latencies_s: list[float]
    outputs: list[list[int]]


@dataclass
class Row:
    mode: str
    wall_s: float
    requests_per_s: float
    tokens_per_s: float
    p50_s: float
    p95_s: float
    output_tokens: int
    differ_from_serial: int | None
    differing_requests: list[int]
    all_walls_s: list[float]


def load_model(folder: str, intra_op_threads: int, engine_max_batch: int | None) -> og.Model:
    session = {"intra_op_num_threads": intra_op_threads} if intra_op_threads else {}
    config = onnx_config(Path(folder), session)
    if engine_max_batch:
        batching = {"max_batch_size": engine_max_batch}
        config.overlay(json.dumps({"engine": {"static_batching": batching}}))
    return og.Model(config)


def chat_prompt_ids(tokenizer: og.Tokenizer, question: str) -> np.ndarray:
    messages = json.dumps([{"role": "user", "content": question}])
    prompt = tokenizer.apply_chat_template(messages=messages, add_generation_prompt=True)
    return np.asarray(tokenizer.encode(prompt), dtype=np.int32)


def generator_completer(model: og.Model, max_new: int, eos: set[int]) -> Complete:
    """Greedy decoding with a fresh og.Generator per call, as the pyfunc model does it."""

    def complete(ids: np.ndarray) -> list[int]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + max_new, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in eos:
                break
            tokens.append(token)
        del generator
        return tokens

    return complete


def serialized(complete: Complete) -> Complete:
    """One worker thread answers the requests one at a time, first come first served."""
    worker = ThreadPoolExecutor(max_workers=1)
    return lambda ids: worker.submit(complete, ids).result()


def engine_completer(model: og.Model, max_new: int) -> Complete:
    """Greedy decoding through the pyfunc model's own engine loop (one og.Engine on its own
    thread, which batches the requests in flight)."""
    loop = EngineLoop(model)
    greedy = Options(max_new, do_sample=False, temperature=1.0, top_p=1.0, stop=(), n=1)

    def complete(ids: np.ndarray) -> list[int]:
        turn = loop.submit(ids, greedy, max_new)
        tokens = []
        while not isinstance(item := turn.events.get(), Finished):
            tokens.append(item)
        if item.error:
            raise RuntimeError(item.error)
        return tokens

    return complete


def engines_completer(model: og.Model, max_new: int, count: int) -> Complete:
    """`count` engine loops on one og.Model; each request goes to the least busy one."""
    engines = [engine_completer(model, max_new) for _ in range(count)]
    in_flight = [0] * count
    lock = threading.Lock()

    def complete(ids: np.ndarray) -> list[int]:
        with lock:
            chosen = in_flight.index(min(in_flight))
            in_flight[chosen] += 1
        try:
            return engines[chosen](ids)
        finally:
            with lock:
                in_flight[chosen] -= 1

    return complete


def drive(complete: Complete, prompts: list[np.ndarray], clients: int) -> Run:
    """`clients` threads send the prompts in order, each waiting for its previous answer."""
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index in range(len(prompts)):
        todo.put(index)
    latencies = [0.0] * len(prompts)
    outputs: list[list[int]] = [[] for _ in prompts]
    errors: list[BaseException] = []

    def client() -> None:
        try:
            while True:
                try:
                    index = todo.get_nowait()
                except queue.Empty:
                    return
                sent = time.perf_counter()
                outputs[index] = complete(prompts[index])
                latencies[index] = time.perf_counter() - sent
        except BaseException as error:  # re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=client) for _ in range(min(clients, len(prompts)))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return Run(wall, latencies, outputs)


def median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda run: run.wall_s)[(len(runs) - 1) // 2]


def summarize(mode: str, runs: list[Run], reference: list[list[int]] | None) -> Row:
    run = median_run(runs)
    tokens = sum(len(output) for output in run.outputs)
    differing = (
        []
        if reference is None
        else [i for i, (a, b) in enumerate(zip(run.outputs, reference, strict=True)) if a != b]
    )
    p50, p95 = np.percentile(run.latencies_s, [50, 95])
    return Row(
        mode=mode,
        wall_s=run.wall_s,
        requests_per_s=len(run.outputs) / run.wall_s,
        tokens_per_s=tokens / run.wall_s,
        p50_s=float(p50),
        p95_s=float(p95),
        output_tokens=tokens,
        differ_from_serial=None if reference is None else len(differing),
        differing_requests=differing,
        all_walls_s=[r.wall_s for r in runs],
    )


def markdown(rows: list[Row], requests: int) -> str:
    lines = [
        "| mode | wall s | req/s | out tok/s | p50 s | p95 s | out tokens | "
        f"differ from serial (of {requests}) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        differ = "ref" if row.differ_from_serial is None else str(row.differ_from_serial)
        lines.append(
            f"| {row.mode} | {row.wall_s:.2f} | {row.requests_per_s:.2f} | "
            f"{row.tokens_per_s:.1f} | {row.p50_s:.2f} | {row.p95_s:.2f} | {row.output_tokens} | "
            f"{differ} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, help="folder with genai_config.json")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per mode")
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=available_cores(),
        help="ONNX Runtime intra-op threads (default: every available core, as the pyfunc "
        "model; 0: onnxruntime's own default, one thread on a 2-core VM)",
    )
    parser.add_argument(
        "--engine-max-batch-sizes",
        type=int,
        nargs="*",
        default=[],
        help="extra engine runs with engine.static_batching.max_batch_size set to each value",
    )
    parser.add_argument(
        "--engine-counts",
        type=int,
        nargs="*",
        default=[],
        help="extra runs with this many engine loops sharing the model",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    folder, threads = args.model_dir, args.intra_op_threads
    eos = json.loads((Path(folder) / "genai_config.json").read_text())["model"]["eos_token_id"]
    eos = set(eos if isinstance(eos, list) else [eos])
    model = load_model(folder, threads, None)
    tokenizer = og.Tokenizer(model)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.requests)]
    prompts = [chat_prompt_ids(tokenizer, question) for question in questions]
    warmup = prompts[: args.clients]

    generate = generator_completer(model, args.max_new_tokens, eos)
    modes: dict[str, Complete] = {"serial": serialized(generate), "threaded": generate}
    for size in [None, *args.engine_max_batch_sizes]:
        name = "engine" if size is None else f"engine max_batch_size={size}"
        modes[name] = engine_completer(load_model(folder, threads, size), args.max_new_tokens)
    for count in args.engine_counts:
        modes[f"{count} engines"] = engines_completer(model, args.max_new_tokens, count)

    runs: dict[str, list[Run]] = {name: [] for name in modes}
    for complete in modes.values():
        drive(complete, warmup, args.clients)
    for _ in range(args.repeat):
        for name, complete in modes.items():
            run = drive(complete, prompts, args.clients)
            runs[name].append(run)
            print(f"{name}: {run.wall_s:.2f} s", flush=True)

    reference = median_run(runs["serial"]).outputs
    rows = [
        summarize(name, mode_runs, None if name == "serial" else reference)
        for name, mode_runs in runs.items()
    ]
    serial_wall = rows[0].wall_s
    print(
        f"\n{Path(folder).name[:12]}: {args.requests} requests from {args.clients} clients, "
        f"max {args.max_new_tokens} new tokens, greedy, intra-op threads "
        f"{threads or 'default'}, median of {args.repeat} run(s)\n"
    )
    print(markdown(rows, args.requests))
    print()
    for row in rows[1:]:
        print(f"{row.mode}: {serial_wall / row.wall_s:.2f}x serial throughput")
    for row in rows:
        if row.differing_requests:
            outputs = median_run(runs[row.mode]).outputs
            print(f"{row.mode} differs from serial on requests {row.differing_requests}:")
            for i in row.differing_requests:
                print(f"  [{i}] serial: {tokenizer.decode(reference[i])!r}")
                print(f"  [{i}] {row.mode}: {tokenizer.decode(outputs[i])!r}")
    if args.json:
        settings = vars(args) | {"json": str(args.json)}
        results = {"settings": settings, "rows": [asdict(row) for row in rows]}
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
