"""Requests/s and latency of the logged chat models at 1, 4 and 8 concurrent clients, served
side by side: over HTTP by a real `mlflow models serve` process (`mlflow-serve`), by this
project's OpenAI-compatible server `python -m steps serve` through the official `openai` client,
answers whole (`openai`) and streamed (`openai-stream`, with time to first token), streamed
with the answer held to a JSON Schema (`openai-json`: structured outputs, whose grammar masks
every decoding step), and in-process through `mlflow.pyfunc.load_model(...).predict`
(`in-process`).

    python -m bench.serving [--model smollm2-135m] [--compute cpu] [--runtimes onnx transformers]
        [--modes ...] [--clients 1 4 8] [--requests 48] [--max-tokens 32] [--onnx-model-uri URI]
        [--out bench/results]

Models: the pipeline's wrap_transformers and wrap_onnx models in the bench's tracking store
(bench/models.py). --onnx-model-uri serves another ONNX model instead (e.g. another precision's
wrap_onnx model in the same store).

Per runtime, what the --modes use starts: `mlflow models serve -m <uri> --env-manager local`
(one uvicorn worker, MLflow's default), `python -m steps serve --model-uri <uri>` on loopback
ports (logs: --out/serve-<runtime>.log, --out/openai-<runtime>.log), the same model loaded in
this process. Each mode gets one untimed warm-up request. Then, for each client count in turn, the
modes are timed one after the other: N client threads share --requests
greedy chat requests (`max_tokens` --max-tokens, `temperature` 0; the questions cycle through
QUESTIONS), and each client sends its next request as soon as its previous answer arrives.

Per level: wall time, requests/s (answered requests / wall), output tokens/s (sum of
`usage.completion_tokens` / wall), the decode rate of streamed modes (tokens after the first
over the time from the first content chunk to the last: what a grammar costs, apart from the
prompt's prefill and from how long the answers are), p50 and p95 latency of the answered
requests (streamed: until the last chunk), p50 and p95 time to the first content chunk
(streamed only), errors (non-200 answers, transport errors, exceptions from `predict`), scaling
(requests/s over the same runtime and mode's 1-client requests/s), and how many answers differ
from the answer the same question got at 1 client in the same mode (greedy decoding should make
them equal). For the servers also their cost: requests/s over in-process requests/s at the same
client count (where in-process is among the --modes).

Results: --out/serving.json, --out/serving.md (also printed) and --out/serving.png (requests/s
and p95 latency against clients), all three also in a run `bench-serving` with one metric per
level and measure (e.g. `onnx.http.c8.requests_per_s`).
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import openai
import requests
from mlflow.exceptions import MlflowException

from bench.models import add_model_arguments, bench_models
from bench.reporting import provenance, write_report
from steps.serving.processes import model_server, openai_server

QUESTIONS = (
    "What is the capital of France?",
    "What is the capital of Japan?",
    "What is 2 + 2?",
    "Name a primary color.",
    "What is the largest planet in the solar system?",
    "How many days are in a week?",
    "What do bees make?",
    "What is the boiling point of water in Celsius?",
)
RUNTIMES = ("onnx", "transformers")
HTTP, OPENAI, OPENAI_STREAM, IN_PROCESS = "mlflow-serve", "openai", "openai-stream", "in-process"
OPENAI_JSON = "openai-json"
SERVERS = (HTTP, OPENAI, OPENAI_STREAM, OPENAI_JSON)
MODES = (*SERVERS, IN_PROCESS)
# openai-json's answers: a sentence in one string, long enough that decoding dominates.
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "minLength": 60}},
    "required": ["answer"],
    "additionalProperties": False,
}
# One request waits at most this long: 8 clients on 2 cores can queue for minutes.
REQUEST_TIMEOUT_S = 600


@dataclass(frozen=True)
class Answer:
    content: str | None  # None when the request failed
    completion_tokens: int
    error: str | None
    first_token_s: float | None = None  # streamed answers: when the first content arrived
    decode_s: float | None = None  # streamed answers: from the first content to the last


@dataclass(frozen=True)
class Outcome:
    question: int  # index into QUESTIONS
    latency_s: float
    answer: Answer


@dataclass(frozen=True)
class Trial:
    runtime: str
    mode: str
    clients: int
    wall_s: float
    outcomes: list[Outcome]


@dataclass(frozen=True)
class Level:
    runtime: str
    mode: str
    clients: int
    requests: int
    errors: int
    wall_s: float
    requests_per_s: float
    tokens_per_s: float
    p50_s: float | None  # None when no request was answered
    p95_s: float | None
    ttft_p50_s: float | None  # streamed only: time to the first content chunk
    ttft_p95_s: float | None
    decode_tokens_per_s: float | None  # streamed only: tokens after the first / decode time
    scaling: float | None  # requests/s over the 1-client requests/s of this runtime and mode
    server_cost: float | None  # servers: requests/s over in-process requests/s, same clients
    answers_differing: int  # answered, but not as the same question was at 1 client
    first_error: str | None


Send = Callable[[str], Answer]


def chat_request(question: str, max_tokens: int) -> dict:
    return {
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def completion_answer(completion: dict) -> Answer:
    return Answer(
        completion["choices"][0]["message"]["content"],
        completion["usage"]["completion_tokens"],
        None,
    )


def http_sender(url: str, max_tokens: int) -> Send:
    def send(question: str) -> Answer:
        try:
            response = requests.post(
                f"{url}/invocations",
                json=chat_request(question, max_tokens),
                timeout=REQUEST_TIMEOUT_S,
            )
        except requests.RequestException as error:
            return Answer(None, 0, f"{type(error).__name__}: {error}")
        if response.status_code != 200:
            return Answer(None, 0, f"HTTP {response.status_code}: {response.text[:300]}")
        (completion,) = response.json()
        return completion_answer(completion)

    return send


def openai_sender(
    url: str, model_id: str, max_tokens: int, stream: bool, schema: dict | None = None
) -> Send:
    client = openai.OpenAI(
        base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S
    )
    extra = {}
    if schema is not None:
        extra["response_format"] = {
            "type": "json_schema", "json_schema": {"name": "answer", "schema": schema}
        }  # fmt: skip

    def send(question: str) -> Answer:
        request = chat_request(question, max_tokens) | extra
        sent = time.perf_counter()
        try:
            if not stream:
                completion = client.chat.completions.create(model=model_id, **request)
                return Answer(
                    completion.choices[0].message.content, completion.usage.completion_tokens, None
                )
            pieces, first, last, tokens = [], None, None, 0
            for chunk in client.chat.completions.create(
                model=model_id, stream=True, stream_options={"include_usage": True}, **request
            ):
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
                if chunk.choices and chunk.choices[0].delta.content:
                    last = time.perf_counter() - sent
                    first = first or last
                    pieces.append(chunk.choices[0].delta.content)
            decode = last - first if first is not None and last is not None else None
            return Answer("".join(pieces), tokens, None, first, decode)
        except openai.OpenAIError as error:
            return Answer(None, 0, f"{type(error).__name__}: {error}")

    return send


def in_process_sender(model: mlflow.pyfunc.PyFuncModel, max_tokens: int) -> Send:
    def send(question: str) -> Answer:
        try:
            (completion,) = model.predict(chat_request(question, max_tokens))
        # What the models raise for a request they cannot answer (the scoring server turns
        # these into 4xx/5xx answers); anything else is a bug in the bench and should stop it.
        except (MlflowException, RuntimeError, ValueError) as error:
            return Answer(None, 0, f"{type(error).__name__}: {error}")
        return completion_answer(completion)

    return send


def drive(send: Send, requests_total: int, clients: int) -> tuple[float, list[Outcome]]:
    """Closed loop: `clients` threads take request i (question i mod len(QUESTIONS)) off a
    shared queue and send the next one as soon as their previous answer arrives."""
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index in range(requests_total):
        todo.put(index)
    outcomes: list[Outcome] = []

    def client() -> None:
        while True:
            try:
                index = todo.get_nowait()
            except queue.Empty:
                return
            question = index % len(QUESTIONS)
            sent = time.perf_counter()
            answer = send(QUESTIONS[question])
            outcomes.append(Outcome(question, time.perf_counter() - sent, answer))

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()  # re-raises a client's unexpected exception here
    return time.perf_counter() - started, outcomes


def warm_up(mode: str, send: Send) -> None:
    answer = send(QUESTIONS[0])
    if answer.error is not None:
        raise RuntimeError(f"the {mode} warm-up request failed: {answer.error}")


def measure_runtime(
    runtime: str,
    model_uri: str,
    tracking_uri: str,
    clients_levels: list[int],
    requests_total: int,
    max_tokens: int,
    log: Path,
    modes: list[str],
) -> list[Trial]:
    """Every mode of one runtime, interleaved client count by client count, so slow drift of
    the machine hits them alike. Only the servers the modes use start; they and the in-process
    model stay loaded throughout, and the idle ones cost no CPU."""
    print(f"{runtime}: serving {model_uri} for {', '.join(modes)}", flush=True)
    uses_openai = any(mode in (OPENAI, OPENAI_STREAM, OPENAI_JSON) for mode in modes)
    with contextlib.ExitStack() as servers:
        url = openai_url = model_id = None
        if HTTP in modes:
            url = servers.enter_context(model_server(model_uri, tracking_uri, log))
        if uses_openai:
            openai_url = servers.enter_context(
                openai_server(model_uri, tracking_uri, log.with_name(f"openai-{runtime}.log"))
            )
            (served,) = requests.get(f"{openai_url}/v1/models", timeout=30).json()["data"]
            model_id = served["id"]
        makers = {
            HTTP: lambda: http_sender(url, max_tokens),
            OPENAI: lambda: openai_sender(openai_url, model_id, max_tokens, stream=False),
            OPENAI_STREAM: lambda: openai_sender(openai_url, model_id, max_tokens, stream=True),
            OPENAI_JSON: lambda: openai_sender(
                openai_url, model_id, max_tokens, stream=True, schema=ANSWER_SCHEMA
            ),
            IN_PROCESS: lambda: in_process_sender(mlflow.pyfunc.load_model(model_uri), max_tokens),
        }
        senders = {mode: makers[mode]() for mode in modes}
        for mode, send in senders.items():
            warm_up(mode, send)
        print(f"{runtime}: served and loaded {model_uri}, warmed up", flush=True)
        trials = []
        for clients in clients_levels:
            for mode, send in senders.items():
                wall, outcomes = drive(send, requests_total, clients)
                trial = Trial(runtime, mode, clients, wall, outcomes)
                trials.append(trial)
                print(progress_line(trial), flush=True)
    return trials


def progress_line(trial: Trial) -> str:
    answered = [o for o in trial.outcomes if o.answer.error is None]
    return (
        f"{trial.runtime} {trial.mode} {trial.clients} clients: "
        f"{len(answered) / trial.wall_s:.2f} req/s, {len(trial.outcomes) - len(answered)} errors, "
        f"{trial.wall_s:.1f} s"
    )


def summarize(trials: list[Trial]) -> list[Level]:
    def answered(trial: Trial) -> list[Outcome]:
        return [o for o in trial.outcomes if o.answer.error is None]

    rates = {(t.runtime, t.mode, t.clients): len(answered(t)) / t.wall_s for t in trials}
    # The first answer each question got at 1 client, per runtime and mode.
    references: dict[tuple[str, str], dict[int, str | None]] = {}
    for trial in (t for t in trials if t.clients == 1):
        found = references.setdefault((trial.runtime, trial.mode), {})
        for outcome in sorted(answered(trial), key=lambda o: o.question):
            found.setdefault(outcome.question, outcome.answer.content)

    levels = []
    for trial in trials:
        ok = answered(trial)
        rate = rates[(trial.runtime, trial.mode, trial.clients)]
        base = rates[(trial.runtime, trial.mode, 1)]
        in_process = rates.get((trial.runtime, IN_PROCESS, trial.clients))
        reference = references[(trial.runtime, trial.mode)]
        p50, p95 = percentiles([o.latency_s for o in ok])
        ttft_p50, ttft_p95 = percentiles(
            [o.answer.first_token_s for o in ok if o.answer.first_token_s is not None]
        )
        decoded = [o.answer for o in ok if o.answer.decode_s]
        decode_rate = (
            sum(a.completion_tokens - 1 for a in decoded) / sum(a.decode_s for a in decoded)
            if decoded
            else None
        )
        errors = [o.answer.error for o in trial.outcomes if o.answer.error is not None]
        levels.append(
            Level(
                runtime=trial.runtime,
                mode=trial.mode,
                clients=trial.clients,
                requests=len(trial.outcomes),
                errors=len(errors),
                wall_s=trial.wall_s,
                requests_per_s=rate,
                tokens_per_s=sum(o.answer.completion_tokens for o in ok) / trial.wall_s,
                p50_s=p50,
                p95_s=p95,
                ttft_p50_s=ttft_p50,
                ttft_p95_s=ttft_p95,
                decode_tokens_per_s=decode_rate,
                scaling=rate / base if base else None,
                server_cost=rate / in_process if trial.mode in SERVERS and in_process else None,
                answers_differing=sum(
                    o.question in reference and o.answer.content != reference[o.question]
                    for o in ok
                ),
                first_error=errors[0] if errors else None,
            )
        )
    return levels


def percentiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    p50, p95 = np.percentile(values, [50, 95]).tolist()
    return p50, p95


def markdown(levels: list[Level]) -> str:
    def number(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        "| runtime | mode | clients | requests | errors | req/s | scaling vs 1 client | "
        "tokens/s | decode tokens/s | p50 s | p95 s | first token p50 s | p95 s | "
        "answers differing |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in levels:
        lines.append(
            f"| {level.runtime} | {level.mode} | {level.clients} | {level.requests} | "
            f"{level.errors} | {level.requests_per_s:.2f} | {number(level.scaling, 2)} | "
            f"{level.tokens_per_s:.1f} | {number(level.decode_tokens_per_s, 1)} | "
            f"{number(level.p50_s, 2)} | {number(level.p95_s, 2)} | "
            f"{number(level.ttft_p50_s, 3)} | {number(level.ttft_p95_s, 3)} | "
            f"{level.answers_differing} |"
        )
    costs = [
        f"- {level.runtime} {level.mode}, {level.clients} clients: {number(level.server_cost, 3)}"
        for level in levels
        if level.server_cost is not None
    ]
    if costs:
        title = "Server cost (the server's req/s over in-process req/s, same client count):"
        lines += ["", title, "", *costs]
    rates = {(lv.runtime, lv.mode, lv.clients): lv.decode_tokens_per_s for lv in levels}
    ratios = [
        f"- {level.runtime}, {level.clients} clients: {level.decode_tokens_per_s / free:.3f}"
        for level in levels
        if level.mode == OPENAI_JSON
        and level.decode_tokens_per_s
        and (free := rates.get((level.runtime, OPENAI_STREAM, level.clients)))
    ]
    if ratios:
        title = "Structured outputs (openai-json's decode rate over openai-stream's):"
        lines += ["", title, "", *ratios]
    return "\n".join(lines)


def chart(levels: list[Level], path: Path) -> None:
    """Requests/s and p95 latency against clients, one line per runtime and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rate_axis, p95_axis) = plt.subplots(1, 2, figsize=(11, 4.5))
    for runtime, mode in dict.fromkeys((level.runtime, level.mode) for level in levels):
        line = [lv for lv in levels if (lv.runtime, lv.mode) == (runtime, mode)]
        clients = [lv.clients for lv in line]
        style = {
            "marker": "o",
            "linestyle": "--" if mode == IN_PROCESS else "-",
            "label": f"{runtime} {mode}",
        }
        rate_axis.plot(clients, [lv.requests_per_s for lv in line], **style)
        p95_axis.plot(clients, [np.nan if lv.p95_s is None else lv.p95_s for lv in line], **style)
    for axis, title in ((rate_axis, "requests / s"), (p95_axis, "p95 latency (s)")):
        axis.set_title(title)
        axis.set_xlabel("concurrent clients")
        axis.set_xticks(sorted({level.clients for level in levels}))
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def level_metrics(levels: list[Level]) -> dict[str, float]:
    """`onnx.http.c8.requests_per_s`-style metrics, for the values a level has."""
    keys = ("requests_per_s", "tokens_per_s", "p50_s", "p95_s", "ttft_p50_s", "ttft_p95_s",
            "decode_tokens_per_s", "scaling", "server_cost")  # fmt: skip
    metrics = {}
    for level in levels:
        prefix = f"{level.runtime}.{level.mode}.c{level.clients}"
        values = asdict(level)
        metrics |= {f"{prefix}.{key}": values[key] for key in keys if values[key] is not None}
        metrics[f"{prefix}.errors"] = level.errors
        metrics[f"{prefix}.answers_differing"] = level.answers_differing
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=48, help="per runtime, mode and clients")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--onnx-model-uri", help="serve this ONNX model, not the pipeline's")
    args = parser.parse_args()
    if 1 not in args.clients:
        parser.error("--clients must include 1: scaling and answer checks compare against it")
    clients_levels = sorted(set(args.clients))
    models = bench_models(args.model, args.compute, args.out)
    uris = {"onnx": args.onnx_model_uri or models.onnx_uri, "transformers": models.transformers_uri}
    trials = []
    for runtime in args.runtimes:
        trials += measure_runtime(
            runtime,
            uris[runtime],
            models.tracking_uri,
            clients_levels,
            args.requests,
            args.max_tokens,
            (args.out / f"serve-{runtime}.log").resolve(),
            args.modes,
        )
    levels = summarize(trials)
    report = provenance(vars(args)) | {
        "model_uris": {runtime: uris[runtime] for runtime in args.runtimes},
        "servers": {
            HTTP: "mlflow models serve --env-manager local, 1 uvicorn worker",
            OPENAI: "python -m steps serve (openai client, whole answers)",
            OPENAI_STREAM: "python -m steps serve (openai client, streamed)",
            OPENAI_JSON: "python -m steps serve (openai client, streamed, held to answer_schema)",
        },
        "answer_schema": ANSWER_SCHEMA,
        "questions": list(QUESTIONS),
        "levels": [asdict(level) for level in levels],
    }
    picture = args.out / "serving.png"
    chart(levels, picture)
    table = markdown(levels)
    metrics = level_metrics(levels)
    write_report("serving", report, table, args.out, models.tracking_uri, metrics, (picture,))


if __name__ == "__main__":
    main()
