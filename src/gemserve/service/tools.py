"""Function calling: the request's tools and tool config checked into a `ToolPlan`, and the model's output read
back as text and function calls.

Modes, as the Gemini API defines them: AUTO (the default) lets the model answer in text or call functions; ANY
makes it call one of the allowed functions; NONE never calls; VALIDATED is AUTO with every call checked against
its schema, which constrained decoding does for AUTO anyway. The calls themselves are written in the tool format
of docs/function-calling.md (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`), and a call the model
starts is completed under its function's schema by the grammar (`service/constraints.py`).

Not here: how tools are shown to the model (`models/chat_format.py`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from gemserve.errors import invalid_argument
from gemserve.schema.content import FunctionDeclaration, GenerateContentRequest
from gemserve.service.schemas import to_json_schema

FUNCTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,63}$")
MAX_FUNCTIONS = 512
CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
_UNAVAILABLE_TOOLS = {
    "google_search": "googleSearch", "google_search_retrieval": "googleSearchRetrieval", "url_context": "urlContext",
}


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON Schema of the arguments object


@dataclass(frozen=True)
class ToolPlan:
    functions: tuple[Function, ...]
    mode: str  # AUTO, ANY, NONE or VALIDATED
    allowed: tuple[str, ...]  # the functions a call may name

    @property
    def may_call(self) -> bool:
        return self.mode != "NONE" and bool(self.allowed)

    def template_tools(self) -> list[dict[str, Any]]:
        """The declarations as chat templates take them (OpenAI-style function tools)."""
        return [{"type": "function", "function": {"name": f.name, "description": f.description,
                                                  "parameters": f.parameters}} for f in self.functions]

    def arguments_schema(self, name: str) -> dict[str, Any]:
        return next(f.parameters for f in self.functions if f.name == name)


def tool_plan(request: GenerateContentRequest) -> ToolPlan | None:
    """The request's function tools, checked; None when it declares none."""
    functions: list[Function] = []
    for i, tool in enumerate(request.tools or []):
        for attr, wire in _UNAVAILABLE_TOOLS.items():
            if getattr(tool, attr) is not None:
                raise invalid_argument(f"tools[{i}].{attr}: the {wire} tool is not available on this server: it "
                                       "needs Google's search and web services. Use function declarations and "
                                       "run the search yourself.", f"tools[{i}].{attr}")
        for j, declaration in enumerate(tool.function_declarations or []):
            functions.append(_function(declaration, f"tools[{i}].function_declarations[{j}]"))
    names = [f.name for f in functions]
    for name in names:
        if names.count(name) > 1:
            raise invalid_argument(f"tools: duplicate function declaration found: {name}.", "tools")
    if len(functions) > MAX_FUNCTIONS:
        raise invalid_argument(f"tools: at most {MAX_FUNCTIONS} function declarations are allowed.", "tools")
    config = request.tool_config.function_calling_config if request.tool_config else None
    mode = (config.mode if config else None) or "AUTO"
    if mode == "MODE_UNSPECIFIED":
        mode = "AUTO"
    allowed = list(config.allowed_function_names or []) if config else []
    field = "tool_config.function_calling_config.allowed_function_names"
    if allowed and mode != "ANY":
        raise invalid_argument(f"{field}: allowed_function_names may only be set when the mode is ANY.", field)
    for name in allowed:
        if name not in names:
            raise invalid_argument(f"{field}: {name!r} is not among the declared functions.", field)
    if not functions:
        if mode == "ANY":
            raise invalid_argument("tool_config.function_calling_config.mode: mode ANY needs at least one "
                                   "function declaration in tools.", "tool_config.function_calling_config.mode")
        return None
    return ToolPlan(tuple(functions), mode, tuple(allowed or names))


def _function(declaration: FunctionDeclaration, field: str) -> Function:
    name = declaration.name or ""
    if not FUNCTION_NAME.fullmatch(name):
        raise invalid_argument(f"{field}.name: Invalid function name {name!r}. Must start with a letter or an "
                               "underscore, and contain only a-z, A-Z, 0-9, underscores, dots, colons and dashes, "
                               "with a maximum length of 64.", f"{field}.name")
    if declaration.parameters is not None and declaration.parameters_json_schema is not None:
        raise invalid_argument(f"{field}: parameters and parameters_json_schema are mutually exclusive.",
                               f"{field}.parameters")
    # A function declared without parameters takes none: its arguments are an empty object.
    parameters: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
    if declaration.parameters is not None:
        kind = declaration.parameters.type
        if kind not in (None, "TYPE_UNSPECIFIED", "OBJECT"):
            raise invalid_argument(f"{field}.parameters.type: function parameters must be of type OBJECT, not "
                                   f"{kind}.", f"{field}.parameters.type")
        parameters = to_json_schema(declaration.parameters, f"{field}.parameters")
        parameters.setdefault("type", "object")
        parameters.setdefault("properties", {})
    elif declaration.parameters_json_schema is not None:
        raw = declaration.parameters_json_schema
        if not isinstance(raw, dict) or raw.get("type", "object") != "object":
            raise invalid_argument(f"{field}.parameters_json_schema: must be a JSON Schema of an object.",
                                   f"{field}.parameters_json_schema")
        parameters = raw
    return Function(name, declaration.description or "", parameters)


