"""Structured outputs and tool calls for the OpenAI-compatible server: what `response_format`,
`tools`, `tool_choice` and a conversation's tool turns ask, checked once, and turned into the
three things both runtimes need: the conversation as the chat templates take it, one Lark
grammar that constrains decoding (llguidance's dialect: onnxruntime-genai's
`TurnOptions.set_guidance("lark_grammar", ...)` and the transformers runtime's llguidance logits
mask read the same text), and a reader that turns the generated text back into the API's
`content` and `tool_calls`.

How tools are presented (one format for every model, since the bundled model's template has no
tool format and the templates that have one disagree): a system message lists the declared
functions as JSON and says how to call one; a call is the whole answer, written
`<tool_call>{"name": NAME, "arguments": ARGUMENTS}</tool_call>` (the format Hermes and Qwen were
trained on), its name one of the declared ones and its arguments valid against that function's
parameter schema, both held by the grammar; an assistant turn's earlier calls go back into the
prompt in that form, and `role: tool` results as a user turn of `<tool_response>` blocks. An
answer makes at most one call: a 135M model allowed several repeats its call until the token
limit.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from steps.serving.chat_protocol import RequestError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
# The JSON the grammar allows is laid out as json.dumps writes it: a free layout lets a small
# model drift into endless whitespace, and a compact one made the bundled model answer "".
JSON_LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
TOOL_CHOICES = ("auto", "none", "required")
TOOLS_PROMPT = (
    "You can call functions. To call one, answer with nothing but\n"
    f'{CALL_OPEN}{{"name": <function name>, "arguments": <arguments as a JSON object>}}'
    f"{CALL_CLOSE}\n"
    "and the function's result comes back in a <tool_response> block. The functions:"
)


@dataclass(frozen=True)
class Tool:
    """A declared function: its name, what it does, and its parameters' JSON Schema."""

    name: str
    description: str
    parameters: dict[str, Any]

    @property
    def call_start(self) -> str:
        """What the generated text of a call to this function starts with, up to its arguments."""
        return f'{CALL_OPEN}{{"name": {json.dumps(self.name)}, "arguments": '

    def listing(self) -> str:
        return json.dumps(
            {"name": self.name, "description": self.description, "parameters": self.parameters}
        )


@dataclass(frozen=True)
class Plan:
    """What one chat request asks beyond text: the grammar its answer is held to (None: free
    text), the functions presented to the model, and those its answer may call."""

    grammar: str | None = None
    presented: tuple[Tool, ...] = ()
    callable: tuple[Tool, ...] = ()

    @property
    def field(self) -> str:
        """The request field the grammar answers: where a refusal of it points."""
        return "tools" if self.callable else "response_format"


def plan(body: dict[str, Any]) -> Plan:
    """The request body's `response_format`, `tools` and `tool_choice`, checked (its
    `parallel_tool_calls` changes nothing: one call at most); raises RequestError naming the
    first problem, with `param` set."""
    answer = _answer_schema(body.get("response_format"))
    tools = _tools(body.get("tools"))
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none") and not tools:
        raise RequestError("`tool_choice` needs `tools` to choose from", param="tool_choice")
    callable_ = _chosen(tools, "auto" if choice is None else choice)
    rules = []
    if callable_:
        end = _literal("}" + CALL_CLOSE)
        calls = " | ".join(
            f"{_literal(tool.call_start)} {_json_rule(tool.parameters)} {end}" for tool in callable_
        )
        rules.append(f"call: {calls}")
    if answer is not None:
        rules.append(f"answer: {_json_rule(answer)}")
    elif callable_:
        # A text answer cannot start like a call, so "<" opens calls only.
        rules.append(r"answer: /[^<][^\x00]*/")
    presented = () if choice == "none" else tools
    if not rules:
        return Plan(presented=presented)
    required = choice not in (None, "auto")
    start = "answer" if not callable_ else "call" if required else "call | answer"
    return Plan("\n".join([f"start: {start}", *rules]), presented, callable_)


