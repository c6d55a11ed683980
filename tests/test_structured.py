"""Structured outputs and tools (steps/serving/structured.py) without a model: the grammar each
request becomes, run by llguidance over a byte-level vocabulary (the texts it lets through and
those it stops), the conversation the chat template gets, the reader that turns generated text
into `content` and `tool_calls` piece by piece (its bad requests are in test_openai_requests.py
with the server's other checks). The same rules against real servers of both runtimes:
test_structured_server.py."""

from __future__ import annotations

import json

import llguidance
import pytest

from steps.serving.chat_protocol import RequestError
from steps.serving.structured import CallReader, Plan, conversation, plan

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": CITY}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time"}}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def allows(grammar: str | None, text: str) -> bool:
    """Whether the grammar takes `text` as a whole answer (None: free text, anything goes)."""
    if grammar is None:
        return True
    matcher = llguidance.LLMatcher(
        llguidance.LLTokenizer("byte"), llguidance.grammar_from("lark", grammar), log_level=0
    )
    return matcher.consume_tokens(list(text.encode())) and matcher.is_accepting()


def test_a_json_schema_answer_is_held_to_the_schema_in_json_dumps_layout() -> None:
    schema = {"type": "json_schema", "json_schema": {"name": "w", "schema": CITY}}
    grammar = plan({"response_format": schema}).grammar
    assert allows(grammar, '{"city": "Paris"}')
    assert not allows(grammar, '{"city": 3}')
    assert not allows(grammar, '{"city": "Paris", "extra": 1}')
    assert not allows(grammar, '{"city":"Paris"}')  # the layout json.dumps writes, alone
    assert not allows(grammar, "Paris")


def test_json_mode_takes_any_object_and_text_format_asks_nothing() -> None:
    grammar = plan({"response_format": {"type": "json_object"}}).grammar
    assert allows(grammar, '{"a": [1, 2], "b": {"c": null}}')
    assert not allows(grammar, "[1, 2]")
    assert plan({"response_format": {"type": "text"}}) == Plan()


def test_required_and_named_tool_choices_allow_only_a_call_to_a_declared_function() -> None:
    required = plan({"tools": [WEATHER, TIME], "tool_choice": "required"})
    assert allows(required.grammar, CALL)
    assert allows(required.grammar, '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    assert not allows(required.grammar, "It is sunny.")
    assert not allows(required.grammar, CALL.replace("get_weather", "get_rain"))
    assert not allows(required.grammar, CALL.replace('"Paris"', "7"))
    assert not allows(required.grammar, CALL + "\n" + CALL)  # one call per answer
    get_time = {"type": "function", "function": {"name": "get_time"}}
    named = plan({"tools": [WEATHER, TIME], "tool_choice": get_time})
    assert [tool.name for tool in named.callable] == ["get_time"]
    assert not allows(named.grammar, CALL)
    assert [tool.name for tool in named.presented] == ["get_weather", "get_time"]


def test_auto_allows_a_call_or_text_and_none_presents_no_tools() -> None:
    auto = plan({"tools": [WEATHER]})
    assert allows(auto.grammar, CALL) and allows(auto.grammar, "It is sunny.\nSee you.")
    assert not allows(auto.grammar, "<b>sunny</b>")  # "<" opens a call and nothing else
    with_schema = plan({"tools": [WEATHER], "response_format": {"type": "json_object"}})
    assert allows(with_schema.grammar, CALL) and allows(with_schema.grammar, '{"ok": true}')
    assert not allows(with_schema.grammar, "It is sunny.")
    assert plan({"tools": [WEATHER], "tool_choice": "none"}) == Plan()
    assert plan({"tool_choice": "auto"}) == plan({"tools": [], "tool_choice": "none"}) == Plan()


def test_tools_go_into_the_system_prompt_and_calls_and_results_back_into_the_conversation():
    tools = plan({"tools": [WEATHER]}).presented
    arguments = json.dumps({"city": "Paris"})
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]  # fmt: skip
    said = conversation(messages, tools)
    assert [m["role"] for m in said] == ["system", "user", "assistant", "user"]
    assert said[0]["content"].startswith("Be brief.\n\nYou can call functions.")
    assert '"name": "get_weather"' in said[0]["content"] and '"maxLength": 20' in said[0]["content"]
    assert said[2]["content"] == CALL
    assert said[3]["content"] == (
        '<tool_response>\n{"name": "get_weather", "content": "18 C"}\n</tool_response>\n'
        '<tool_response>\n{"name": "get_weather", "content": "sunny"}\n</tool_response>'
    )
    alone = conversation(messages[1:2], tools)
    assert alone[0]["role"] == "system" and alone[1] == messages[1]


@pytest.mark.parametrize("size", [1, 3, len(CALL)])
def test_the_reader_streams_a_call_as_the_api_does_in_pieces_of_any_size(size: int) -> None:
    tools = plan({"tools": [WEATHER, TIME]}).callable
    reader = CallReader(tools)
    deltas = [d for i in range(0, len(CALL), size) for d in reader.feed(CALL[i : i + size])]
    held, finish = reader.finish("stop")
    deltas += held
    first = deltas[0]["tool_calls"][0]
    assert first["index"] == 0 and first["type"] == "function"
    assert first["id"].startswith("call_") and first["function"] == {"name": "get_weather",
                                                                     "arguments": ""}  # fmt: skip
    pieces = [d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:]]
    assert "".join(pieces) == '{"city": "Paris"}'
    assert all("</tool_call>" not in piece and piece for piece in pieces)
    assert finish == "tool_calls"
    message = reader.message()
    assert message["content"] is None and message["tool_calls"][0]["id"] == first["id"]


def test_the_reader_keeps_a_string_argument_that_holds_the_calls_closing() -> None:
    reader = CallReader(plan({"tools": [WEATHER]}).callable)
    arguments = '{"city": "a}</tool_call>b"}'
    for character in CALL.replace('{"city": "Paris"}', arguments):
        reader.feed(character)
    assert reader.finish("stop")[1] == "tool_calls"
    assert reader.message()["tool_calls"][0]["function"]["arguments"] == arguments


def test_the_reader_passes_text_through_and_a_cut_call_keeps_its_finish_reason() -> None:
    reader = CallReader(plan({"tools": [WEATHER]}).callable)
    assert reader.feed("It is ") == [{"content": "It is "}]
    assert reader.feed("sunny") == [{"content": "sunny"}]
    assert reader.finish("stop") == ([], "stop")
    assert reader.message() == {"role": "assistant", "content": "It is sunny"}
    cut = CallReader(plan({"tools": [WEATHER]}).callable)
    cut.feed(CALL[:60])
    _, finish = cut.finish("length")
    assert (
        finish == "length"
        and cut.message()["tool_calls"][0]["function"]["arguments"]
        == (CALL[CALL.index('{"city') : 60])
    )


def test_an_onnx_model_logged_before_its_engine_held_grammars_refuses_them() -> None:
    """A model version's own shipped engine serves it: one from before set_guidance would
    ignore the grammar and answer unconstrained, so the server refuses instead."""
    from steps.serving.chat_protocol import CheckedRequest, Options
    from steps.serving.served_models import OnnxServed

    class ShippedBefore:  # what such a model's chat model object has: no constrains_decoding
        defaults, context_length = {"max_new_tokens": 8}, 2048

    checked = CheckedRequest([1, 2], Options(8, False, 1.0, 1.0, (), 1), 8)
    with pytest.raises(RequestError, match="wrapped since") as raised:
        OnnxServed(ShippedBefore()).constrain(checked, plan({"tools": [WEATHER]}))
    assert raised.value.param == "tools"
