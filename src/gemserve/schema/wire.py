"""How request bodies arrive on the wire and how they are turned into Python values.

Google's JSON parser is more forgiving than `json.loads` in ways the official clients and the reference's curl
examples rely on: a trailing comma, snake_case *and* camelCase names for every field, enums as names or
numbers, a single object where a list is expected. This module handles the first two for the whole body;
`OneOrMany` and `enum_by_name_or_number` handle the others field by field. Keys the user defines (function arguments,
function responses, schema property names, raw JSON schemas, labels) are never rewritten.

It does not know the fields of any resource: that is the pydantic models' job (`gemserve.schema.*`), which
reject unknown names the way Google does.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import re
import threading
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, TypeAdapter, ValidationError
from pydantic.alias_generators import to_camel

from gemserve.errors import ApiError, invalid_argument

MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_NESTING = 64
MAX_INT_DIGITS = 40  # far beyond int64 (19 digits); parsing longer ones costs quadratic time, or fails at 4300


class _TooLong(ValueError):
    """An integer literal longer than MAX_INT_DIGITS."""


def _integer(literal: str) -> int:
    if len(literal.lstrip("-")) > MAX_INT_DIGITS:
        raise _TooLong(literal[:20])
    return int(literal)

# Values under these keys belong to the user: no key inside them is renamed.
_OPAQUE = frozenset({"args", "response", "responseJsonSchema", "parametersJsonSchema", "labels", "default",
                     "example", "partialArgs"})
# Maps whose keys are user-chosen names and whose values are schemas again.
_NAMED_SCHEMAS = frozenset({"properties", "$defs", "definitions"})

_SNAKE = re.compile(r"_([a-z0-9])")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# A long top-level list (contents, requests) is validated this many items at a time: pydantic holds the GIL for a
# whole call, and a call over 300,000 turns would keep the event loop's thread waiting for seconds.
VALIDATION_CHUNK = 2000


def camel(name: str) -> str:
    """`mime_type` -> `mimeType`; names already in camelCase and `@type` are left alone."""
    if name.startswith("_"):
        return name
    return _SNAKE.sub(lambda m: m.group(1).upper(), name)


def snake(name: str) -> str:
    """`generationConfig.maxOutputTokens` -> `generation_config.max_output_tokens`, as Google's messages spell it."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", lambda m: "_" + m.group(1).lower(), name)


_gc_lock = threading.Lock()
_gc_pauses = 0


@contextlib.contextmanager
def collector_paused() -> Any:
    """Pause Python's cyclic garbage collector while a body is parsed (a body makes no cycles: refcounting frees
    it). Parsing a large body allocates millions of objects, and the full collections this sets off hold the
    GIL for most of a second each on a small machine, stalling the event loop whatever thread parses.
    Concurrent parses share the pause: the collector resumes when the last one ends."""
    global _gc_pauses
    with _gc_lock:
        if _gc_pauses == 0:
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0:
                gc.enable()


def parse_json_body(raw: bytes) -> Any:
    """Parse a request body; trailing commas are accepted as Google's parser accepts them."""
    with collector_paused():
        return _parse_json_body(raw)


def _parse_json_body(raw: bytes) -> Any:
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError("INVALID_ARGUMENT", f"Request payload size exceeds the limit: {MAX_BODY_BYTES} bytes.")
    if not raw.strip():
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid_argument("Invalid JSON payload received. Request body is not valid UTF-8.") from exc
    try:
        try:
            value = json.loads(text, parse_int=_integer)
        except json.JSONDecodeError as strict_error:
            try:
                value = json.loads(_without_trailing_commas(text), parse_int=_integer)
            except json.JSONDecodeError:
                raise invalid_argument(
                    f"Invalid JSON payload received. {strict_error.msg} at line {strict_error.lineno} "
                    f"column {strict_error.colno}."
                ) from None
    except RecursionError:
        raise invalid_argument(f"Invalid JSON payload received. Nesting deeper than {MAX_NESTING} levels.") from None
    except _TooLong:
        raise invalid_argument(f"Invalid JSON payload received. An integer has more than {MAX_INT_DIGITS} digits; "
                               "no field takes one that large.") from None
    try:
        if _SURROGATE_ESCAPE.search(text):  # only a \ud800-\udfff escape can spell a lone surrogate
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # JSON's \ud800 escapes can spell strings that are not Unicode text
        raise invalid_argument("Invalid JSON payload received. A string holds an unpaired surrogate (\\ud800-"
                               "\\udfff); text must be valid Unicode.") from None
    return value


def _without_trailing_commas(text: str) -> str:
    """`[1, 2,]` -> `[1, 2]` and `{"a": 1,}` -> `{"a": 1}`, leaving strings alone; one pass over the text."""
    out: list[str] = []
    in_string = escaped = False
    pending_comma = -1  # index in `out` of a comma that a closing bracket may still cancel
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
            pending_comma = -1
        elif char in "]}" and pending_comma >= 0:
            out[pending_comma] = ""
            pending_comma = -1
        elif char == ",":
            pending_comma = len(out)
        elif not char.isspace():
            pending_comma = -1
        out.append(char)
    return "".join(out)


