"""What a team needs of `python -m steps serve` in front of users, against real server
processes of the bundled ONNX champion with the official `openai` client: API keys on every
route but /health (from a file and the environment, never logged), Prometheus metrics that move
by exactly the requests sent, and a SIGTERM that lets the streams in flight finish. One server
for the module: its last test stops it."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import requests
from conftest import REGISTERED, PipelineRuns
from prometheus_client.parser import text_string_to_metric_families

from steps.serving.api_keys import ENV_VAR
from steps.serving.processes import openai_server_process

pytestmark = pytest.mark.slow
KEYS = ("sk-test-first-8c1f", "sk-test-second-2b7e")
ENV_KEY = "sk-test-environment-5d03"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MODEL = REGISTERED["onnx"]
URI = f"models:/{MODEL}@champion"


GRACE = 30


@dataclass(frozen=True)
class Server:
    url: str
    log: Path
    process: subprocess.Popen


@pytest.fixture(scope="module")
def keyed(champions: PipelineRuns, tmp_path_factory) -> Iterator[Server]:
    """The ONNX champion behind two keys from a file and one from the environment."""
    folder = tmp_path_factory.mktemp("keyed")
    key_file = folder / "keys"
    key_file.write_text(f"# the team's keys\n{KEYS[0]}\n\n{KEYS[1]}\n")
    log = folder / "serve.log"
    args = ("--api-key-file", str(key_file), "--grace-period", str(GRACE))
    env = {ENV_VAR: ENV_KEY}
    with openai_server_process(URI, champions.server.uri, log, args=args, **env) as started:
        url, process = started
        yield Server(url, log, process)


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def test_every_key_opens_every_route_and_none_is_logged(keyed: Server) -> None:
    url, log = keyed.url, keyed.log
    for key in (*KEYS, ENV_KEY):
        answer = client(url, key).chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=4
        )
        assert answer.choices[0].message.content
        assert requests.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}).ok
    text = log.read_text()
    assert not any(key in text for key in (*KEYS, ENV_KEY))


@pytest.mark.parametrize("key", [None, "sk-wrong", KEYS[0] + "x"])
def test_a_missing_or_wrong_key_is_a_401_on_every_route_but_health(keyed: Server, key) -> None:
    url = keyed.url
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 4}
    routes = (("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
              ("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/nowhere"))  # fmt: skip
    for method, path in routes:
        reply = requests.request(method, f"{url}{path}", headers=headers, json=body, timeout=30)
        assert reply.status_code == 401, (path, reply.text)
        error = reply.json()["error"]
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        if key:
            assert key not in error["message"]
    assert requests.get(f"{url}/health", headers=headers, timeout=30).json()["status"] == "ok"
    with pytest.raises(openai.AuthenticationError):
        client(url, key or "none").models.list()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, parsed by Prometheus' own parser: (name, labels) -> value."""
    reply = requests.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEYS[0]}"})
    reply.raise_for_status()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def test_metrics_move_by_exactly_the_requests_sent(keyed: Server) -> None:
    url = keyed.url
    chat = (("route", "/v1/chat/completions"),)
    before = scrape(url)
    tokens = 0
    for stream in (False, False, True):
        reply = client(url, KEYS[1]).chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=6, stream=stream,
            **({"stream_options": {"include_usage": True}} if stream else {}),
        )  # fmt: skip
        if stream:
            *_, last = list(reply)
            tokens += last.usage.completion_tokens
        else:
            tokens += reply.usage.completion_tokens
    with pytest.raises(openai.AuthenticationError):
        client(url, "sk-wrong").chat.completions.create(model=MODEL, messages=QUESTION)
    after = scrape(url)

    def moved(name: str, labels: tuple = ()) -> float:
        key = (name, tuple(sorted(labels)))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("llm_requests_total", (*chat, ("status", "200"))) == 3
    assert moved("llm_requests_total", (*chat, ("status", "401"))) == 1
    assert moved("llm_request_duration_seconds_count", chat) == 4
    assert moved("llm_time_to_first_token_seconds_count") == 3
    assert moved("llm_generated_tokens_total") == tokens > 0
    assert after[("llm_requests_in_flight", ())] == 1  # the scrape itself
    assert after[("llm_requests_waiting", ())] == 0
    (served,) = [key for key, value in after.items() if key[0] == "llm_served_model_info"]
    assert dict(served[1])["model"] == MODEL and dict(served[1])["runtime"] == "onnx"
    assert after[served] == 1


def test_sigterm_lets_four_streams_finish_refuses_new_requests_and_exits_0(
    keyed: Server,
) -> None:
    url, process = keyed.url, keyed.process
    first_pieces = threading.Barrier(5)
    finished: list[str | None] = [None] * 4

    def stream(index: int) -> None:
        chunks = client(url, KEYS[0]).chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=48, stream=True, temperature=0
        )
        waited = False
        for chunk in chunks:
            if not waited and chunk.choices and chunk.choices[0].delta.content:
                waited = True
                first_pieces.wait(timeout=60)
            if chunk.choices and chunk.choices[0].finish_reason:
                finished[index] = chunk.choices[0].finish_reason

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    first_pieces.wait(timeout=60)  # every stream is under way
    signalled = time.monotonic()
    os.kill(process.pid, signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/health", timeout=5)
    for thread in threads:
        thread.join(timeout=GRACE)
    tail = keyed.log.read_text()[-2000:]
    assert all(reason in ("stop", "length") for reason in finished), (finished, tail)
    assert process.wait(timeout=GRACE) == 0, tail
    assert time.monotonic() - signalled < GRACE