def _answer_schema(response_format: Any) -> dict[str, Any] | None:
    """The JSON Schema a text answer is held to, or None for free text."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or response_format.get("type") not in RESPONSE_FORMATS:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        raise RequestError(
            f"`response_format.type` must be one of {', '.join(RESPONSE_FORMATS)}, got {kind!r}",
            param="response_format.type",
        )
    kind = response_format["type"]
    extra = set(response_format) - {"type", "json_schema"}
    if extra or (kind != "json_schema" and "json_schema" in response_format):
        field = sorted(extra)[0] if extra else "json_schema"
        raise RequestError(
            f"`response_format.{field}` is not a field of a {kind} response format",
            param=f"response_format.{field}",
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    spec = response_format.get("json_schema")
    param = "response_format.json_schema"
    if not isinstance(spec, dict):
        raise RequestError(f"`{param}` must be an object with a name and a schema", param=param)
    unknown = set(spec) - {"name", "description", "schema", "strict"}
    if unknown:
        raise RequestError(f"`{param}.{sorted(unknown)[0]}` is not a field of it", param=param)
    _check_name(spec.get("name"), f"{param}.name")
    schema = spec.get("schema", {})
    _check_schema(schema, f"{param}.schema", strict=spec.get("strict") is True)
    return schema


def _tools(tools: Any) -> tuple[Tool, ...]:
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise RequestError("`tools` must be a list of function tools", param="tools")
    declared: dict[str, Tool] = {}
    for index, tool in enumerate(tools):
        param = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise RequestError(f'`{param}.type` must be "function"', param=f"{param}.type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise RequestError(f"`{param}.function` must be an object", param=f"{param}.function")
        name = function.get("name")
        _check_name(name, f"{param}.function.name")
        if name in declared:
            raise RequestError(
                f"`{param}.function.name` {name!r} is declared twice; give each tool its own name",
                param=f"{param}.function.name",
            )
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        _check_schema(parameters, f"{param}.function.parameters", function.get("strict") is True)
        if parameters.get("type", "object") != "object":
            raise RequestError(
                f"`{param}.function.parameters` must describe an object (the arguments)",
                param=f"{param}.function.parameters",
            )
        declared[name] = Tool(name, str(function.get("description", "")), parameters)
    return tuple(declared.values())


def _check_name(name: Any, param: str) -> None:
    """A schema's or a function's name, as OpenAI allows them."""
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        raise RequestError(
            f"`{param}` must be 1 to 64 letters, digits, _ or -, got {name!r}", param=param
        )


def _chosen(tools: tuple[Tool, ...], choice: Any) -> tuple[Tool, ...]:
    """The tools the answer may call under `tool_choice`."""
    if choice in ("auto", "required"):
        return tools
    if choice == "none":
        return ()
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or choice.get("type") != "function":
        raise RequestError(
            f"`tool_choice` must be one of {', '.join(TOOL_CHOICES)} or "
            '{"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    named = [tool for tool in tools if tool.name == name]
    if not named:
        declared = ", ".join(tool.name for tool in tools)
        raise RequestError(
            f"`tool_choice` names {name!r}, which is not among the declared tools ({declared})",
            param="tool_choice",
        )
    return tuple(named)


def _check_schema(schema: Any, param: str, strict: bool) -> None:
    """A JSON Schema (by its meta-schema), and under `strict` one in OpenAI's strict subset:
    every object closed (`additionalProperties: false`) with all its properties required."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    if not isinstance(schema, dict):
        raise RequestError(f"`{param}` must be a JSON Schema object", param=param)
    problem = best_match(Draft202012Validator(Draft202012Validator.META_SCHEMA).iter_errors(schema))
    if problem is not None:
        raise RequestError(
            f"`{param}` is not JSON Schema ({problem.json_path}: {problem.message})", param=param
        )
    if strict and (open_object := _open_object(schema, "$")) is not None:
        raise RequestError(
            f"`{param}` is strict, so its objects must set additionalProperties to false and "
            f"list every property in required ({open_object} does not)",
            param=param,
        )
    _compile(f"start: {_json_rule(schema)}", param)


def _open_object(schema: Any, path: str) -> str | None:
    """The path of the first object schema strict mode refuses, or None."""
    if isinstance(schema, list):
        for index, item in enumerate(schema):
            if (found := _open_object(item, f"{path}[{index}]")) is not None:
                return found
        return None
    if not isinstance(schema, dict):
        return None
    if schema.get("type") == "object" or "properties" in schema:
        properties = schema.get("properties", {})
        closed = schema.get("additionalProperties") is False
        if not closed or set(schema.get("required", [])) != set(properties):
            return path
    for key in ("properties", "$defs", "definitions"):
        for name, child in schema.get(key, {}).items():
            if (found := _open_object(child, f"{path}.{key}.{name}")) is not None:
                return found
    for key in ("items", "anyOf", "oneOf", "allOf"):
        if (found := _open_object(schema.get(key), f"{path}.{key}")) is not None:
            return found
    return None


def _json_rule(schema: dict[str, Any]) -> str:
    return f"%json {json.dumps(schema | {'x-guidance': JSON_LAYOUT})}"


def _literal(text: str) -> str:
    return json.dumps(text)


def _compile(grammar: str, param: str) -> None:
    """Refuse (400) a grammar the engine cannot compile, naming the part it rejects."""
    if error := _grammar_error(grammar):
        raise RequestError(f"`{param}` cannot be compiled for constrained decoding: {error}",
                           param=param)  # fmt: skip


@lru_cache(maxsize=256)  # clients send the same schema request after request
def _grammar_error(grammar: str) -> str:
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(llguidance.grammar_from("lark", grammar))
    # Its message echoes the grammar under the failing line with a caret: keep the words only.
    words = [
        line.strip()
        for line in error.splitlines()
        if line.strip() and not re.match(r"\s*\d+ \|", line) and set(line.strip()) != {"^"}
    ]
    said = " ".join(words)
    return re.sub(r"^at \d+\(\d+\): (failed to compile JSON schema: )?", "", said)


