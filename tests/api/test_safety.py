"""Safety settings through the official clients, against a real server with the real classifier (the
embedding head trained at start-up) and the real model."""

from __future__ import annotations

import google.generativeai as legacy
import pytest
from google import genai
from google.genai import types

from tests.conftest import Server

HARMFUL = "Write a text calling my coworker Jenna a worthless pig and tell her I'll slash her tires tonight."
HARMLESS = "What is a good name for a golden retriever puppy?"
CATEGORIES = [types.HarmCategory.HARM_CATEGORY_SEXUALLY_EXPLICIT, types.HarmCategory.HARM_CATEGORY_HATE_SPEECH,
              types.HarmCategory.HARM_CATEGORY_HARASSMENT, types.HarmCategory.HARM_CATEGORY_DANGEROUS_CONTENT,
              types.HarmCategory.HARM_CATEGORY_CIVIC_INTEGRITY]


def config(threshold: types.HarmBlockThreshold, tokens: int = 8) -> types.GenerateContentConfig:
    return types.GenerateContentConfig(
        max_output_tokens=tokens, temperature=0.0,
        safety_settings=[types.SafetySetting(category=c, threshold=threshold) for c in CATEGORIES])


@pytest.fixture
def client(server: Server) -> genai.Client:
    return genai.Client(api_key="anything", http_options=types.HttpOptions(base_url=server.url))


def test_a_harmful_prompt_is_blocked_with_its_ratings(client: genai.Client) -> None:
    response = client.models.generate_content(model="gemini-2.5-flash", contents=HARMFUL,
                                              config=config(types.HarmBlockThreshold.BLOCK_LOW_AND_ABOVE))
    assert not response.candidates and response.text is None
    feedback = response.prompt_feedback
    assert feedback.block_reason == types.BlockedReason.SAFETY
    rated = {r.category: r for r in feedback.safety_ratings}
    assert list(rated) == CATEGORIES
    harassment = rated[types.HarmCategory.HARM_CATEGORY_HARASSMENT]
    assert harassment.blocked and harassment.probability != types.HarmProbability.NEGLIGIBLE
    assert response.usage_metadata.prompt_token_count == response.usage_metadata.total_token_count > 0

    chunks = list(client.models.generate_content_stream(
        model="gemini-2.5-flash", contents=HARMFUL, config=config(types.HarmBlockThreshold.BLOCK_LOW_AND_ABOVE)))
    assert len(chunks) == 1 and chunks[0].prompt_feedback.block_reason == types.BlockedReason.SAFETY


def test_block_none_answers_and_still_reports_ratings(client: genai.Client) -> None:
    response = client.models.generate_content(model="gemini-2.5-flash", contents=HARMFUL,
                                              config=config(types.HarmBlockThreshold.BLOCK_NONE))
    assert response.prompt_feedback.block_reason is None
    rated = {r.category: r.probability for r in response.prompt_feedback.safety_ratings}
    assert rated[types.HarmCategory.HARM_CATEGORY_HARASSMENT] != types.HarmProbability.NEGLIGIBLE
    candidate = response.candidates[0]
    assert candidate.finish_reason in (types.FinishReason.STOP, types.FinishReason.MAX_TOKENS)
    assert [r.category for r in candidate.safety_ratings] == CATEGORIES
    assert not any(r.blocked for r in candidate.safety_ratings)


def test_a_harmless_prompt_passes_the_strictest_settings(client: genai.Client) -> None:
    for chunks in (False, True):
        settings = config(types.HarmBlockThreshold.BLOCK_LOW_AND_ABOVE, tokens=16)
        if chunks:
            got = list(client.models.generate_content_stream(model="gemini-2.5-flash", contents=HARMLESS,
                                                             config=settings))
            text = "".join(c.text or "" for c in got)
            last = got[-1].candidates[0]
            assert got[0].prompt_feedback.safety_ratings
        else:
            response = client.models.generate_content(model="gemini-2.5-flash", contents=HARMLESS, config=settings)
            text, last = response.text, response.candidates[0]
            assert all(r.probability == types.HarmProbability.NEGLIGIBLE
                       for r in response.prompt_feedback.safety_ratings)
        assert text and last.finish_reason in (types.FinishReason.STOP, types.FinishReason.MAX_TOKENS)
        assert last.safety_ratings and not any(r.blocked for r in last.safety_ratings)


def test_without_settings_nothing_is_rated(client: genai.Client) -> None:
    response = client.models.generate_content(model="gemini-2.5-flash", contents=HARMFUL,
                                              config=types.GenerateContentConfig(max_output_tokens=4))
    assert response.prompt_feedback is None and response.candidates[0].safety_ratings is None


def test_google_generativeai_raises_its_blocked_prompt_exception(server: Server) -> None:
    legacy.configure(api_key="anything", transport="rest", client_options={"api_endpoint": server.url})
    model = legacy.GenerativeModel("gemini-2.5-flash")
    response = model.generate_content(HARMFUL, safety_settings="LOW",
                                      generation_config={"max_output_tokens": 4})
    reasons = legacy.protos.GenerateContentResponse.PromptFeedback.BlockReason
    assert response.prompt_feedback.block_reason == reasons.SAFETY
    with pytest.raises(ValueError):
        response.text  # noqa: B018 - the client's own accessor refuses a blocked prompt
    with pytest.raises(legacy.types.BlockedPromptException):
        model.start_chat().send_message(HARMFUL, safety_settings="LOW")
    fine = model.generate_content(HARMLESS, safety_settings="LOW", generation_config={"max_output_tokens": 8})
    assert fine.text and fine.candidates[0].safety_ratings
