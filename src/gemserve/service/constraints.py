"""What a request's output must look like, as one llguidance grammar: JSON output, an enum, function calls.

- `responseMimeType: application/json` -> JSON (any object or array), or JSON valid under `responseSchema`
  (Google's Schema, translated by `service/schemas.py`) or `responseJsonSchema` (JSON Schema, as given);
- `text/x.enum` with a STRING schema carrying `enum` -> exactly one of its values;
- tools with mode ANY -> one or more calls of allowed functions, each with arguments valid under its schema;
  mode AUTO/VALIDATED -> the answer as above, or calls (text may come before them); mode NONE -> no call.

JSON may be laid out as the model likes (pretty-printed, as Gemini's output often is, or compact), but a gap is
at most one space, or one newline and up to 40 spaces of indent, so that runs of whitespace cannot run a small
model in circles.

The model is told what is expected, too (`answer_hint`): a constraint only cuts off what may not come, and a
model that knows the schema fills it with better content and ends it sooner.

Not here: parsing the output back (`service/tools.py`), decoding (`engine/constraints.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gemserve.errors import invalid_argument
from gemserve.schema.content import GenerationConfig
from gemserve.service.schemas import to_json_schema
from gemserve.service.tools import CALL_CLOSE, CALL_OPEN, ToolPlan

JSON_MIME = "application/json"
ENUM_MIME = "text/x.enum"
TEXT_MIMES = ("", "text/plain")
SUPPORTED_MIMES = (*TEXT_MIMES, JSON_MIME, ENUM_MIME)
_LAYOUT = {"whitespace_flexible": True, "whitespace_pattern": "(\n {0,40}| )?"}
_ANY_JSON: dict[str, Any] = {"anyOf": [{"type": "object"}, {"type": "array"}]}
_TEXT = "TEXT: /(.|\\n)+/"
# How a call written without tags begins: as a JSON object, bare or in a code block.
_BARE_START = "(\\{|```(json)?\\n\\{)"
# Text that does not begin as a call written without tags would.
FREE_TEXT = f"start: TEXT\nTEXT: /(?s:.+)/ & ~/{_BARE_START}(?s:.*)/\n"


@dataclass(frozen=True)
class Answer:
    """What a text answer must be: free text (no fields set), JSON under `schema`, or one of `choices`."""

    schema: dict[str, Any] | None = None
    choices: tuple[str, ...] | None = None

    @property
    def free(self) -> bool:
        return self.schema is None and self.choices is None


def answer_format(config: GenerationConfig | None) -> Answer:
    """The answer format a generation config asks for, checked as Google checks it."""
    if config is None:
        return Answer()
    mime = config.response_mime_type or ""
    field = "generation_config.response_mime_type"
    if mime not in SUPPORTED_MIMES:
        raise invalid_argument(f"{field}: allowed mimetypes are `text/plain`, `application/json` and "
                               f"`text/x.enum`; got {mime!r}.", field)
    has_schema = config.response_schema is not None
    has_json_schema = config.response_json_schema is not None
    if has_schema and has_json_schema:
        raise invalid_argument("generation_config: response_schema and response_json_schema are mutually "
                               "exclusive; set one of them.", "generation_config.response_json_schema")
    if (has_schema or has_json_schema) and mime in TEXT_MIMES:
        which = "response_schema" if has_schema else "response_json_schema"
        raise invalid_argument(f"generation_config.{which}: a response schema needs response_mime_type "
                               f"application/json or text/x.enum, not {mime or 'text/plain'!r}.", field)
    if mime == ENUM_MIME:
        return Answer(choices=_enum_choices(config))
    if mime != JSON_MIME:
        return Answer()
    if config.response_schema is not None:
        return Answer(schema=to_json_schema(config.response_schema, "generation_config.response_schema"))
    if has_json_schema:
        raw = config.response_json_schema
        if not isinstance(raw, dict):
            raise invalid_argument("generation_config.response_json_schema: must be a JSON Schema (an object).",
                                   "generation_config.response_json_schema")
        return Answer(schema=raw)
    return Answer(schema=_ANY_JSON)


def answer_hint(answer: Answer) -> str | None:
    """A line for the system message that tells the model the answer's form; None for free text."""
    if answer.choices is not None:
        return "Answer with exactly one of these values and nothing else: " + ", ".join(answer.choices)
    if answer.schema is None:
        return None
    if answer.schema is _ANY_JSON:
        return "Answer in JSON only."
    return "Answer in JSON only, valid under this JSON schema:\n" + json.dumps(answer.schema, ensure_ascii=False)