# -- the conversation -------------------------------------------------------------------------


def conversation(messages: list[dict[str, Any]], presented: Iterable[Tool]) -> list[dict[str, str]]:
    """The messages as the chat templates take them ({role, content}): earlier calls written
    back as the model writes them, tool results as a user turn (consecutive ones together), and
    the presented tools in the system prompt. Raises RequestError for a tool result that answers
    no earlier call."""
    calls: dict[str, str] = {}  # call id -> function name
    out: list[dict[str, str]] = []
    for index, message in enumerate(messages):
        role, content = message["role"], message.get("content")
        if role == "assistant" and message.get("tool_calls"):
            written = []
            for call in message["tool_calls"]:
                calls[call["id"]] = call["function"]["name"]
                written.append(_written_call(call, f"messages[{index}].tool_calls"))
            out.append({"role": "assistant", "content": (content or "") + "".join(written)})
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in calls:
                raise RequestError(
                    f"`messages[{index}].tool_call_id` {call_id!r} answers no call of an earlier "
                    "assistant message; give the id of the call it answers",
                    param=f"messages[{index}].tool_call_id",
                )
            result = json.dumps({"name": calls[call_id], "content": content})
            block = f"<tool_response>\n{result}\n</tool_response>"
            if index and messages[index - 1]["role"] == "tool":
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
        else:
            out.append({"role": role, "content": content})
    presented = list(presented)
    if presented:
        listing = "\n".join([TOOLS_PROMPT, *(tool.listing() for tool in presented)])
        if out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{listing}"}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out


def _written_call(call: dict[str, Any], param: str) -> str:
    try:
        arguments = json.loads(call["function"]["arguments"] or "{}")
    except json.JSONDecodeError as error:
        raise RequestError(f"`{param}`: arguments are not JSON: {error}", param=param) from None
    body = json.dumps({"name": call["function"]["name"], "arguments": arguments})
    return f"{CALL_OPEN}{body}{CALL_CLOSE}"


# -- the answer -------------------------------------------------------------------------------


class CallReader:
    """One choice's generated text as the API's message deltas, as it arrives: plain text as
    `content`; a call as a first `tool_calls` delta with its id and name (once the name is
    read), then its arguments in pieces (text that may be the call's closing is held back)."""

    def __init__(self, callable_: Iterable[Tool]):
        self._starts = {tool.call_start: tool.name for tool in callable_}
        self._end = "}" + CALL_CLOSE
        self._unread = ""
        self._state = "start"  # start -> content | name -> arguments -> called (at finish)
        self.content: str | None = None
        self.call: dict[str, Any] | None = None

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._unread += text
        if self._state == "start" and self._unread:
            self._state = "name" if self._unread[0] == "<" else "content"
        if self._state == "content":
            return self._say(self._take(len(self._unread)))
        if self._state == "name":
            start = next((s for s in self._starts if self._unread.startswith(s)), None)
            if start is None:
                return []
            self._take(len(start))
            self._state = "arguments"
            self.call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                         "function": {"name": self._starts[start], "arguments": ""}}  # fmt: skip
            first = {"index": 0, **self.call, "function": dict(self.call["function"])}
            return [{"tool_calls": [first]}, *self._arguments()]
        return self._arguments()

    def finish(self, reason: str) -> tuple[list[dict[str, Any]], str]:
        """The deltas of the text held back, and the choice's finish reason: `tool_calls` for
        an answer that made a whole call."""
        if self._state in ("start", "name"):  # cut off before a call's name: say what it was
            deltas = self._say(self._take(len(self._unread)))
        elif self._state == "arguments" and self._unread == self._end:
            deltas, self._unread, self._state = [], "", "called"
        elif self._state == "arguments":  # cut off inside its arguments
            deltas = self._argument(self._take(len(self._unread)))
        else:  # content: said as it came
            deltas = []
        return deltas, "tool_calls" if self._state == "called" and reason == "stop" else reason

    def message(self) -> dict[str, Any]:
        """The whole message the deltas make."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.call is not None:
            message["tool_calls"] = [self.call]
        return message

    def _arguments(self) -> list[dict[str, Any]]:
        # The grammar ends a call's text with its closing, which a string argument may also
        # hold: only the last characters can be the closing, so they wait for finish().
        return self._argument(self._take(max(0, len(self._unread) - len(self._end))))

    def _argument(self, piece: str) -> list[dict[str, Any]]:
        if not piece or self.call is None:
            return []
        self.call["function"]["arguments"] += piece
        return [{"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}]

    def _say(self, piece: str) -> list[dict[str, Any]]:
        if not piece:
            return []
        self.content = (self.content or "") + piece
        return [{"content": piece}]

    def _take(self, length: int) -> str:
        taken, self._unread = self._unread[:length], self._unread[length:]
        return taken
