"""The OpenAI-compatible server's own request checks (steps/serving/openai_api.py, and
steps/serving/structured.py's for structured outputs and tools) and the stop-string scanner both
runtimes share (steps/serving/chat_protocol.py): each bad request is named in one short sentence
with the field it concerns, never MLflow's schema dump. The server itself, over HTTP with the
official client, is in test_openai_server.py."""

from __future__ import annotations

import pytest

from steps.serving.chat_protocol import RequestError, StopScanner
from steps.serving.openai_api import ChatRequest, CompletionRequest, parse

HELLO = [{"role": "user", "content": "Hello"}]


def chat(**fields) -> dict:
    return {"model": "m", "messages": HELLO} | fields


def test_a_chat_request_becomes_one_model_request_per_choice() -> None:
    parsed = parse(
        ChatRequest,
        chat(
            messages=[
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text",
                                                                                "text": "there"}]},
            ],
            max_completion_tokens=5, temperature=0, stop="\n", n=2,
        ),
    )  # fmt: skip
    turns = parsed.requests(parsed.plan())
    assert (
        turns
        == [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi there"},
                ],
                "max_tokens": 5,
                "temperature": 0,
                "stop": ["\n"],
            }
        ]
        * 2
    )


def test_a_completion_request_with_several_prompts_asks_each_n_times() -> None:
    parsed = parse(CompletionRequest, {"model": "m", "prompt": ["a", "b"], "n": 2})
    assert [turn["prompt"] for turn in parsed.requests(parsed.plan())] == ["a", "a", "b", "b"]


def test_fields_the_model_cannot_honour_are_accepted_only_when_they_ask_for_nothing() -> None:
    neutral = chat(tools=[], logprobs=False, frequency_penalty=0, response_format={"type": "text"},
                   user="alice", seed=None)  # fmt: skip
    parsed = parse(ChatRequest, neutral)
    assert parsed.requests(parsed.plan())[0]["messages"] == HELLO
    completion = {"model": "m", "prompt": "a", "tools": [], "response_format": {"type": "text"}}
    assert parse(CompletionRequest, completion).prompt == "a"


BAD = {
    "negative temperature": (chat(temperature=-1), "temperature", "greater than or equal to 0"),
    "content not a string": (
        chat(messages=[{"role": "user", "content": 42}]),
        "messages[0].content",
        "42",
    ),
    "no messages": (chat(messages=[]), "messages", "at least 1"),
    "unknown role": (
        chat(messages=[{"role": "wizard", "content": "hi"}]),
        "messages[0].role",
        "wizard",
    ),
    "logprobs": (chat(logprobs=True), "logprobs", "not supported"),
    "unknown field": (chat(colour="red"), "colour", "not a field"),
    "too many stops": (chat(stop=list("abcde")), "stop", "at most 4"),
    "too many choices": (chat(n=9), "n", "less than or equal to 8"),
    "zero max_tokens": (chat(max_tokens=0), "max_tokens", "greater than or equal to 1"),
    "temperature as a string": (chat(temperature="hot"), "temperature", "'hot'"),
    "no model": ({"messages": HELLO}, "model", "required"),
    "two different limits": (chat(max_tokens=4, max_completion_tokens=8), "max_tokens", "not both"),
}
# Structured outputs and tools (steps/serving/structured.py).
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": CITY}}
OPEN = {"type": "object", "properties": {"a": {"type": "string"}}}
ANSWER = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": "{}"},
}


def schema_format(schema, strict=False) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "w", "schema": schema, "strict": strict}}


