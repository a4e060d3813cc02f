"""gemserve's HTTP protocol on a real uvicorn server (a trivial app, in process): errors uvicorn answers itself
come as google.rpc.Status JSON, and slow senders of headers are cut off."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from gemserve.api import http


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """"ok"; on /slow, "ok" in pieces over 1.5 s (longer than the test's header deadline)."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    if scope["path"] == "/slow":
        await send({"type": "http.response.body", "body": b"o", "more_body": True})
        await asyncio.sleep(1.5)
        await send({"type": "http.response.body", "body": b"k"})
    else:
        await send({"type": "http.response.body", "body": b"ok"})


LIMIT = 3  # connections, as uvicorn counts them: at most LIMIT - 1 are served at once


@pytest.fixture
def port(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setattr(http, "HEADER_SECONDS", 1.0)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(hello, host="127.0.0.1", port=free, http=http.StatusH11Protocol,
                                           log_config=None, lifespan="off", timeout_keep_alive=30,
                                           limit_concurrency=LIMIT))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield free
    server.should_exit = True
    thread.join(10)


def exchange(port: int, chunks: list[bytes], pause: float = 0.0) -> tuple[bytes, float]:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        try:
            for chunk in chunks:
                conn.sendall(chunk)
                time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server hung up first
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    return reply, time.monotonic() - started


def test_garbage_gets_a_json_400(port: int) -> None:
    reply, _ = exchange(port, [b"NOT HTTP AT ALL\r\n\r\n"])
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and json.loads(body)["error"]["status"] == "INVALID_ARGUMENT"


def test_headers_sent_a_byte_at_a_time_are_cut_off(port: int) -> None:
    request = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    reply, took = exchange(port, [request[i:i + 1] for i in range(len(request))], pause=0.05)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(body)["error"] == {"code": 408, "status": "DEADLINE_EXCEEDED",
                                         "message": "The request's headers did not arrive within 1 seconds."}
    assert took < 5  # cut at the deadline, not when the client finished


def read_responses(conn: socket.socket, count: int) -> bytes:
    """Until `count` responses of two body bytes each have arrived."""
    reply = b""
    while reply.count(b"HTTP/1.1 ") < count or not reply.endswith(b"ok"):
        chunk = conn.recv(65536)
        assert chunk, f"connection closed after {reply!r}"
        reply += chunk
    return reply


def test_requests_in_time_and_keep_alive_are_served(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        for _ in range(3):  # the deadline starts again for each request on the connection
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_responses(conn, 1).startswith(b"HTTP/1.1 200")
            time.sleep(0.6)


def test_a_pipelined_request_is_not_cut_by_the_deadline(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\nGET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = read_responses(conn, 2)
    assert reply.count(b"HTTP/1.1 200") == 2 and b"408" not in reply


def test_a_connection_beyond_the_limit_gets_a_json_503(port: int) -> None:
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(LIMIT - 1)]
    try:
        for conn in held:  # these are served
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_responses(conn, 1).startswith(b"HTTP/1.1 200")
        reply, _ = exchange(port, [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"])
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 5" in head.lower()
        assert json.loads(body)["error"]["status"] == "UNAVAILABLE"
    finally:
        for conn in held:
            conn.close()
    time.sleep(0.2)
    reply, _ = exchange(port, [b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"])
    assert reply.startswith(b"HTTP/1.1 200")  # room again once they left
