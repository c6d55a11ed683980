"""Structured outputs and tool calls through `python -m steps serve`, both runtimes' champions
as real server processes, the official `openai` client and LangChain's `ChatOpenAI` as the
peers: `parse()` and `with_structured_output()` return valid objects, JSON mode parses, a tool
round trip (call, result, answer) works whole and streamed, `tool_choice="required"` always
calls a declared function with valid arguments, even sampled. Short answers throughout: the
bundled 135M model is slow on the transformers runtime. The rules without a model:
test_structured.py."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from conftest import REGISTERED, PipelineRuns, Served
from pydantic import BaseModel, Field

from steps.serving.processes import openai_server

pytestmark = pytest.mark.slow
PARIS = [{"role": "user", "content": "What is the weather in Paris?"}]
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": CITY,
                                      "description": "The current weather in a city"}},
    {"type": "function", "function": {"name": "get_time", "parameters": CITY,
                                      "description": "The local time in a city"}},
]  # fmt: skip
RESULT = json.dumps({"temperature_c": 18, "sky": "sunny"})


class Weather(BaseModel):
    city: Literal["Paris", "London", "Tokyo"]
    temperature: int = Field(ge=-50, le=50)


@pytest.fixture(scope="module", params=sorted(REGISTERED))
def served(request, champions: PipelineRuns, tmp_path_factory) -> Served:
    runtime = request.param
    log = tmp_path_factory.mktemp(f"structured-{runtime}") / "serve.log"
    with openai_server(f"models:/{REGISTERED[runtime]}@champion", champions.server.uri, log) as url:
        yield Served(runtime, url, REGISTERED[runtime])


def create(served: Served, **request):
    return served.client().chat.completions.create(
        model=served.model_id, **({"messages": PARIS, "temperature": 0, "max_tokens": 40} | request)
    )


def test_parse_with_a_pydantic_model_returns_a_valid_object(served: Served) -> None:
    answer = served.client().chat.completions.parse(
        model=served.model_id, messages=PARIS, response_format=Weather, temperature=0,
        max_tokens=40,
    )  # fmt: skip
    choice = answer.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Weather), choice.message.content


def test_langchain_with_structured_output_returns_a_valid_object(served: Served) -> None:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=f"{served.url}/v1", api_key="unused", model=served.model_id,
                      temperature=0, max_tokens=40, max_retries=0)  # fmt: skip
    weather = chat.with_structured_output(Weather).invoke("What is the weather in Paris?")
    assert isinstance(weather, Weather)


def test_json_mode_answers_parse_whole_and_streamed(served: Served) -> None:
    question = [{"role": "user", "content": "Describe a cat as a JSON object with name and age."}]
    whole = create(served, messages=question, response_format={"type": "json_object"})
    assert whole.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(whole.choices[0].message.content), dict)
    chunks = create(served, messages=question, response_format={"type": "json_object"},
                    stream=True)  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content


def test_a_schema_the_engine_cannot_compile_is_a_400(served: Served) -> None:
    schema = {"type": "string", "pattern": "(?<=a)b"}
    response_format = {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}
    with pytest.raises(openai.BadRequestError) as raised:
        create(served, response_format=response_format)
    assert raised.value.body["param"] == "response_format.json_schema.schema"
    assert "look-around" in raised.value.body["message"]


def asked(served: Served, stream: bool, **request) -> tuple[dict, str, int]:
    """(the assistant message as a client puts it together, finish reason, prompt tokens)."""
    if not stream:
        answer = create(served, **request)
        choice = answer.choices[0]
        message = choice.message.model_dump(exclude_none=True)
        return message, choice.finish_reason, answer.usage.prompt_tokens
    content, calls, finish, prompt_tokens = "", {}, None, 0
    for chunk in create(served, stream=True, stream_options={"include_usage": True}, **request):
        if chunk.usage:
            prompt_tokens = chunk.usage.prompt_tokens
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for piece in choice.delta.tool_calls or ():
            call = calls.setdefault(piece.index, {"id": piece.id, "type": piece.type,
                                                  "function": {"name": piece.function.name,
                                                               "arguments": ""}})  # fmt: skip
            call["function"]["arguments"] += piece.function.arguments or ""
        finish = choice.finish_reason or finish
    message = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = list(calls.values())
    return message, finish, prompt_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_tool_round_trip_calls_takes_the_result_and_answers(served: Served, stream) -> None:
    message, finish, asked_tokens = asked(served, stream, tools=TOOLS, tool_choice="required")
    assert finish == "tool_calls" and message.get("content") is None
    (call,) = message["tool_calls"]
    assert call["id"].startswith("call_") and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    result = {"role": "tool", "tool_call_id": call["id"], "content": RESULT}
    answer, finish, answered_tokens = asked(served, stream, messages=[*PARIS, message, result],
                                           tools=TOOLS)  # fmt: skip
    assert answered_tokens > asked_tokens + 15  # the call and its result are in the prompt
    assert finish in ("stop", "length") and "tool_calls" not in answer
    assert answer["content"] and not answer["content"].startswith("<")


def test_required_always_calls_a_declared_function_with_valid_arguments(served: Served) -> None:
    """Sampled hot (temperature 1.5), three choices of two questions: every one a call."""
    declared = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
    for question in ("What time is it in Tokyo?", "Tell me a joke."):
        answer = create(served, messages=[{"role": "user", "content": question}], tools=TOOLS,
                        tool_choice="required", temperature=1.5, n=3, max_tokens=60)  # fmt: skip
        for choice in answer.choices:  # the longest call the schema allows fits in 60 tokens
            assert choice.finish_reason == "tool_calls"
            (call,) = choice.message.tool_calls
            jsonschema.validate(json.loads(call.function.arguments), declared[call.function.name])
