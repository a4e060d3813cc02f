"""uvicorn's HTTP/1.1 protocol with what a server facing the open network needs beyond it.

- A request line or header block that h11 cannot parse never reaches the application: uvicorn answers it with a
  plain-text 400. Clients of the Gemini API expect a `google.rpc.Status` JSON body on every error, so this
  protocol sends one.
- uvicorn waits for a request's headers as long as bytes keep coming, so a client sending one byte every few
  seconds holds a connection for ever. Here the headers must be complete within HEADER_SECONDS of the connection
  (or of the previous response): after that the client gets a 408 and the connection is closed. Bodies have
  their own timeout per chunk (`api/streaming.py`).
- At the connection limit (`limit_concurrency`) uvicorn answers a plain-text 503; here a connection beyond it
  gets a JSON 503 UNAVAILABLE at once, with Retry-After, and is closed.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from gemserve.errors import RETRY_AFTER_SECONDS, ApiError

HEADER_SECONDS = 30.0
REFUSED_LINGER_SECONDS = 1.0


def _status_response(code: int, reason: bytes, error: ApiError) -> list[h11.Event]:
    data = json.dumps(error.to_json()).encode()
    headers = [(b"content-type", b"application/json; charset=UTF-8"), (b"content-length", str(len(data)).encode()),
               (b"connection", b"close")]
    return [h11.Response(status_code=code, headers=headers, reason=reason), h11.Data(data=data), h11.EndOfMessage()]


class StatusH11Protocol(H11Protocol):
    _header_deadline: asyncio.TimerHandle | None = None
    _awaited_after: object = None  # the cycle before the request whose headers are awaited
    _refused = False  # beyond the connection limit: answered 503, whatever it sends is dropped

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.limit_concurrency is not None and len(self.connections) >= self.limit_concurrency:  # as uvicorn counts
            self._refused = True
            self._refuse(503, b"Service Unavailable", {"code": 503, "status": "UNAVAILABLE", "message": "The server "
                         "has too many open connections; try again shortly."}, retry_after=RETRY_AFTER_SECONDS,
                         linger=REFUSED_LINGER_SECONDS)
            return
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        if self._refused:  # read and dropped: closing with unread bytes would reset the connection, answer and all
            return
        super().data_received(data)
        if self.cycle is not self._awaited_after:  # a request's headers arrived whole
            self._stop_awaiting()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # A pipelined request already read is under way now (uvicorn starts it here): its completion starts the
        # deadline for the one after it.
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_awaiting()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        error = ApiError("INVALID_ARGUMENT", f"{msg} The request is not valid HTTP/1.1.")
        for event in _status_response(400, b"Bad Request", error):
            if out := self.conn.send(event):
                self.transport.write(out)
        self.transport.close()

    def _await_headers(self) -> None:
        self._stop_awaiting()
        self._awaited_after = self.cycle
        self._header_deadline = self.loop.call_later(HEADER_SECONDS, self._headers_too_slow)

    def _stop_awaiting(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing():
            return
        self._refuse(408, b"Request Timeout", {"code": 408, "status": "DEADLINE_EXCEEDED", "message": "The request's "
                     f"headers did not arrive within {HEADER_SECONDS:g} seconds."})

    def _refuse(self, code: int, reason: bytes, error: dict[str, object], retry_after: int | None = None,
                linger: float = 0.0) -> None:
        """Answer before any request was read (written by hand: h11 sends no response before it has read one)
        and close the connection (after `linger` seconds, for the client's request to arrive and be dropped)."""
        data = json.dumps({"error": error}).encode()
        extra = b"retry-after: %d\r\n" % retry_after if retry_after is not None else b""
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json; charset=UTF-8\r\n" % (code, reason)
                             + extra + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(data) + data)
        if linger:
            self.loop.call_later(linger, self.transport.close)
        else:
            self.transport.close()
