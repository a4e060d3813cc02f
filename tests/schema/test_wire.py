import pytest

from gemserve.errors import ApiError
from gemserve.schema.content import GenerateContentRequest
from gemserve.schema.wire import camelize, parse_json_body, parse_model


def test_snake_case_becomes_camel_case_but_user_keys_stay() -> None:
    body = {"generation_config": {"max_output_tokens": 3},
            "contents": [{"parts": [{"function_call": {"name": "f", "args": {"my_arg": 1}}}]}],
            "tools": [{"function_declarations": [{"parameters": {"properties": {"user_name": {"max_length": 2}}}}]}]}
    out = camelize(body)
    assert out["generationConfig"] == {"maxOutputTokens": 3}
    assert out["contents"][0]["parts"][0]["functionCall"]["args"] == {"my_arg": 1}
    assert out["tools"][0]["functionDeclarations"][0]["parameters"]["properties"] == {"user_name": {"maxLength": 2}}


def test_field_given_in_both_spellings_is_rejected() -> None:
    with pytest.raises(ApiError, match="Duplicate field"):
        camelize({"generation_config": {}, "generationConfig": {}})


def test_trailing_commas_are_accepted_like_googles_parser() -> None:
    parsed = parse_json_body(b'{"contents": [{"parts": [{"text": "hi"}]},],}')
    assert parsed == {"contents": [{"parts": [{"text": "hi"}]}]}


def test_broken_json_names_the_position() -> None:
    with pytest.raises(ApiError, match="line 1 column"):
        parse_json_body(b'{"contents": [')


def test_single_objects_where_lists_are_expected_and_enum_numbers() -> None:
    req = parse_model(GenerateContentRequest, {
        "contents": {"parts": {"text": "hi"}},
        "safety_settings": {"category": 10, "threshold": "3"},
    }, "GenerateContentRequest")
    assert req.contents[0].parts[0].text == "hi"
    assert req.safety_settings[0].category == "HARM_CATEGORY_DANGEROUS_CONTENT"
    assert req.safety_settings[0].threshold == "BLOCK_ONLY_HIGH"


def test_unknown_field_is_named_with_its_parent() -> None:
    with pytest.raises(ApiError) as info:
        parse_model(GenerateContentRequest, {"contents": [], "generation_config": {"tempratur": 1}}, "x")
    assert info.value.code == 400
    assert 'Unknown name "tempratur" at \'generation_config\'' in info.value.message


def test_wrong_type_names_the_field_in_snake_case() -> None:
    with pytest.raises(ApiError) as info:
        parse_model(GenerateContentRequest, {"generationConfig": {"maxOutputTokens": "many"}}, "x")
    assert "generation_config.max_output_tokens" in info.value.message


def test_trailing_commas_inside_strings_are_kept() -> None:
    body = b'{"a": ["x,]", "say \\"hi\\",}",], "b": "c:\\\\",}'
    assert parse_json_body(body) == {"a": ["x,]", 'say "hi",}'], "b": "c:\\"}


def test_deep_nesting_and_unpaired_surrogates_are_client_errors() -> None:
    with pytest.raises(ApiError, match="Nesting"):
        parse_json_body(b"[" * 5000 + b"]" * 5000)
    with pytest.raises(ApiError, match="surrogate"):
        parse_json_body(b'{"displayName": "\\udc00"}')


@pytest.mark.parametrize("body", [b'{"generationConfig": {"maxOutputTokens": ' + b"9" * 5000 + b"}}",
                                  b'{"anything": [1, -' + b"9" * 41 + b"]}"])
def test_integers_too_long_for_any_field_are_client_errors(body: bytes) -> None:
    with pytest.raises(ApiError, match="more than 40 digits") as caught:
        parse_json_body(body)
    assert caught.value.code == 400


def test_long_but_plausible_integers_still_parse() -> None:
    assert parse_json_body(b'{"seed": -' + b"9" * 40 + b"}") == {"seed": -int("9" * 40)}


def test_long_lists_are_validated_in_chunks_with_the_same_result_and_error_positions() -> None:
    from gemserve.schema import wire

    turns = [{"role": "user" if i % 2 == 0 else "model", "parts": [{"text": f"turn {i}"}]} for i in range(5000)]
    parsed = parse_model(GenerateContentRequest, {"contents": turns, "generation_config": {"temperature": 0}},
                         "GenerateContentRequest")
    assert len(parsed.contents) == 5000 and parsed.contents[4321].parts[0].text == "turn 4321"
    assert parsed.contents[4321].role == "model" and parsed.generation_config.temperature == 0
    assert wire.VALIDATION_CHUNK < 5000  # so the chunked path ran
    broken = [*turns[:4321], {"parts": [{"txt": "x"}]}, *turns[4322:]]
    with pytest.raises(ApiError, match=r"Unknown name \"txt\" at 'contents\[4321\].parts\[0\]'"):
        parse_model(GenerateContentRequest, {"contents": broken}, "GenerateContentRequest")
