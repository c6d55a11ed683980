"""`python -m steps serve` as a real process on a loopback port, with the official `openai`
client as the peer: the champions of both runtimes from the registry of the tracking server the
pipeline ran against, answers and streams, OpenAI error objects, concurrent and disconnecting
clients, and a server that follows the `champion` alias while clients stream."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import mlflow
import openai
import pytest
import requests
from conftest import REGISTERED, PipelineRuns, Served
from mlflow import MlflowClient

from steps.serving.processes import openai_server

pytestmark = pytest.mark.slow
JAPAN = [{"role": "user", "content": "What is the capital of Japan?"}]
QUESTIONS = (
    "What is the capital of France?",
    "What is 2 + 2?",
    "Name a primary color.",
    "What do bees make?",
)


# Greedy answers are compared over a dozen tokens: enough to differ wherever they would.
TOKENS = 12


@pytest.fixture(scope="module", params=sorted(REGISTERED))
def served(request, champions: PipelineRuns, tmp_path_factory) -> Served:
    """The ONNX champion served by its URI; the transformers one without a URI, as `python -m
    steps serve` alone serves the champion registered last (the champions fixture registered
    the transformers one after the pipeline's ONNX one)."""
    runtime = request.param
    log = tmp_path_factory.mktemp(f"openai-{runtime}") / "serve.log"
    uri = f"models:/{REGISTERED[runtime]}@champion" if runtime == "onnx" else None
    with openai_server(uri, champions.server.uri, log) as url:
        yield Served(runtime, url, REGISTERED[runtime])


def ask(served: Served, messages=JAPAN, **options) -> str:
    answer = served.client().chat.completions.create(
        model=served.model_id, messages=messages, temperature=0, max_tokens=TOKENS, **options
    )
    return answer.choices[0].message.content


def test_a_chat_answer_equals_the_logged_models_own(
    served: Served, champions: PipelineRuns, tmp_path
) -> None:
    answer = served.client().chat.completions.create(
        model=served.model_id, messages=JAPAN, temperature=0, max_tokens=TOKENS
    )
    assert answer.object == "chat.completion"
    (choice,) = answer.choices
    assert choice.message.role == "assistant"
    assert "Tokyo" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert 0 < answer.usage.completion_tokens <= TOKENS
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    # The same greedy answer as the model's own pyfunc predict (the transformers flavor's pipeline,
    # the ONNX model's engine), which `mlflow models serve` answers with.
    mlflow.set_tracking_uri(champions.server.uri)
    model = mlflow.pyfunc.load_model(f"models:/{served.model_id}@champion", dst_path=str(tmp_path))
    (own,) = model.predict({"messages": JAPAN, "max_tokens": TOKENS, "temperature": 0.0})
    assert choice.message.content == own["choices"][0]["message"]["content"]
    assert answer.usage.completion_tokens == own["usage"]["completion_tokens"]


def test_a_stream_joins_to_the_answer_and_ends_with_usage(served: Served) -> None:
    plain = ask(served)
    chunks = list(
        served.client().chat.completions.create(
            model=served.model_id, messages=JAPAN, temperature=0, max_tokens=TOKENS,
            stream=True, stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_the_first_token_arrives_long_before_the_answer_ends(served: Served) -> None:
    started = time.monotonic()
    stream = served.client().chat.completions.create(
        model=served.model_id, messages=[{"role": "user", "content": "Tell me a long story."}],
        temperature=0, max_tokens=40, stream=True,
    )  # fmt: skip
    arrivals = [time.monotonic() - started for chunk in stream if chunk.choices[0].delta.content]
    assert len(arrivals) > 20
    print(f"\n{served.runtime}: first token {arrivals[0]:.2f} s, last {arrivals[-1]:.2f} s")
    # Buffered, the first piece would come with the last; streamed, after the prompt's prefill,
    # well before the end (a quarter was too tight for the int8 build: 0.12 of 0.49 s).
    assert arrivals[0] < arrivals[-1] / 2


def test_a_plain_prompt_is_answered_whole_and_streamed_alike(served: Served) -> None:
    client = served.client()
    answer = client.completions.create(
        model=served.model_id, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert answer.object == "text_completion" and "Paris" in answer.choices[0].text
    pieces = client.completions.create(
        model=served.model_id, prompt="The capital of France is", max_tokens=8, temperature=0,
        stream=True,
    )  # fmt: skip
    assert "".join(chunk.choices[0].text for chunk in pieces) == answer.choices[0].text


def test_n_gives_that_many_indexed_choices_in_one_request(served: Served) -> None:
    answer = served.client().chat.completions.create(
        model=served.model_id, messages=JAPAN, temperature=0, max_tokens=16, n=3
    )
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert len({c.message.content for c in answer.choices}) == 1  # greedy: the same three


def test_models_and_health_name_the_version_served(served: Served, champions) -> None:
    (entry,) = served.client().models.list().data
    version = MlflowClient(champions.server.uri).get_model_version_by_alias(
        served.model_id, "champion"
    )
    assert entry.id == served.model_id
    assert entry.model_extra["version"] == str(version.version)
    assert entry.model_extra["runtime"] == served.runtime
    assert entry.model_extra["model_uri"] == f"models:/{served.model_id}@champion"
    health = served.health()
    assert health["status"] == "ok" and health["version"] == str(version.version)


BAD = {
    "negative temperature": ({"temperature": -1}, "temperature"),
    "content not a string": ({"messages": [{"role": "user", "content": 42}]}, "content"),
    # The served models' own check (steps/serving/chat_protocol.py), the same in both runtimes.
    "blank content": ({"messages": [{"role": "user", "content": " "}]}, "non-empty"),
    "logit_bias": ({"logit_bias": {"1": 5}}, "logit_bias"),
    "response_format": ({"response_format": {"type": "xml"}}, "response_format.type"),
    "logprobs": ({"logprobs": True}, "logprobs"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_request_gets_a_400_in_one_sentence(served: Served, case: str) -> None:
    fields, says = BAD[case]
    body = {"model": served.model_id, "messages": JAPAN} | fields
    with pytest.raises(openai.BadRequestError) as raised:
        served.client().chat.completions.create(**body)
    error = raised.value.body
    assert error["type"] == "invalid_request_error" and says in error["message"]
    assert len(error["message"]) < 200 and "\n" not in error["message"]


def test_an_unknown_model_or_route_is_a_404(served: Served) -> None:
    with pytest.raises(openai.NotFoundError, match=served.model_id):
        served.client().chat.completions.create(model="gpt-4o", messages=JAPAN)
    response = requests.get(f"{served.url}/v1/embeddings", timeout=10)
    assert (
        response.status_code == 404
        and "/v1/chat/completions" in response.json()["error"]["message"]
    )


def test_a_prompt_longer_than_the_context_is_a_413(served: Served) -> None:
    long = [{"role": "user", "content": "word " * 12000}]
    with pytest.raises(openai.APIStatusError) as raised:
        served.client().chat.completions.create(model=served.model_id, messages=long)
    assert raised.value.status_code == 413
    assert raised.value.body["code"] == "context_length_exceeded"
    assert "context window" in raised.value.body["message"]


def test_a_malformed_body_is_a_400_not_a_traceback(served: Served) -> None:
    response = requests.post(
        f"{served.url}/v1/chat/completions",
        data=b"{not json",
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


def test_eight_streaming_clients_get_their_own_answers(served: Served) -> None:
    alone = {
        question: ask(served, [{"role": "user", "content": question}]) for question in QUESTIONS
    }

    def stream(question: str) -> str:
        chunks = served.client().chat.completions.create(
            model=served.model_id, messages=[{"role": "user", "content": question}],
            temperature=0, max_tokens=TOKENS, stream=True,
        )  # fmt: skip
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    batch = [QUESTIONS[i % len(QUESTIONS)] for i in range(16)]
    with ThreadPoolExecutor(8) as clients:
        answers = list(clients.map(stream, batch))
    assert answers == [alone[question] for question in batch]
    assert served.health()["generating"] == 0


def test_a_client_that_disconnects_mid_stream_frees_its_generation(served: Served) -> None:
    body = {
        "model": served.model_id, "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
        "max_tokens": 64, "temperature": 0, "stream": True,
    }  # fmt: skip
    started = time.monotonic()
    whole = served.client().completions.create(**(body | {"stream": False}))
    full_seconds = time.monotonic() - started
    assert whole.choices[0].finish_reason == "length", "the check needs an answer that runs long"
    with requests.post(f"{served.url}/v1/completions", json=body, stream=True, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith(b"data: "))
        assert served.health()["generating"] == 1
    left = time.monotonic()
    while served.health()["generating"] and time.monotonic() - left < full_seconds:
        time.sleep(0.05)
    freed_after = time.monotonic() - left
    print(f"\n{served.runtime}: freed {freed_after:.2f} s after the disconnect "
          f"(the whole answer takes {full_seconds:.1f} s)")  # fmt: skip
    assert served.health()["generating"] == 0
    assert freed_after < full_seconds / 4
    assert "Tokyo" in ask(served)


FOLLOWED = "openai-follow-test"


def test_the_server_follows_the_alias_without_failing_a_request(
    champions: PipelineRuns, tmp_path
) -> None:
    """Version 1 is the ONNX champion, version 2 the transformers one: the alias moves from
    one to the other while four clients stream, and every request finishes on the version it
    started on."""
    client = MlflowClient(champions.server.uri)
    champions_by_runtime = [
        client.get_model_version_by_alias(REGISTERED[runtime], "champion")
        for runtime in ("onnx", "transformers")
    ]
    mlflow.set_tracking_uri(champions.server.uri)
    # register_model links each version to its LoggedModel, as the register step does.
    first, second = (
        mlflow.register_model(champion.source, FOLLOWED) for champion in champions_by_runtime
    )
    client.set_registered_model_alias(FOLLOWED, "champion", first.version)
    log = tmp_path / "serve.log"
    with openai_server(
        f"models:/{FOLLOWED}@champion", champions.server.uri, log, poll_interval=0.5
    ) as url:
        served = Served("onnx", url, FOLLOWED)
        outcomes: list[tuple[float, float, set[str], str | None]] = []
        lock = threading.Lock()

        new = f"{FOLLOWED}:{second.version}"

        def stream_until_the_new_version_answers(question: str) -> None:
            openai_client = served.client(timeout=120)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                started = time.monotonic()
                try:
                    chunks = list(openai_client.chat.completions.create(
                        model=FOLLOWED, messages=[{"role": "user", "content": question}],
                        temperature=0, max_tokens=24, stream=True,
                    ))  # fmt: skip
                    outcome = ({c.system_fingerprint for c in chunks}, None)
                except openai.OpenAIError as error:
                    outcome = (set(), repr(error))
                with lock:
                    outcomes.append((started, time.monotonic(), *outcome))
                if outcome[0] == {new}:
                    return

        with ThreadPoolExecutor(4) as clients:
            running = [clients.submit(stream_until_the_new_version_answers, q) for q in QUESTIONS]
            time.sleep(2)
            moved_at = time.monotonic()
            client.set_registered_model_alias(FOLLOWED, "champion", second.version)
            for future in running:
                future.result()
        (entry,) = served.client().models.list().data
        answers_after = ask(served)

    failures = [o for o in outcomes if o[3] is not None]
    fingerprints = [next(iter(o[2])) for o in outcomes if len(o[2]) == 1]
    old = f"{FOLLOWED}:{first.version}"
    first_new_start = min(o[0] for o in outcomes if o[2] == {new})
    finished_old_during_switch = [o for o in outcomes if o[2] == {old} and o[1] > first_new_start]
    print(f"\nalias moved: {len(outcomes)} streams, {len(failures)} failed, "
          f"{fingerprints.count(old)} on v{first.version}, {fingerprints.count(new)} on "
          f"v{second.version}; switched {first_new_start - moved_at:.1f} s after the move, "
          f"{len(finished_old_during_switch)} old-version streams finished after it")  # fmt: skip
    assert failures == []
    assert len(fingerprints) == len(outcomes)  # every stream was served by one version
    assert old in fingerprints and new in fingerprints
    assert finished_old_during_switch, "no request was in flight on the old version at the switch"
    assert entry.model_extra["version"] == str(second.version)
    assert entry.model_extra["runtime"] == "transformers"
    assert "Tokyo" in answers_after
    assert f"freeing models:/{FOLLOWED}/{first.version}" in log.read_text()
