"""Every GenerationConfig field has a visible effect on what the real model returns."""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest

from tests.conftest import Server

PROMPT = "The history of Rome"


def generate(server: Server, config: dict[str, Any], text: str = PROMPT) -> dict[str, Any]:
    body = {"contents": [{"parts": [{"text": text}]}], "generationConfig": config}
    response = httpx.post(f"{server.url}/v1beta/models/gemma-3-270m:generateContent", json=body, timeout=180)
    assert response.status_code == 200, response.text
    return response.json()


def text_of(response: dict[str, Any], index: int = 0) -> str:
    return response["candidates"][index]["content"]["parts"][0]["text"]


def test_max_output_tokens_gives_max_tokens(server: Server) -> None:
    response = generate(server, {"maxOutputTokens": 5, "temperature": 0})
    candidate = response["candidates"][0]
    assert candidate["finishReason"] == "MAX_TOKENS"
    assert candidate["tokenCount"] == 5 == response["usageMetadata"]["candidatesTokenCount"]


def test_temperature_zero_is_deterministic(server: Server) -> None:
    first = generate(server, {"maxOutputTokens": 20, "temperature": 0})
    second = generate(server, {"maxOutputTokens": 20, "temperature": 0})
    assert text_of(first) == text_of(second)


def test_seed_reproduces_and_other_seeds_differ(server: Server) -> None:
    config = {"maxOutputTokens": 24, "temperature": 1.5, "topK": 200, "topP": 1.0}
    texts = [text_of(generate(server, {**config, "seed": seed})) for seed in (11, 11, 12, 13)]
    assert texts[0] == texts[1]
    assert len({texts[0], texts[2], texts[3]}) > 1


def test_stop_sequence_cuts_the_text_and_is_not_included(server: Server) -> None:
    free = text_of(generate(server, {"maxOutputTokens": 30, "temperature": 0}))
    words = free.split()
    stop = next(w for w in words[2:] if len(w) > 3)  # a word the greedy continuation really produces
    cut = generate(server, {"maxOutputTokens": 30, "temperature": 0, "stopSequences": [stop]})
    assert text_of(cut) == free[: free.index(stop)]
    assert cut["candidates"][0]["finishReason"] == "STOP"
    assert stop not in text_of(cut)


def test_candidate_count_gives_that_many_indexed_candidates(server: Server) -> None:
    response = generate(server, {"maxOutputTokens": 8, "candidateCount": 3, "temperature": 1.0, "seed": 5})
    candidates = response["candidates"]
    assert [c["index"] for c in candidates] == [0, 1, 2]
    assert response["usageMetadata"]["candidatesTokenCount"] == sum(c["tokenCount"] for c in candidates)
    assert len({text_of(response, i) for i in range(3)}) > 1


def test_logprobs_are_consistent_log_probabilities(server: Server) -> None:
    response = generate(server, {"maxOutputTokens": 6, "temperature": 0, "responseLogprobs": True, "logprobs": 3})
    candidate = response["candidates"][0]
    chosen = candidate["logprobsResult"]["chosenCandidates"]
    top = candidate["logprobsResult"]["topCandidates"]
    assert len(chosen) == len(top) == 6
    for pick, step in zip(chosen, top, strict=True):
        assert pick["logProbability"] <= 0
        assert len(step["candidates"]) == 3
        assert step["candidates"][0]["tokenId"] == pick["tokenId"]  # greedy picks the most likely token
        assert sum(math.exp(c["logProbability"]) for c in step["candidates"]) <= 1.0 + 1e-6
    assert "".join(p["token"] for p in chosen) == text_of(response)
    mean = sum(p["logProbability"] for p in chosen) / len(chosen)
    assert candidate["avgLogprobs"] == pytest.approx(mean)


def test_presence_penalty_breaks_a_repetition(server: Server) -> None:
    prompt = "a b a b a b a b"
    plain = text_of(generate(server, {"maxOutputTokens": 16, "temperature": 0}, prompt))
    penalized = text_of(generate(server, {"maxOutputTokens": 16, "temperature": 0, "presencePenalty": 2.0}, prompt))
    assert plain.count("a b") > penalized.count("a b")


def test_frequency_penalty_breaks_a_repetition(server: Server) -> None:
    prompt = "one one one one one one one one"
    plain = text_of(generate(server, {"maxOutputTokens": 12, "temperature": 0}, prompt))
    penalized = text_of(generate(server, {"maxOutputTokens": 12, "temperature": 0, "frequencyPenalty": 2.0}, prompt))
    assert plain.count("one") > penalized.count("one")


def test_top_k_one_equals_greedy(server: Server) -> None:
    greedy = text_of(generate(server, {"maxOutputTokens": 12, "temperature": 0}))
    assert text_of(generate(server, {"maxOutputTokens": 12, "temperature": 1.0, "topK": 1, "seed": 3})) == greedy
