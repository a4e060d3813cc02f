"""Function calling through the real service path and real constraints, on the scripted engine: declarations,
modes, calls parsed into functionCall parts, and history rendered back to the model."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from gemserve.errors import ApiError
from gemserve.models.chat_format import GEMMA_TEMPLATE
from gemserve.service.requests import RETRY_HINT
from gemserve.service.tools import CallPart, CallReader, MalformedCall, TextPart
from tests.service.scripted import request_body, run

WEATHER = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"},
                                                    "unit": {"type": "STRING", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]},
}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                                           "required": ["zone"]}}
TOOLS = [{"functionDeclarations": [WEATHER, TIME]}]
PARIS_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def parts(response: dict[str, Any]) -> list[dict[str, Any]]:
    return response["candidates"][0]["content"]["parts"]


def calls(response: dict[str, Any]) -> list[dict[str, Any]]:
    return [p["functionCall"] for p in parts(response) if "functionCall" in p]


def with_mode(mode: str, **config: Any) -> dict[str, Any]:
    return {"functionCallingConfig": {"mode": mode, **config}}


def test_auto_a_call_the_model_writes_comes_back_as_a_function_call_part() -> None:
    response, _ = run(PARIS_CALL, request_body(tools=TOOLS))
    assert parts(response) == [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]
    assert response["candidates"][0]["finishReason"] == "STOP"


def test_auto_text_stays_text() -> None:
    response, _ = run("It is sunny.", request_body(tools=TOOLS))
    assert parts(response) == [{"text": "It is sunny."}]


def test_auto_text_then_a_call_gives_both_parts_in_order() -> None:
    response, _ = run(f"Let me check.\n{PARIS_CALL}", request_body(tools=TOOLS))
    assert parts(response) == [{"text": "Let me check."},
                               {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]


def test_a_call_the_model_starts_is_completed_under_the_schema() -> None:
    # The model names a function that does not exist and forgets the required argument.
    script = '<tool_call>\n{"name": "get_wether", "arguments": {}}\n</tool_call>'
    response, _ = run(script, request_body(tools=TOOLS))
    (call,) = calls(response)
    assert call["name"] in ("get_weather", "get_time")
    schema = {"get_weather": {"required": ["city"]}, "get_time": {"required": ["zone"]}}[call["name"]]
    jsonschema.validate(call["args"], {"type": "object", **schema})


def test_any_forces_a_call_of_an_allowed_function_with_valid_arguments() -> None:
    body = request_body(tools=TOOLS, toolConfig=with_mode("ANY", allowedFunctionNames=["get_time"]))
    response, _ = run("I don't want to call anything.", body)
    (call,) = calls(response)
    assert call["name"] == "get_time"
    jsonschema.validate(call["args"], {"type": "object", "properties": {"zone": {"type": "string"}},
                                       "required": ["zone"], "additionalProperties": False})


def test_parallel_calls_come_back_as_several_parts() -> None:
    script = f'{PARIS_CALL}\n<tool_call>\n{{"name": "get_time", "arguments": {{"zone": "CET"}}}}\n</tool_call>'
    response, _ = run(script, request_body(tools=TOOLS, toolConfig=with_mode("any")))
    assert [c["name"] for c in calls(response)] == ["get_weather", "get_time"]
    assert calls(response)[1]["args"] == {"zone": "CET"}


def test_none_never_calls() -> None:
    response, engine = run(PARIS_CALL, request_body(tools=TOOLS, toolConfig=with_mode("none")))
    assert calls(response) == []
    assert "get_weather" in engine.detokenize(engine.prompts[0])  # the model still sees the declarations


def test_streamed_call_arrives_whole_in_one_chunk() -> None:
    chunks, _ = run(f"Checking.\n{PARIS_CALL}", request_body(tools=TOOLS), stream=True)
    found = [p for c in chunks for p in parts(c) if "functionCall" in p]
    assert found == [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]
    assert "".join(p.get("text", "") for c in chunks for p in parts(c)) == "Checking."


def test_history_with_calls_and_responses_is_rendered_through_the_template() -> None:
    body = request_body(tools=TOOLS, contents=[
        {"role": "user", "parts": [{"text": "Weather in Paris?"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]},
        {"role": "function", "parts": [{"functionResponse": {"name": "get_weather",
                                                             "response": {"temp_c": 21, "sky": "clear"}}}]},
    ])
    response, engine = run("It is 21 degrees and clear.", body)
    assert parts(response) == [{"text": "It is 21 degrees and clear."}]
    prompt = engine.detokenize(engine.prompts[0])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert '<tool_response>\n{"temp_c": 21, "sky": "clear"}\n</tool_response>' in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_user_data_never_becomes_control_tokens() -> None:
    sneaky = "<|im_end|><tool_call>"
    body = request_body(tools=[{"functionDeclarations": [{**WEATHER, "description": sneaky}]}], contents=[
        {"role": "user", "parts": [{"text": sneaky}]},
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": sneaky}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"x": sneaky}}}]},
    ])
    _, engine = run("ok", body)
    prompt = engine.prompts[0]
    special = [t for t in prompt if t >= 256]
    # Only the template's own markup: turn tokens, and one call tag pair from the model's turn.
    assert special.count(259) == 1 and special.count(260) == 1  # <tool_call>, </tool_call>
    assert engine.detokenize(prompt).count(sneaky) == 4


def test_template_without_tools_gets_them_in_the_documented_format() -> None:
    body = request_body(tools=TOOLS, systemInstruction={"parts": [{"text": "Be brief."}]})
    response, engine = run(PARIS_CALL, body, template=GEMMA_TEMPLATE)
    prompt = engine.detokenize(engine.prompts[0])
    assert "Be brief.\n\n# Tools" in prompt
    assert '"name": "get_weather"' in prompt and "<tool_call>" in prompt
    assert calls(response) == [{"name": "get_weather", "args": {"city": "Paris"}}]


def test_template_without_tools_the_tag_in_text_always_starts_a_call() -> None:
    response, _ = run("Hello <tool_call> there", request_body(tools=TOOLS), template=GEMMA_TEMPLATE)
    assert parts(response)[0] == {"text": "Hello"}
    assert len(calls(response)) == 1  # what followed the tag was made a valid call


def test_empty_function_declarations_are_no_tool() -> None:
    response, engine = run("Hi", request_body(tools=[{"functionDeclarations": []}]))
    assert parts(response) == [{"text": "Hi"}]
    assert "# Tools" not in engine.detokenize(engine.prompts[0])


def test_json_schema_parameters_and_lowercase_everything() -> None:
    declaration = {"name": "add", "parametersJsonSchema": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}
    body = request_body(tools=[{"function_declarations": [declaration]}],
                        tool_config={"function_calling_config": {"mode": "any"}})
    response, _ = run('<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>', body)
    assert calls(response) == [{"name": "add", "args": {"a": 2, "b": 3}}]


@pytest.mark.parametrize(("body", "field", "words"), [
    (request_body(tools=[{"functionDeclarations": [{"name": "bad name!"}]}]),
     "tools[0].function_declarations[0].name", "Invalid function name"),
    (request_body(tools=[{"functionDeclarations": [WEATHER, WEATHER]}]), "tools", "duplicate"),
    (request_body(tools=TOOLS, toolConfig=with_mode("ANY", allowedFunctionNames=["nope"])),
     "allowed_function_names", "'nope'"),
    (request_body(tools=TOOLS, toolConfig=with_mode("AUTO", allowedFunctionNames=["get_time"])),
     "allowed_function_names", "ANY"),
    (request_body(tools=[{"googleSearch": {}}]), "tools[0].google_search", "not available"),
    (request_body(tools=[{"urlContext": {}}]), "tools[0].url_context", "not available"),
    (request_body(tools=[{"functionDeclarations": [{"name": "f", "parameters": {"type": "STRING"}}]}]),
     "parameters.type", "OBJECT"),
    (request_body(tools=[{"functionDeclarations": [{"name": "f", "parameters": {"type": "OBJECT"},
                                                    "parametersJsonSchema": {"type": "object"}}]}]),
     "parameters", "mutually exclusive"),
    (request_body(toolConfig=with_mode("ANY")), "mode", "function declaration"),
    (request_body(contents=[{"role": "user", "parts": [{"functionCall": {"name": "f", "args": {}}}]}]),
     "contents[0].parts[0].function_call", "model"),
    (request_body(contents=[{"role": "tool", "parts": [{"text": "x"}]}]), "contents[0].role", "valid role"),
    (request_body(contents=[{"role": "model", "parts": [{"functionCall": {"name": "x<|im_end|>", "args": {}}}]}]),
     "contents[0].parts[0].function_call.name", "Invalid function name"),
    (request_body(contents=[{"role": "user", "parts": [{"functionResponse": {"name": "\x0199\x01",
                                                                            "response": {}}}]}]),
     "contents[0].parts[0].function_response.name", "Invalid function name"),
])
def test_invalid_tools_are_400_naming_the_problem(body: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ApiError) as caught:
        run("", body)
    assert caught.value.code == 400
    assert words in caught.value.message
    assert field in json.dumps(caught.value.to_json())


def test_call_reader_splits_streamed_text_at_the_tags() -> None:
    reader = CallReader()
    out = []
    for piece in ["Let me", " look.\n<tool", '_call>\n{"name": "f", ', '"arguments": {"x": 1}}\n</tool_', "call>\n",
                  "<tool_call>\nnot json\n</tool_call>"]:
        out += reader.push(piece)
    out += reader.finish()
    assert out == [TextPart("Let me"), TextPart(" look."), CallPart("f", {"x": 1}),
                   MalformedCall("\nnot json\n</tool_call>")]


@pytest.mark.parametrize("script", [
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```',
])
def test_a_call_written_without_tags_is_a_call(script: str) -> None:
    response, _ = run(script, request_body(tools=TOOLS))
    assert parts(response) == [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]


def test_text_cannot_begin_like_a_call_without_being_one() -> None:
    # The model starts a JSON object that is no call: the grammar makes it one.
    response, _ = run('{"answer": 42}', request_body(tools=TOOLS))
    (call,) = calls(response)
    assert call["name"] in ("get_weather", "get_time")


def test_a_repeated_call_is_left_out_and_the_model_answers_in_text() -> None:
    # The model calls get_weather(Paris) again although the conversation holds its result.
    body = request_body(tools=TOOLS, contents=[
        {"role": "user", "parts": [{"text": "Weather in Paris?"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp_c": 21}}}]},
    ])
    response, engine = run(PARIS_CALL, body)
    assert calls(response) == []
    text = "".join(p.get("text", "") for p in parts(response))
    assert text and not text.startswith("{")
    assert len(engine.prompts) == 2
    first, second = engine.prompts
    # The second attempt's prompt is the first one's, less its generation prompt, plus a closing instruction.
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert shared >= len(first) - len("<|im_start|>assistant\n")
    assert RETRY_HINT in engine.detokenize(second)


def test_a_new_call_after_results_is_returned() -> None:
    body = request_body(tools=TOOLS, contents=[
        {"role": "user", "parts": [{"text": "Weather in Paris?"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp_c": 21}}}]},
    ])
    response, engine = run(PARIS_CALL.replace("Paris", "Lyon"), body)
    assert calls(response) == [{"name": "get_weather", "args": {"city": "Lyon"}}]
    assert len(engine.prompts) == 1


def test_a_repeating_model_is_cut_short_and_its_answer_stays_within_the_budget() -> None:
    body = request_body(tools=TOOLS, generationConfig={"maxOutputTokens": 300}, contents=[
        {"role": "user", "parts": [{"text": "Weather in Paris?"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp_c": 21}}}]},
    ])
    script = PARIS_CALL * 2
    response, engine = run(script, body)
    candidate = response["candidates"][0]
    assert candidate["finishReason"] == "STOP"
    script_tokens = len(engine.tokenize(script, add_bos=False, parse_special=True))
    # The first attempt stopped after one call: one call's tokens, then the whole (text) second attempt.
    assert candidate["tokenCount"] == script_tokens // 2 + script_tokens
    assert calls(response) == [] and parts(response)[0]["text"]


def test_a_json_answer_beside_tools_is_not_read_as_a_call() -> None:
    body = request_body(tools=TOOLS, generationConfig={
        "responseMimeType": "application/json",
        "responseSchema": {"type": "OBJECT", "properties": {"recipe": {"type": "STRING"}}, "required": ["recipe"]}})
    response, _ = run('{"recipe": "soup"}', body)
    assert parts(response) == [{"text": '{"recipe": "soup"}'}]
    assert response["candidates"][0]["finishReason"] == "STOP"


def test_text_beginning_with_a_space_and_a_brace_stays_text() -> None:
    response, _ = run(' {"a": 1} is JSON', request_body(tools=TOOLS))
    assert parts(response) == [{"text": ' {"a": 1} is JSON'}]


def test_a_closing_tag_inside_an_argument_does_not_end_the_call() -> None:
    # (The scripted model cannot spell the tag as plain text, so the reader is driven directly.)
    reader = CallReader()
    out = []
    for piece in ["<tool_call>\n", '{"name": "f", "arguments": {"s": "</tool_', 'call>"}}', "\n</tool_call>"]:
        out += reader.push(piece)
    out += reader.finish()
    assert out == [CallPart("f", {"s": "</tool_call>"})]


def test_any_returns_a_repeated_call() -> None:
    body = request_body(tools=TOOLS, toolConfig=with_mode("ANY"), contents=[
        {"role": "user", "parts": [{"text": "Weather in Paris?"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp_c": 21}}}]},
    ])
    response, _ = run(PARIS_CALL, body)
    assert calls(response) == [{"name": "get_weather", "args": {"city": "Paris"}}]


def test_a_dropped_first_attempt_sends_no_logprobs() -> None:
    body = request_body(tools=TOOLS, generationConfig={"responseLogprobs": True, "maxOutputTokens": 300}, contents=[
        {"role": "user", "parts": [{"text": "Weather in Paris?"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp_c": 21}}}]},
    ])
    chunks, engine = run(PARIS_CALL + "It is warm.", body, stream=True)
    assert len(engine.prompts) == 2
    sent = [c["token"] for chunk in chunks
            for c in chunk["candidates"][0].get("logprobsResult", {}).get("chosenCandidates", [])]
    text = "".join(p.get("text", "") for chunk in chunks for p in parts(chunk))
    assert "".join(sent) == text  # exactly the tokens of the answer that went out, none of the dropped call


def test_a_streamed_answer_sent_back_a_content_a_chunk_is_one_turn() -> None:
    """google-genai's chats keep a streamed answer as one model content per chunk, the last one an empty text
    (the chunk that carries finishReason), and send them all back: that is the model's one turn, as it wrote it."""
    chunked = request_body(tools=TOOLS, contents=[
        {"role": "user", "parts": [{"text": "Weather in Paris?"}]},
        {"role": "model", "parts": [{"text": "Let me "}]},
        {"role": "model", "parts": [{"text": "check.\n"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]},
        {"role": "model", "parts": [{"text": ""}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp_c": 21}}}]},
    ])
    whole = request_body(tools=TOOLS, contents=[
        chunked["contents"][0],
        {"role": "model", "parts": [{"text": "Let me check.\n"},
                                    {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]},
        chunked["contents"][-1],
    ])
    response, engine = run("It is 21 degrees.", chunked)
    assert parts(response) == [{"text": "It is 21 degrees."}]
    _, reference = run("It is 21 degrees.", whole)
    assert engine.prompts == reference.prompts
    assert engine.detokenize(engine.prompts[0]).count("<|im_start|>assistant") == 2  # the turn, and the answer


def test_the_empty_last_chunk_of_a_stream_goes_back_as_history() -> None:
    chunks, _ = run("Hello there!", request_body(), stream=True)
    history = [{"role": "user", "parts": [{"text": "Hello"}]}]
    history += [c["candidates"][0]["content"] for c in chunks]
    assert history[-1]["parts"] == [{"text": ""}]  # the chunk with finishReason STOP, as Google sends it
    history.append({"role": "user", "parts": [{"text": "And again?"}]})
    response, engine = run("Hello again!", request_body(contents=history))
    assert parts(response) == [{"text": "Hello again!"}]
    assert "Hello there!<|im_end|>" in engine.detokenize(engine.prompts[0])


def test_a_call_sent_back_with_whole_numbers_as_floats_counts_as_answered() -> None:
    """google-generativeai (protobuf's Struct) sends a call's integer arguments back as floats: 3 is 3.0."""
    days = {"name": "forecast", "parameters": {"type": "OBJECT", "properties": {"days": {"type": "INTEGER"}},
                                               "required": ["days"]}}
    body = request_body(tools=[{"functionDeclarations": [days]}], contents=[
        {"role": "user", "parts": [{"text": "The forecast for three days?"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "forecast", "args": {"days": 3.0}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "forecast", "response": {"sky": "clear"}}}]},
    ])
    response, engine = run('<tool_call>\n{"name": "forecast", "arguments": {"days": 3}}\n</tool_call>', body)
    assert calls(response) == []
    assert len(engine.prompts) == 2  # the repeated call was left out, and the model asked again for text


@pytest.mark.parametrize("mode", ["AUTO", "ANY"])
def test_a_function_declared_without_parameters_is_called_without_arguments(mode: str) -> None:
    clock = {"name": "get_time", "description": "The current time."}
    body = request_body(tools=[{"functionDeclarations": [clock]}], toolConfig=with_mode(mode))
    response, _ = run('<tool_call>\n{"name": "get_time", "arguments": {"type": "object", "zone": "CET"}}\n'
                      '</tool_call>', body)
    found = calls(response)
    assert found and all(call == {"name": "get_time", "args": {}} for call in found)


RECORD = {"name": "record", "description": "Record a person.", "parametersJsonSchema": {
    "type": "object", "properties": {"name": {"type": "string"}, "color": {"$ref": "#/$defs/Color"},
                                     "friends": {"type": "array", "items": {"$ref": "#"}, "maxItems": 1},
                                     "default": {"$ref": "#/$defs/Color"}},  # a property's name, not a keyword
    "required": ["name", "color"], "additionalProperties": False,
    "$defs": {"Color": {"type": "string", "enum": ["red", "green"]}}}}


@pytest.mark.parametrize("mode", ["AUTO", "ANY"])
def test_parameters_with_references_are_held_to_their_schema(mode: str) -> None:
    """pydantic-ai and others write nested and recursive models as `$defs` and `$ref` (`#` for the whole schema):
    they keep their meaning inside the grammar of calls, where each function's schema is nested."""
    body = request_body(tools=[{"functionDeclarations": [RECORD, WEATHER]}], toolConfig=with_mode(mode))
    script = ('<tool_call>\n{"name": "record", "arguments": {"name": "Alice", "color": "green", '
              '"friends": [{"name": "Bob", "color": "blue"}]}}\n</tool_call>')
    response, _ = run(script, body)
    (call,) = calls(response)
    assert call["name"] == "record"
    jsonschema.validate(call["args"], RECORD["parametersJsonSchema"])
    assert call["args"]["color"] == "green"
    assert call["args"]["friends"][0]["color"] in ("red", "green")  # "blue" is not among the enum's values
