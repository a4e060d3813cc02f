"""JSON and enum output through the real service path and real constraints, on the scripted engine."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from gemserve.errors import ApiError
from tests.service import scripted
from tests.service.scripted import request_body

RECIPE_SCHEMA = {
    "type": "OBJECT",
    "properties": {
        "recipe_name": {"type": "STRING"},
        "servings": {"type": "INTEGER", "minimum": 1, "maximum": 12},
        "vegan": {"type": "BOOLEAN", "nullable": True},
    },
    "required": ["recipe_name", "servings", "vegan"],
    "propertyOrdering": ["recipe_name", "servings"],
}


def run(script: str, body: dict[str, Any], stream: bool = False) -> Any:
    return scripted.run(script, body, stream=stream)[0]


def text_of(response: dict[str, Any], index: int = 0) -> str:
    return "".join(p.get("text", "") for p in response["candidates"][index]["content"]["parts"])


def json_config(**config: Any) -> dict[str, Any]:
    return request_body(generationConfig={"responseMimeType": "application/json", **config})


def test_valid_json_from_the_model_passes_unchanged() -> None:
    wanted = '{"recipe_name": "Pancakes", "servings": 4, "vegan": false}'
    response = run(wanted, json_config(responseSchema=RECIPE_SCHEMA))
    assert text_of(response) == wanted
    assert response["candidates"][0]["finishReason"] == "STOP"


def test_a_model_that_rambles_still_answers_schema_valid_json() -> None:
    response = run("Sure! Here is a recipe: pancakes.", json_config(responseSchema=RECIPE_SCHEMA))
    value = json.loads(text_of(response))
    assert list(value) == ["recipe_name", "servings", "vegan"]  # propertyOrdering, then alphabetical
    assert isinstance(value["recipe_name"], str) and 1 <= value["servings"] <= 12
    assert value["vegan"] in (True, False, None)


def test_properties_without_ordering_come_alphabetically() -> None:
    schema = {"type": "object", "properties": {"zeta": {"type": "string"}, "alpha": {"type": "integer"}},
              "required": ["zeta", "alpha"]}
    value = json.loads(text_of(run("{}", json_config(responseSchema=schema))))
    assert list(value) == ["alpha", "zeta"]


def test_response_json_schema_is_enforced_as_given() -> None:
    schema = {"type": "object", "properties": {"names": {"type": "array", "items": {"type": "string"},
                                                         "minItems": 2, "maxItems": 3}},
              "required": ["names"], "additionalProperties": False}
    value = json.loads(text_of(run('{"names": ["a"]}', json_config(responseJsonSchema=schema))))
    jsonschema.validate(value, schema)


def test_json_mode_without_a_schema_gives_an_object_or_array() -> None:
    value = json.loads(text_of(run("hello", json_config())))
    assert isinstance(value, dict | list)


def test_streamed_json_joins_into_the_same_json() -> None:
    chunks = run('{"recipe_name": "Soup", "servings": 2, "vegan": true}', json_config(responseSchema=RECIPE_SCHEMA),
                 stream=True)
    assert len(chunks) > 1
    joined = "".join(text_of(c) for c in chunks)
    assert json.loads(joined) == {"recipe_name": "Soup", "servings": 2, "vegan": True}


def test_enum_output_is_one_of_the_values() -> None:
    schema = {"type": "STRING", "format": "enum", "enum": ["Percussion", "String", "Woodwind"]}
    body = request_body(generationConfig={"responseMimeType": "text/x.enum", "responseSchema": schema})
    assert text_of(run("String", body)) == "String"
    assert text_of(run("I would say a drum", body)) in schema["enum"]


def test_every_candidate_follows_the_schema() -> None:
    body = json_config(responseSchema=RECIPE_SCHEMA, candidateCount=3)
    response = run("nope", body)
    assert len(response["candidates"]) == 3
    for i in range(3):
        assert set(json.loads(text_of(response, i))) == {"recipe_name", "servings", "vegan"}


def test_logprobs_under_a_constraint_stay_finite() -> None:
    body = json_config(responseSchema=RECIPE_SCHEMA, responseLogprobs=True, logprobs=2)
    candidate = run("x", body)["candidates"][0]
    values = [c["logProbability"] for c in candidate["logprobsResult"]["chosenCandidates"]]
    assert values and all(v > -1e30 for v in values)
    assert candidate["avgLogprobs"] > -1e30


@pytest.mark.parametrize(("config", "field", "words"), [
    ({"responseMimeType": "application/json", "responseSchema": {"type": "STRING"},
      "responseJsonSchema": {"type": "string"}}, "generation_config.response_json_schema", "mutually exclusive"),
    ({"responseSchema": {"type": "STRING"}}, "generation_config.response_mime_type", "application/json"),
    ({"responseMimeType": "text/x.enum"}, "generation_config.response_schema", "enum"),
    ({"responseMimeType": "text/x.enum", "responseSchema": {"type": "STRING"}}, "generation_config.response_schema",
     "enum"),
    ({"responseMimeType": "image/png"}, "generation_config.response_mime_type", "allowed mimetypes"),
    ({"responseMimeType": "application/json",
      "responseSchema": {"type": "OBJECT", "properties": {"a": {"type": "STRING"}}, "required": ["b"]}},
     "generation_config.response_schema.required", "'b'"),
    ({"responseMimeType": "application/json",
      "responseSchema": {"type": "OBJECT", "properties": {"a": {"type": "STRING"}}, "propertyOrdering": ["c"]}},
     "generation_config.response_schema.property_ordering", "'c'"),
    ({"responseMimeType": "application/json", "responseSchema": {"type": "INTEGER", "enum": ["1"]}},
     "generation_config.response_schema.enum", "STRING"),
    ({"responseMimeType": "application/json", "responseSchema": {"type": "BLOB"}},
     "generation_config.response_schema.type", "BLOB"),
    ({"responseMimeType": "application/json", "responseJsonSchema": False}, "generation_config.response_json_schema",
     "must be a JSON Schema"),
    ({"responseMimeType": "application/json", "responseJsonSchema": {"type": "object", "required": 3}},
     "generation_config.response_json_schema", "cannot be enforced"),
])
def test_invalid_output_settings_are_400_naming_the_field(config: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ApiError) as caught:
        run("", request_body(generationConfig=config))
    error = caught.value
    assert error.code == 400
    assert words in error.message
    assert field in json.dumps(error.to_json())


def test_schema_types_are_accepted_in_any_case() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert json.loads(text_of(run('{"n": 7}', json_config(responseSchema=schema)))) == {"n": 7}


def test_runs_of_whitespace_are_cut_short() -> None:
    schema = {"type": "OBJECT", "properties": {"a": {"type": "STRING"}}, "required": ["a"]}
    text = text_of(run('{' + "\n" * 30 + " " * 80 + '"a": "x"}', json_config(responseSchema=schema)))
    assert set(json.loads(text)) == {"a"}
    gap = text[1:text.index('"')]  # between "{" and the first key: one newline and some indent at most
    assert gap.count("\n") <= 1 and len(gap) <= 41
