"""JSON output and function calling end to end: the official clients, unmodified apart from the base URL, against
a real server with the built-in instruction-tuned model (reached by a Gemini model name).

The model is small, so these tests check what the server guarantees whatever the model writes: output that
parses and validates, calls of allowed functions with valid arguments, the SDK's loop finishing in text.
"""

from __future__ import annotations

import json

import google.generativeai as old_genai
import jsonschema
import pytest
from google import genai
from google.genai import errors, types
from pydantic import BaseModel

from tests.conftest import Server

MODEL = "gemini-2.5-flash"  # any gemini-* name reaches models/qwen2.5-coder-0.5b-instruct
pytestmark = pytest.mark.slow


class Recipe(BaseModel):
    recipe_name: str
    minutes: int
    vegan: bool


@pytest.fixture(scope="module")
def client(server: Server) -> genai.Client:
    return genai.Client(api_key="anything", http_options=types.HttpOptions(base_url=server.url))


def config(**fields: object) -> types.GenerateContentConfig:
    return types.GenerateContentConfig(seed=7, max_output_tokens=160, **fields)  # type: ignore[arg-type]


def test_pydantic_schema_gives_a_parsed_instance(client: genai.Client) -> None:
    response = client.models.generate_content(
        model=MODEL, contents="Give me one cookie recipe.",
        config=config(response_mime_type="application/json", response_schema=Recipe))
    assert isinstance(response.parsed, Recipe), response.text
    assert response.model_version == "qwen2.5-coder-0.5b-instruct"


def test_json_schema_output_validates(client: genai.Client) -> None:
    schema = {"type": "object", "properties": {"colors": {"type": "array", "items": {"type": "string"},
                                                          "minItems": 1, "maxItems": 3}},
              "required": ["colors"]}
    response = client.models.generate_content(
        model=MODEL, contents="Name the colors of the French flag.",
        config=config(response_mime_type="application/json", response_json_schema=schema))
    jsonschema.validate(json.loads(response.text or ""), schema)


def test_enum_output_is_one_of_the_values(client: genai.Client) -> None:
    values = ["Percussion", "String", "Woodwind", "Brass", "Keyboard"]
    response = client.models.generate_content(
        model=MODEL, contents="What type of instrument is a violin?",
        config=config(response_mime_type="text/x.enum", response_schema={"type": "STRING", "enum": values}))
    assert response.text in values


def test_streamed_json_parses_when_joined(client: genai.Client) -> None:
    chunks = list(client.models.generate_content_stream(
        model=MODEL, contents="Give me one cookie recipe.",
        config=config(response_mime_type="application/json", response_schema=Recipe)))
    assert len(chunks) > 1
    Recipe.model_validate_json("".join(c.text or "" for c in chunks))


WEATHER = types.FunctionDeclaration(
    name="get_weather", description="The current weather in a city.",
    parameters=types.Schema(type=types.Type.OBJECT, properties={"city": types.Schema(type=types.Type.STRING)},
                            required=["city"]))