def _enum_choices(config: GenerationConfig) -> tuple[str, ...]:
    field = "generation_config.response_schema"
    schema = config.response_schema
    values: Any = None
    if schema is not None:
        values = schema.enum
    elif isinstance(config.response_json_schema, dict):
        field = "generation_config.response_json_schema"
        values = config.response_json_schema.get("enum")
    if not values or not all(isinstance(v, str) and v for v in values):
        raise invalid_argument(f"{field}: text/x.enum needs a schema of type STRING with a non-empty enum of "
                               "non-empty strings.", field)
    return tuple(values)


def grammar(answer: Answer, tools: ToolPlan | None, special_call_tags: bool) -> str | None:
    """The llguidance grammar of the whole output; None when the output is free text.

    `special_call_tags`: the model's vocabulary has `<tool_call>` and `</tool_call>` as tokens of their own (Qwen),
    which the grammar names as such; otherwise they are text, and free text may not contain the opening tag
    except to start a call."""
    calls = tools is not None and tools.may_call
    if answer.free and not calls:
        if tools is not None and special_call_tags:
            return _lines("start: TEXT?", _TEXT)  # mode NONE: the call tag's token cannot be drawn
        return None
    if answer.schema is not None:
        answer_rule = f"answer: %json {_json(answer.schema)}"
    else:
        answer_rule = "answer: " + " | ".join(_lark_string(c) for c in answer.choices or ())
    if not calls:
        return _lines("start: answer", answer_rule)
    assert tools is not None
    opening, closing = (CALL_OPEN, CALL_CLOSE) if special_call_tags else map(_lark_string, (CALL_OPEN, CALL_CLOSE))
    body = _calls_schema({name: tools.arguments_schema(name) for name in tools.allowed})
    call_rules = [
        f"body: %json {_json(body)}",
        f'tail: "\\n" body "\\n" {closing}',
        f'more: ("\\n" {opening} tail)*',
        # Small models often write a call as bare JSON, without the tags, or in a code block.
        'bare: body ("\\n" body)* | "```json\\n" body "\\n```" | "```\\n" body "\\n```"',
    ]
    if tools.mode == "ANY":
        return _lines(f"start: {opening} tail more | bare", *call_rules)
    if not answer.free:
        return _lines(f"start: answer | {opening} tail more", answer_rule, *call_rules)
    # A free text answer never begins as a bare call does, so output that does is a call, under the schema.
    not_bare = f"/(?s:.+)/ & ~/{_BARE_START}(?s:.*)/"
    if special_call_tags:
        return _lines(f"start: TEXT | TEXT? {opening} tail more | bare", f"TEXT: {not_bare}", *call_rules)
    # The tags are text here: free text runs up to the first opening tag, lazily, so that the tag always starts
    # a call.
    return _lines("start: PLAIN | lead tail more | bare",
                  f"PLAIN: {not_bare} & ~/(?s:.*){_regex_escape(CALL_OPEN)}(?s:.*)/",
                  f"lead[lazy]: ({not_bare})? {opening}", *call_rules)


def _lines(*rules: str) -> str:
    return "\n".join(rules) + "\n"


def _regex_escape(text: str) -> str:
    return "".join("\\" + c if c in "\\.^$|?*+()[]{}/" else c for c in text)


def _calls_schema(functions: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One call of any of `functions` (name -> JSON Schema of its arguments). A function's schema is nested in
    this one, so the references in it (`#/$defs/...`, `#` for itself, as pydantic writes nested and recursive
    models) would point into the wrong document: such a schema moves to this one's `$defs`, and its references
    with it."""
    calls, moved = [], {}
    for i, (name, arguments) in enumerate(functions.items()):
        if _has_local_ref(arguments):
            key = f"arguments{i}"
            moved[key] = _rebased(arguments, f"#/$defs/{key}")
            arguments = {"$ref": f"#/$defs/{key}"}
        calls.append(_call_schema(name, arguments))
    return {"anyOf": calls, "$defs": moved} if moved else {"anyOf": calls}


_DATA_KEYS = ("const", "enum", "default", "examples")  # values there are data, not schemas
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")  # name -> schema


def _has_local_ref(schema: Any) -> bool:
    found: list[str] = []
    _rebased(schema, "#", found)
    return bool(found)


def _rebased(schema: Any, root: str, found: list[str] | None = None) -> Any:
    """`schema` with its local references (`#...`) made relative to `root`, where it is moved to; each reference
    met is added to `found`."""
    if isinstance(schema, list):
        return [_rebased(item, root, found) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = root + value[1:]
            if found is not None:
                found.append(value)
        elif key in _DATA_KEYS:
            out[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _rebased(sub, root, found) for name, sub in value.items()}
        else:
            out[key] = _rebased(value, root, found)
    return out


def _call_schema(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False}


def _json(schema: dict[str, Any]) -> str:
    return json.dumps({**schema, "x-guidance": _LAYOUT}, ensure_ascii=False)


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)
