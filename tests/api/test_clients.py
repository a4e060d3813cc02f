"""The official clients, unmodified, against a real server on 127.0.0.1 with the real model."""

from __future__ import annotations

import json
import warnings

import httpx
import pytest
from google import genai
from google.genai import types

from tests.conftest import Server

SHORT = types.GenerateContentConfig(max_output_tokens=12, temperature=0.0)


@pytest.fixture(params=["v1beta", "v1"])
def client(request: pytest.FixtureRequest, server: Server) -> genai.Client:
    return genai.Client(api_key="anything",
                        http_options=types.HttpOptions(base_url=server.url, api_version=request.param))


def test_generate_content(client: genai.Client) -> None:
    response = client.models.generate_content(model="gemma-3-270m", contents="The capital of France is",
                                              config=SHORT)
    assert response.text
    candidate = response.candidates[0]
    assert candidate.finish_reason in (types.FinishReason.STOP, types.FinishReason.MAX_TOKENS)
    assert candidate.index == 0
    usage = response.usage_metadata
    assert usage.prompt_token_count > 0 and 0 < usage.candidates_token_count <= 12
    assert usage.total_token_count == usage.prompt_token_count + usage.candidates_token_count
    assert response.model_version == "gemma-3-270m"
    assert response.response_id


def test_alias_is_served_and_model_version_tells_the_truth(client: genai.Client) -> None:
    response = client.models.generate_content(model="gemini-2.0-flash", contents="Hello", config=SHORT)
    assert response.model_version == "gemma-3-270m"
    model = client.models.get(model="gemini-2.0-flash")
    assert model.name == "models/gemini-2.0-flash"


def test_stream_matches_the_whole_answer(client: genai.Client) -> None:
    whole = client.models.generate_content(model="gemma-3-270m", contents="Once upon a time", config=SHORT)
    chunks = list(client.models.generate_content_stream(model="gemma-3-270m", contents="Once upon a time",
                                                        config=SHORT))
    assert len(chunks) > 1
    assert "".join(c.text or "" for c in chunks) == whole.text
    assert chunks[-1].candidates[0].finish_reason == whole.candidates[0].finish_reason


def test_chat_keeps_history(client: genai.Client) -> None:
    chat = client.chats.create(model="gemma-3-270m", config=types.GenerateContentConfig(
        max_output_tokens=8, temperature=0.0, system_instruction="You are a helpful assistant."))
    first = chat.send_message("My name is Ada.")
    second = chat.send_message("What is my name?")
    assert first.text is not None and second.text is not None
    history = chat.get_history()
    assert [c.role for c in history] == ["user", "model", "user", "model"]
    # the second turn's prompt holds the first exchange
    assert second.usage_metadata.prompt_token_count > first.usage_metadata.prompt_token_count + 5


def test_models_get_and_list(client: genai.Client) -> None:
    model = client.models.get(model="gemma-3-270m")
    assert model.name == "models/gemma-3-270m"
    assert model.input_token_limit == 8192  # the test server runs with --context-size 8192
    assert model.output_token_limit == 8192
    assert "generateContent" in model.supported_actions
    assert model.temperature == 1.0 and model.top_p == 0.95 and model.top_k == 64
    assert [m.name for m in client.models.list()] == ["models/gemma-3-270m", "models/qwen2.5-coder-0.5b-instruct",
                                                     "models/all-minilm-l6-v2"]


def test_count_tokens_predicts_prompt_usage(client: genai.Client) -> None:
    counted = client.models.count_tokens(model="gemma-3-270m", contents="How many tokens is this?")
    response = client.models.generate_content(model="gemma-3-270m", contents="How many tokens is this?",
                                              config=SHORT)
    assert counted.total_tokens == response.usage_metadata.prompt_token_count


def test_google_generativeai_rest_transport(server: Server) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import google.generativeai as legacy
    legacy.configure(api_key="anything", transport="rest", client_options={"api_endpoint": server.url})
    model = legacy.GenerativeModel("gemini-2.0-flash")
    config = {"max_output_tokens": 10, "temperature": 0}
    whole = model.generate_content("The history of Rome", generation_config=config)
    streamed = list(model.generate_content("The history of Rome", generation_config=config, stream=True))
    assert whole.text
    assert "".join(chunk.text for chunk in streamed) == whole.text
    assert model.count_tokens("The history of Rome").total_tokens > 0


CURL_BODIES = [
    # the reference's text example
    '{"contents": [{"parts":[{"text": "Write a story about a magic backpack."}]}]}',
    # chat, with the reference's trailing comma
    '{"contents": [{"role":"user", "parts":[{"text": "Hello"}]}, {"role": "model", "parts":[{"text": "Great to '
    'meet you. What would you like to know?"}]}, {"role":"user", "parts":[{"text": "I have two dogs in my house. '
    'How many paws are in my house?"}]},]}',
    # safety settings and generation config
    '{"contents": [{"parts":[{"text": "Write a story about a magic backpack."}]}], "safetySettings": [{"category": '
    '"HARM_CATEGORY_DANGEROUS_CONTENT", "threshold": "BLOCK_ONLY_HIGH"}], "generationConfig": {"stopSequences": '
    '["Title"], "temperature": 1.0, "maxOutputTokens": 20, "topP": 0.8, "topK": 10}}',
    # system instruction, snake_case, single objects where lists are expected
    '{"system_instruction": {"parts": {"text": "You are a cat. Your name is Neko."}}, "contents": {"parts": '
    '{"text": "Hello there"}}, "generation_config": {"max_output_tokens": 10}}',
]


@pytest.mark.parametrize("body", CURL_BODIES)
def test_reference_curl_bodies(server: Server, body: str) -> None:
    url = f"{server.url}/v1beta/models/gemini-2.0-flash:generateContent?key=anything"
    if "axOutputTokens" not in body and "ax_output_tokens" not in body:
        # The pretrained model rarely stops by itself: bound the answer, leaving the body's text as it is.
        body = '{"generationConfig": {"maxOutputTokens": 20}, ' + body[1:]
    response = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=120)
    assert response.status_code == 200, response.text
    assert "text" in response.json()["candidates"][0]["content"]["parts"][0]


def test_sse_frames_and_json_array_stream(server: Server) -> None:
    body = {"contents": [{"parts": [{"text": "One, two,"}]}], "generationConfig": {"maxOutputTokens": 6}}
    url = f"{server.url}/v1beta/models/gemma-3-270m:streamGenerateContent"
    sse = httpx.post(url + "?alt=sse", json=body, timeout=120)
    assert sse.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in sse.text.split("\r\n\r\n") if f]
    assert all(f.startswith("data: ") for f in frames)
    events = [json.loads(f[len("data: "):]) for f in frames]
    assert events[-1]["candidates"][0]["finishReason"] == "MAX_TOKENS"
    array = httpx.post(url, json=body, timeout=120)
    elements = json.loads(array.text)
    assert isinstance(elements, list) and elements[-1]["candidates"][0]["finishReason"] == "MAX_TOKENS"