BAD |= {
    "unknown response_format type": (
        chat(response_format={"type": "xml"}), "response_format.type", "json_schema, got 'xml'"),
    "a schema that is not JSON Schema": (
        chat(response_format=schema_format({"type": "bogus"})),
        "response_format.json_schema.schema", "is not JSON Schema ($.type"),
    "a schema the grammar engine cannot compile": (
        chat(response_format=schema_format({"type": "string", "pattern": "(?<=a)b"})),
        "response_format.json_schema.schema", "look-around"),
    "a strict schema with an open object": (
        chat(response_format=schema_format({"type": "object", "properties": {"o": OPEN}} | {
            "required": ["o"], "additionalProperties": False}, strict=True)),
        "response_format.json_schema.schema", "($.properties.o does not)"),
    "a schema without a name": (
        chat(response_format={"type": "json_schema", "json_schema": {"schema": CITY}}),
        "response_format.json_schema.name", "letters, digits"),
    "a tool declared twice": (
        chat(tools=[WEATHER, WEATHER]), "tools[1].function.name", "declared twice"),
    "a tool with an invalid parameter schema": (
        chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"minLength": -1}}}}}]),
        "tools[0].function.parameters", "-1 is less than the minimum of 0"),
    "a tool whose parameters are no object": (
        chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {
            "type": "string"}}}]),
        "tools[0].function.parameters", "must describe an object"),
    "tool_choice naming an undeclared function": (
        chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "f"}}),
        "tool_choice", "'f', which is not among the declared tools (get_weather)"),
    "tool_choice without tools": (chat(tool_choice="required"), "tool_choice", "needs `tools`"),
    "an unknown tool_choice": (chat(tools=[WEATHER], tool_choice="always"), "tool_choice",
                               "auto, none, required"),
    "a tool_choice function that is no object": (
        chat(tools=[WEATHER], tool_choice={"type": "function", "function": "get_weather"}),
        "tool_choice", '{"type": "function", "function": {"name": ...}}'),
    "a tool result that answers no call": (
        chat(messages=[{"role": "user", "content": "Hi"},
                       {"role": "assistant", "tool_calls": [ANSWER]},
                       {"role": "tool", "tool_call_id": "call_2", "content": "1"}]),
        "messages[2].tool_call_id", "'call_2' answers no call"),
    "a tool message without its call id": (
        chat(messages=[{"role": "tool", "content": "1"}]), "messages[0]", "needs tool_call_id"),
    "tool calls on a user message": (
        chat(messages=[{"role": "user", "content": "Hi", "tool_calls": [ANSWER]}]),
        "messages[0]", "only an assistant message"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_request_is_named_in_one_short_sentence(case: str) -> None:
    body, param, says = BAD[case]
    with pytest.raises(RequestError) as raised:
        parsed = parse(ChatRequest, body)
        parsed.requests(parsed.plan())
    message = str(raised.value)
    assert raised.value.status == 400
    assert raised.value.param == param
    assert says in message and f"`{param}" in message, message
    assert "\n" not in message and len(message) < 220, message


def test_structured_outputs_and_tools_are_the_chat_routes_alone() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    with pytest.raises(RequestError, match="`tools` is not supported") as raised:
        parse(CompletionRequest, {"model": "m", "prompt": "a", "tools": tools})
    assert raised.value.param == "tools"


def test_a_body_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(RequestError, match="JSON object"):
        parse(ChatRequest, ["hello"])


def test_the_stop_scanner_holds_back_what_may_start_a_stop_string() -> None:
    scanner = StopScanner(("END",))
    assert scanner.add("Hello E") == ("Hello", False)  # " E": its last two may start END
    assert scanner.add("N") == (" ", False)
    assert scanner.add("Dless") == ("", True)
    plain = StopScanner(())
    assert plain.add("abc") == ("abc", False)
    assert plain.rest() == ""


def test_the_stop_scanner_gives_back_held_text_when_the_answer_ends() -> None:
    scanner = StopScanner(("\n\n",))
    assert scanner.add("one\n") == ("one", False)
    assert scanner.rest() == "\n"


def test_a_draining_server_answers_503_to_health_and_new_requests() -> None:
    from fastapi.testclient import TestClient

    from steps.serving.follow import Holder
    from steps.serving.openai_api import DRAINING, create_app

    app, api = create_app(Holder())
    with TestClient(app) as http:
        assert http.get("/health").json()["error"]["message"] == "the model is still loading"
        api.drain()
        for reply in (http.get("/health"), http.post("/v1/chat/completions", json=chat())):
            assert reply.status_code == 503
            assert reply.json()["error"]["message"] == DRAINING


def test_keys_come_from_flags_files_and_the_environment_and_bad_ones_are_named(tmp_path) -> None:
    from steps.errors import ConfigError
    from steps.serving.api_keys import ENV_VAR, ApiKeys, load_keys

    keys_file = tmp_path / "keys"
    keys_file.write_text("# comment\nsk-file\n")
    keys = ApiKeys(load_keys(["sk-flag"], [keys_file], {ENV_VAR: "sk-env-1, sk-env-2"}))
    for key in ("sk-flag", "sk-file", "sk-env-1", "sk-env-2"):
        assert keys.problem("/v1/models", f"Bearer {key}") is None
    assert keys.problem("/health", None) is None
    assert "send it as `Authorization: Bearer <key>`" in keys.problem("/v1/models", None)
    assert keys.problem("/metrics", "Bearer sk-nope") == "the API key is not valid for this server"
    assert not ApiKeys(load_keys([], [], {})).required
    (tmp_path / "empty").write_text("# none yet\n")
    for args, says in (
        (([], [tmp_path / "missing"]), "cannot be read"),
        (([], [tmp_path / "empty"]), "holds no key"),
        ((["sk a"], []), "is empty or holds a space"),
    ):
        with pytest.raises(ConfigError, match=says):
            load_keys(*args, {})
