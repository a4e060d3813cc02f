"""Reading request bodies: slow senders are cut off, non-JSON bodies refused, before any route sees them."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.requests import Request

from gemserve.api import streaming
from gemserve.errors import ApiError


def request_with(messages: list[dict[str, Any]], content_type: str = "application/json") -> Request:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        await asyncio.sleep(3600)  # a client that stopped sending
        raise AssertionError("unreachable")

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-type", content_type.encode())]}
    return Request(scope, receive)


def test_a_body_that_stops_arriving_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streaming, "BODY_CHUNK_TIMEOUT_SECONDS", 0.2)
    request = request_with([{"type": "http.request", "body": b'{"contents": ', "more_body": True}])
    with pytest.raises(ApiError, match="stopped arriving") as caught:
        asyncio.run(streaming.read_json(request))
    assert caught.value.status == "DEADLINE_EXCEEDED"


def test_a_body_sent_in_chunks_is_read_whole() -> None:
    request = request_with([{"type": "http.request", "body": b'{"a": ', "more_body": True},
                            {"type": "http.request", "body": b"[1, 2]}", "more_body": False}])
    assert asyncio.run(streaming.read_json(request)) == {"a": [1, 2]}


def test_a_form_body_is_refused() -> None:
    request = request_with([{"type": "http.request", "body": b"a=1", "more_body": False}],
                           "application/x-www-form-urlencoded")
    with pytest.raises(ApiError, match="send the request body as JSON"):
        asyncio.run(streaming.read_json(request))