TIME = types.FunctionDeclaration(
    name="get_time", description="The current time in a time zone.",
    parameters_json_schema={"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]})


def test_any_with_allowed_names_calls_an_allowed_function(client: genai.Client) -> None:
    response = client.models.generate_content(
        model=MODEL, contents="What's the weather in Paris?",
        config=config(tools=[types.Tool(function_declarations=[WEATHER, TIME])],
                      tool_config=types.ToolConfig(function_calling_config=types.FunctionCallingConfig(
                          mode=types.FunctionCallingConfigMode.ANY, allowed_function_names=["get_time"]))))
    calls = response.function_calls or []
    assert calls and all(c.name == "get_time" for c in calls)
    jsonschema.validate(calls[0].args, TIME.parameters_json_schema)


def test_automatic_function_calling_ends_in_text(client: genai.Client) -> None:
    seen: list[str] = []

    def get_weather(city: str) -> dict:
        """Returns the current weather in a city."""
        seen.append(city)
        return {"city": city, "temperature_c": 21, "sky": "clear"}

    response = client.models.generate_content(model=MODEL, contents="What's the weather like in Paris?",
                                              config=config(tools=[get_weather]))
    assert seen, "the model never called the function"
    assert response.text and not response.function_calls
    history = response.automatic_function_calling_history or []
    assert any(p.function_response for content in history for p in content.parts or [])


def test_none_answers_in_text(client: genai.Client) -> None:
    response = client.models.generate_content(
        model=MODEL, contents="What's the weather in Paris?",
        config=config(tools=[types.Tool(function_declarations=[WEATHER])],
                      tool_config=types.ToolConfig(function_calling_config=types.FunctionCallingConfig(
                          mode=types.FunctionCallingConfigMode.NONE))))
    assert response.text and not response.function_calls
    assert "<tool_call>" not in response.text  # the tag's token could not be drawn


def test_history_with_function_responses_is_accepted(client: genai.Client) -> None:
    contents = [
        types.Content(role="user", parts=[types.Part.from_text(text="What's the weather in Paris?")]),
        types.Content(role="model", parts=[types.Part.from_function_call(name="get_weather",
                                                                         args={"city": "Paris"})]),
        types.Content(role="user", parts=[types.Part.from_function_response(
            name="get_weather", response={"temperature_c": 21, "sky": "clear"})]),
    ]
    response = client.models.generate_content(
        model=MODEL, contents=contents, config=config(tools=[types.Tool(function_declarations=[WEATHER])]))
    assert response.candidates and response.candidates[0].content


def test_invalid_declarations_are_400(client: genai.Client) -> None:
    bad = types.FunctionDeclaration(name="no spaces allowed")
    with pytest.raises(errors.ClientError) as caught:
        client.models.generate_content(model=MODEL, contents="hi",
                                       config=config(tools=[types.Tool(function_declarations=[bad])]))
    assert caught.value.code == 400 and "Invalid function name" in str(caught.value)


def test_google_generativeai_function_calling_and_json(server: Server) -> None:
    old_genai.configure(api_key="anything", transport="rest", client_options={"api_endpoint": server.url})
    model = old_genai.GenerativeModel(MODEL, tools=[old_genai.protos.Tool(function_declarations=[
        old_genai.protos.FunctionDeclaration(name="get_weather", description="The weather in a city.",
                                             parameters={"type": "OBJECT", "properties": {"city": {"type": "STRING"}},
                                                         "required": ["city"]})])])
    response = model.generate_content("Weather in Rome?", tool_config={"function_calling_config": {"mode": "ANY"}},
                                      generation_config={"max_output_tokens": 80, "temperature": 0})
    call = response.candidates[0].content.parts[0].function_call
    assert call.name == "get_weather" and isinstance(call.args["city"], str)

    plain = old_genai.GenerativeModel(MODEL)
    answer = plain.generate_content("One cookie recipe.", generation_config={
        "response_mime_type": "application/json", "max_output_tokens": 160, "temperature": 0,
        "response_schema": {"type": "OBJECT", "properties": {"recipe_name": {"type": "STRING"}},
                            "required": ["recipe_name"]}})
    assert isinstance(json.loads(answer.text)["recipe_name"], str)


def test_a_streamed_chat_goes_on_to_its_second_turn(client: genai.Client) -> None:
    """google-genai's chats keep a streamed answer as a content a chunk, the last one the empty text that carries
    finishReason, and send them all back with the next message."""
    chat = client.chats.create(model=MODEL, config=types.GenerateContentConfig(temperature=0, max_output_tokens=48))
    first = list(chat.send_message_stream("Hi, I'm Carl. Remember my name."))
    assert first[-1].candidates[0].finish_reason == types.FinishReason.STOP
    second = "".join(chunk.text or "" for chunk in chat.send_message_stream("What is my name?"))
    assert "Carl" in second
    assert len(chat.get_history()) > 4  # the model turns as one content per chunk, as the SDK keeps them


def test_old_sdk_automatic_function_calling_runs_a_call_once(server: Server) -> None:
    """google-generativeai sends a call's integers back as floats (17.0): the same call, answered already."""
    old_genai.configure(api_key="anything", transport="rest", client_options={"api_endpoint": server.url})
    called: list[tuple[int, int]] = []

    def add(a: int, b: int) -> int:
        """Adds two integers."""
        called.append((a, b))
        return a + b

    model = old_genai.GenerativeModel(MODEL, tools=[add],
                                      generation_config={"temperature": 0, "max_output_tokens": 128})
    chat = model.start_chat(enable_automatic_function_calling=True)
    answer = chat.send_message("What is 17 plus 25? Use the add tool.")
    assert called == [(17, 25)]  # (17.0, 25.0) from the SDK
    assert "42" in answer.text