def call_key(name: str, args: dict[str, Any]) -> str:
    """A call's identity: its name and arguments, key order aside and numbers by value (clients built on protobuf's
    Struct, google-generativeai among them, send a call's 17 back as 17.0)."""
    return json.dumps([name, _by_value(args)], sort_keys=True, ensure_ascii=False)


def _by_value(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _by_value(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_by_value(item) for item in value]
    return value


def answered_calls(request: GenerateContentRequest) -> frozenset[str]:
    """The calls of the current exchange whose results the conversation holds: the model's calls since the user
    last wrote text, when function responses follow them."""
    keys: set[str] = set()
    answered = False
    for content in reversed(request.contents):
        if any(part.text for part in content.parts) and content.role != "model":
            break
        for part in content.parts:
            if part.function_response is not None:
                answered = True
            elif part.function_call is not None and answered and part.function_call.name:
                keys.add(call_key(part.function_call.name, dict(part.function_call.args or {})))
    return frozenset(keys)


@dataclass(frozen=True)
class CallPart:
    name: str
    args: dict[str, Any]


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class MalformedCall:
    text: str


OutputPart = TextPart | CallPart | MalformedCall


class CallReader:
    """Splits a model's streamed output into text and function calls. Text goes out as it becomes final; a call
    goes out whole once its JSON and closing tag have arrived. Whitespace around calls is dropped.

    With `bare`, output that begins with "{" (or a code block holding one) is read as calls written as bare JSON
    objects, one after another: the grammar makes every such output a call when the answer is free text, and no
    text answer begins so."""

    def __init__(self, bare: bool = True) -> None:
        self._pending = ""
        self._in_call = False
        self._after_call = False
        self._bare: bool | None = None if bare else False  # None: not decided yet

    def push(self, text: str) -> list[OutputPart]:
        self._pending += text
        return list(self._parts(final=False))

    def finish(self) -> list[OutputPart]:
        parts = list(self._parts(final=True))
        if (self._in_call or self._bare) and self._pending.strip():
            parts.append(MalformedCall(self._pending))
        elif self._pending.strip():
            parts.append(TextPart(self._pending.rstrip() if self._after_call else self._pending))
        self._pending = ""
        return parts

    def _parts(self, final: bool) -> Iterator[OutputPart]:
        if self._bare is None:
            self._bare = _bare_start(self._pending, final)
            if self._bare is None:
                return
        if self._bare:
            yield from self._bare_calls()
            return
        while True:
            if self._in_call:
                call = self._tagged_call(final)
                if call is None:
                    return
                yield call
                continue
            start = self._pending.find(CALL_OPEN)
            if start >= 0:
                text, self._pending = self._pending[:start], self._pending[start + len(CALL_OPEN):]
                if text.strip():
                    yield TextPart(text.rstrip())
                self._in_call = True
                continue
            if self._after_call:
                self._pending = self._pending.lstrip()
            keep = 0 if final else _partial_tag(self._pending)
            cut = len(self._pending) - keep
            # Trailing whitespace waits too: a call may follow it, and then it is dropped.
            if not final:
                cut = len(self._pending[:cut].rstrip())
            if cut > 0:
                yield TextPart(self._pending[:cut])
                self._after_call = False
                self._pending = self._pending[cut:]
            return

    def _tagged_call(self, final: bool) -> OutputPart | None:
        """The call after an opening tag: its JSON (which may hold the closing tag in a string), then the closing
        tag. None while it has not arrived whole (at the end, what is left is a malformed call)."""
        text = self._pending.lstrip()
        try:
            value, end = json.JSONDecoder().raw_decode(text)
        except ValueError:
            return None
        rest = text[end:].lstrip()
        if not rest.startswith(CALL_CLOSE):
            if not final and CALL_CLOSE.startswith(rest):
                return None
            self._in_call = False
            self._pending = rest
            return MalformedCall(text[:end])
        self._pending = rest[len(CALL_CLOSE):]
        self._in_call = False
        self._after_call = True
        return call_from(value, text[:end])

    def _bare_calls(self) -> Iterator[OutputPart]:
        decoder = json.JSONDecoder()
        while True:
            text = self._pending.lstrip()
            fence = next((f for f in _FENCES if text.startswith(f)), "")
            if not text.removeprefix(fence):
                return
            try:
                value, end = decoder.raw_decode(text, len(fence))
            except ValueError:
                return  # not complete yet
            rest = text[end:]
            if fence:
                closing = rest.lstrip()
                if not closing.startswith("```"):
                    return
                rest = closing[3:]
            self._pending = rest
            yield call_from(value, text[len(fence):end])


_FENCES = ("```json\n", "```\n")


def _bare_start(text: str, final: bool) -> bool | None:
    """Whether output beginning with `text` is a call written without tags; None while it cannot be told."""
    if not text:
        return None if not final else False
    for start in ("{", *(f + "{" for f in _FENCES)):
        if text.startswith(start):
            return True
        if start.startswith(text) and not final:
            return None
    return False


def _partial_tag(text: str) -> int:
    """Length of the end of `text` that could still grow into the opening tag."""
    for size in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if text.endswith(CALL_OPEN[:size]):
            return size
    return 0


def call_from(value: Any, body: str) -> CallPart | MalformedCall:
    """A call from its JSON, `{"name": ..., "arguments": {...}}`; `body` is the JSON as written."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return MalformedCall(body)
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return MalformedCall(body)
    if not isinstance(args, dict):
        return MalformedCall(body)
    return CallPart(value["name"], args)
