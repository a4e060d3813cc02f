"""Google's `Schema` (the OpenAPI subset of responseSchema and function parameters) as JSON Schema.

The Gemini API describes structured output and function parameters with its own Schema message: upper-case
types, `nullable`, `propertyOrdering`, string-valued `format: enum`. Constrained decoding (llguidance) and the
chat templates that show tools to a model both speak JSON Schema, so this module translates, and checks on the
way what a JSON Schema could not carry (an unknown required property, an enum on a non-string).

Property order follows Google's rule: the names of `propertyOrdering` first, in that order, then the others in
alphabetical order (the API's default). Every object is closed (`additionalProperties: false`), as Google's
output holds only the declared properties.

Not here: raw JSON Schemas (`responseJsonSchema`, `parametersJsonSchema`), which pass through unchanged.
"""

from __future__ import annotations

from typing import Any

from gemserve.errors import invalid_argument
from gemserve.schema.content import Schema

MAX_DEPTH = 32

_TYPES = {"STRING": "string", "NUMBER": "number", "INTEGER": "integer", "BOOLEAN": "boolean", "ARRAY": "array",
          "OBJECT": "object", "NULL": "null"}
# JSON Schema string formats llguidance enforces; Google's other formats (float, int32, enum, ...) only describe.
_STRING_FORMATS = {"date-time", "date", "time", "duration", "email", "uuid", "ipv4", "ipv6", "hostname", "uri"}


def to_json_schema(schema: Schema, field: str, depth: int = 0) -> dict[str, Any]:
    """The JSON Schema of `schema`; `field` names it in error messages (`generation_config.response_schema`)."""
    if depth > MAX_DEPTH:
        raise invalid_argument(f"{field}: the schema nests deeper than {MAX_DEPTH} levels.", field)
    out: dict[str, Any] = {}
    if schema.title is not None:
        out["title"] = schema.title
    if schema.description is not None:
        out["description"] = schema.description
    kind = schema.type if schema.type not in (None, "TYPE_UNSPECIFIED") else None
    if kind is not None:
        out["type"] = _TYPES[kind]
    if schema.enum is not None:
        if kind not in (None, "STRING"):
            raise invalid_argument(f"{field}.enum: enum is only supported for STRING type, not {kind}.",
                                   f"{field}.enum")
        if not schema.enum:
            raise invalid_argument(f"{field}.enum: enum must not be empty.", f"{field}.enum")
        out["type"] = "string"
        out["enum"] = list(schema.enum)
    if schema.format is not None and schema.format in _STRING_FORMATS and kind in (None, "STRING"):
        out["format"] = schema.format
    _copy(schema, out, {"min_length": "minLength", "max_length": "maxLength", "pattern": "pattern",
                        "minimum": "minimum", "maximum": "maximum", "min_items": "minItems",
                        "max_items": "maxItems", "min_properties": "minProperties",
                        "max_properties": "maxProperties"})
    if schema.default is not None:
        out["default"] = schema.default
    if schema.items is not None:
        out["items"] = to_json_schema(schema.items, f"{field}.items", depth + 1)
    if schema.properties is not None or kind == "OBJECT":
        out.update(_object(schema, field, depth))
    elif schema.required:
        raise invalid_argument(f"{field}.required: required is set but the schema has no properties.",
                               f"{field}.required")
    if schema.any_of is not None:
        if not schema.any_of:
            raise invalid_argument(f"{field}.any_of: any_of must not be empty.", f"{field}.any_of")
        out["anyOf"] = [to_json_schema(s, f"{field}.any_of[{i}]", depth + 1) for i, s in enumerate(schema.any_of)]
    if schema.nullable:
        out = {"anyOf": [out, {"type": "null"}]} if "anyOf" in out or "type" not in out else {
            **out, "type": [out["type"], "null"]}
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


def _object(schema: Schema, field: str, depth: int) -> dict[str, Any]:
    properties = schema.properties or {}
    ordering = list(schema.property_ordering or [])
    for name in ordering:
        if name not in properties:
            raise invalid_argument(f"{field}.property_ordering: {name!r} is not one of the properties.",
                                   f"{field}.property_ordering")
    if len(set(ordering)) != len(ordering):
        raise invalid_argument(f"{field}.property_ordering: a property is listed twice.",
                               f"{field}.property_ordering")
    for name in schema.required or []:
        if name not in properties:
            raise invalid_argument(f"{field}.required: {name!r} is required but not among the properties.",
                                   f"{field}.required")
    order = ordering + sorted(name for name in properties if name not in ordering)
    out: dict[str, Any] = {
        "type": "object",
        "properties": {name: to_json_schema(properties[name], f"{field}.properties[{name}]", depth + 1)
                       for name in order},
        "additionalProperties": False,
    }
    if schema.required:
        out["required"] = list(schema.required)
    return out


def _copy(schema: Schema, out: dict[str, Any], names: dict[str, str]) -> None:
    for attr, key in names.items():
        value = getattr(schema, attr)
        if value is not None:
            out[key] = value