def camelize(value: Any, path: str = "", depth: int = 0) -> Any:
    """Rename every field to camelCase, leaving user-defined keys untouched. Rejects a field given twice."""
    if depth > MAX_NESTING:
        raise invalid_argument(f"Invalid JSON payload received. Nesting deeper than {MAX_NESTING} levels.")
    if isinstance(value, list):
        return [camelize(item, path, depth + 1) for item in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = camel(key)
        if name in out:
            where = f" at '{snake(path)}'" if path else ""
            raise invalid_argument(
                f'Invalid JSON payload received. Duplicate field "{key}"{where}.', snake(path) or None
            )
        child = f"{path}.{name}" if path else name
        if name in _OPAQUE:
            out[name] = item
        elif name in _NAMED_SCHEMAS and isinstance(item, dict):
            out[name] = {prop: camelize(schema, f"{child}.{prop}", depth + 1) for prop, schema in item.items()}
        else:
            out[name] = camelize(item, child, depth + 1)
    return out


class WireModel(BaseModel):
    """A REST message: camelCase on the wire, unknown fields rejected as Google rejects them."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, dict) else value


T = TypeVar("T")
OneOrMany = Annotated[list[T], BeforeValidator(_as_list)]
"""A repeated field that also accepts a single object in its place, as Google's parser does."""



def enum_by_name_or_number(members: list[str]) -> Callable[[Any], Any]:
    """Accept an enum as its name in any case or as its proto number, as Google does (google-generativeai sends
    numbers; the Vercel AI SDK, LiteLLM and the reference's own examples send `"object"`, `"none"`)."""

    def convert(value: Any) -> Any:
        if isinstance(value, bool):
            return value
        if isinstance(value, int):
            return members[value] if 0 <= value < len(members) else value
        if isinstance(value, str) and value.isdigit():
            return convert(int(value))
        if isinstance(value, str) and value.upper() in members:
            return value.upper()
        return value

    return convert


def parse_model(model: type[BaseModel], body: Any, what: str) -> Any:
    """Validate a camelized body into `model`, turning the first problem into Google's wording."""
    with collector_paused():
        return _parse_model(model, body, what)


def _parse_model(model: type[BaseModel], body: Any, what: str) -> Any:
    if not isinstance(body, dict):
        raise invalid_argument(f"Invalid JSON payload received. Expected an object for {what}.")
    body = camelize(body)
    long_lists = {name: items for name, items in body.items() if isinstance(items, list)
                  and len(items) > VALIDATION_CHUNK and name in _list_fields(model)}
    try:
        parsed = model.model_validate({**body, **dict.fromkeys(long_lists, [])})
    except ValidationError as exc:
        raise _describe(exc) from None
    if not long_lists:
        return parsed
    update = {}
    for name, items in long_lists.items():
        adapter = _list_fields(model)[name]
        values: list[Any] = []
        for start in range(0, len(items), VALIDATION_CHUNK):
            try:
                values += adapter.validate_python(items[start : start + VALIDATION_CHUNK])
            except ValidationError as exc:
                raise _describe(exc, prefix=(name,), offset=start) from None
        update[_python_name(model, name)] = values
    return parsed.model_copy(update=update)


@functools.cache
def _list_fields(model: type[BaseModel]) -> dict[str, TypeAdapter[Any]]:
    """The model's list-valued fields by wire name, each with a validator for a list of its items."""
    out = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if typing.get_origin(annotation) in (list, typing.Union, types.UnionType):
            lists = [a for a in (typing.get_args(annotation) if typing.get_origin(annotation) is not list
                                 else (annotation,)) if typing.get_origin(a) is list]
            if lists:
                out[field.alias or name] = TypeAdapter(lists[0])
    return out


def _python_name(model: type[BaseModel], wire_name: str) -> str:
    return next(name for name, field in model.model_fields.items() if (field.alias or name) == wire_name)


def _describe(exc: ValidationError, prefix: tuple[str, ...] = (), offset: int = 0) -> ApiError:
    """Google's wording for the first problem; `prefix` and `offset` place an error found in a chunk of a list."""
    error = exc.errors(include_url=False)[0]
    loc = [str(p) for p in error["loc"]]
    if prefix:
        loc = [*prefix, str(int(loc[0]) + offset), *loc[1:]]
    # pydantic reports list positions as numbers: fold them into the field name, `contents[0].parts`.
    parts: list[str] = []
    for piece in loc:
        if piece.isdigit() and parts:
            parts[-1] += f"[{piece}]"
        elif not piece.startswith("function-") and "[" not in piece:
            parts.append(piece)
    kind = error["type"]
    if kind == "extra_forbidden":
        name = parts[-1] if parts else ""
        parent = snake(".".join(parts[:-1]))
        at = f" at '{parent}'" if parent else ""
        message = f'Invalid JSON payload received. Unknown name "{name}"{at}: Cannot find field.'
        return invalid_argument(message, parent or name)
    field = snake(".".join(parts))
    value = error.get("input")
    shown = json.dumps(value)[:100] if _jsonable(value) else repr(value)[:100]
    reason = error["msg"]
    if kind == "enum" or kind == "literal_error":
        reason = f"Invalid value. {reason}"
    message = f"Invalid value at '{field}', {shown}: {reason}"
    return invalid_argument(message, field)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
