"""The two wire forms of streamGenerateContent, and stopping work when the client goes away.

`alt=sse`: `data: <json>` lines, each followed by a blank line (google-genai, curl examples).
Otherwise: one JSON array sent element by element (google-generativeai's REST transport).
The request is checked (and its prompt built) before the response starts, so a bad request still gets its
status code; then the headers go out at once, before the prompt is processed, since clients give up on a server
that sends no headers for a while (the Gemini CLI after 60 s, which a long prompt on a small machine can take).
A later error is sent in-band as the stream's last element. No keep-alive comments are sent: google-genai's SSE
parser expects every event to be a `data:` line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from gemserve.bodies import next_chunk
from gemserve.errors import ApiError
from gemserve.schema.wire import MAX_BODY_BYTES, parse_json_body

log = logging.getLogger("gemserve.api")
T = TypeVar("T")


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def streaming_response(chunks: AsyncIterator[dict[str, Any]], sse: bool) -> StreamingResponse:
    """Stream `chunks`; the server stops iterating them (which cancels the generation) if the client leaves."""

    async def body() -> AsyncIterator[str]:
        if not sse:
            yield "["
        sent = 0
        try:
            async for chunk in chunks:
                yield _frame(chunk, sse, sent)
                sent += 1
        except ApiError as exc:
            yield _frame(exc.to_json(), sse, sent)
        except Exception:
            log.exception("stream failed")
            yield _frame(ApiError("INTERNAL", "An internal error has occurred.").to_json(), sse, sent)
        finally:
            # A client that leaves before the first chunk cancels this while `chunks` may still be running;
            # closing it then would raise, and it is closed by its own cancellation anyway.
            with contextlib.suppress(RuntimeError):
                await chunks.aclose()  # type: ignore[attr-defined]
        if not sse:
            yield "]"

    media = "text/event-stream" if sse else "application/json"
    return StreamingResponse(body(), media_type=media, headers={"Cache-Control": "no-cache"})


def _frame(chunk: dict[str, Any], sse: bool, index: int) -> str:
    if sse:
        return f"data: {_dumps(chunk)}\r\n\r\n"
    return ("" if index == 0 else ",\r\n") + _dumps(chunk)


JSON_TYPES = ("application/json", "text/json")
BODY_CHUNK_TIMEOUT_SECONDS = 30


async def read_json(request: Request) -> Any:
    """The request's JSON body, refused once it passes the size limit rather than read whole first. A body sent
    as a form or plain text is refused: browsers send those cross-site without asking the server first."""
    declared_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if declared_type and declared_type not in JSON_TYPES and not declared_type.endswith("+json"):
        raise ApiError("INVALID_ARGUMENT", f"Content-Type {declared_type!r} is not accepted: send the request body "
                       "as JSON, with Content-Type: application/json.")
    too_big = ApiError("INVALID_ARGUMENT", f"Request payload size exceeds the limit: {MAX_BODY_BYTES} bytes.")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big
    chunks, size = [], 0
    stream = request.stream()
    stopped = f"The request body stopped arriving for {BODY_CHUNK_TIMEOUT_SECONDS} seconds; the request was dropped."
    while (chunk := await next_chunk(stream, BODY_CHUNK_TIMEOUT_SECONDS, stopped)) is not None:
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_big
        chunks.append(chunk)
    # Parsing a body of tens of megabytes takes a while: on a worker thread, so other clients are served meanwhile.
    return await asyncio.to_thread(parse_json_body, b"".join(chunks))


async def until_disconnect(request: Request, work: Awaitable[T], poll_seconds: float = 0.25) -> T:
    """Run `work`, cancelling it if the client disconnects first (so an abandoned generation stops)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_seconds)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ApiError("CANCELLED", "The client closed the request.")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task  # the work has wound down (its generators closed) before this returns
