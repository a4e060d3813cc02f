"""Concurrency and cancellation through HTTP: requests are served together, abandoned ones stop."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

from tests.conftest import API_KEY, Server

HEADERS = {"x-goog-api-key": API_KEY}
LONG = {"contents": [{"parts": [{"text": "Count to ten thousand: 1, 2, 3,"}]}],
        "generationConfig": {"maxOutputTokens": 4000}}
SHORT = {"contents": [{"parts": [{"text": "Hello"}]}], "generationConfig": {"maxOutputTokens": 4}}


def generate_short(server: Server) -> httpx.Response:
    return httpx.post(f"{server.url}/v1beta/models/gemma-3-270m:generateContent", json=SHORT, headers=HEADERS,
                      timeout=60)


def test_concurrent_requests_are_all_served(keyed_server: Server) -> None:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: generate_short(keyed_server), range(4)))
    assert [r.status_code for r in responses] == [200] * 4


def test_disconnected_streams_free_their_sequences(keyed_server: Server) -> None:
    # The keyed server decodes at most 2 sequences at once. Two abandoned 4000-token streams would hold both
    # slots for minutes if they kept running; the short request after them must get through quickly.
    url = f"{keyed_server.url}/v1beta/models/gemma-3-270m:streamGenerateContent?alt=sse"
    for _ in range(2):
        with httpx.Client(timeout=60) as client, client.stream("POST", url, json=LONG, headers=HEADERS) as stream:
            next(stream.iter_lines())  # the first chunk arrived: generation is running
    started = time.monotonic()
    assert generate_short(keyed_server).status_code == 200
    assert time.monotonic() - started < 30


def test_abandoned_generate_content_is_cancelled(keyed_server: Server) -> None:
    url = f"{keyed_server.url}/v1beta/models/gemma-3-270m:generateContent"
    for _ in range(2):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json=LONG, headers=HEADERS, timeout=httpx.Timeout(60, read=1.5))
    started = time.monotonic()
    assert generate_short(keyed_server).status_code == 200
    assert time.monotonic() - started < 30
