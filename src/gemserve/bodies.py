"""Reading a request body a chunk at a time, with a deadline per chunk: a client that stops sending holds a
connection and a task, so it gets a while between chunks, no more."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from gemserve.errors import ApiError


async def next_chunk(stream: AsyncIterator[bytes], seconds: float, stopped: str) -> bytes | None:
    """The body's next chunk, None at its end; DEADLINE_EXCEEDED (message `stopped`) after `seconds` without one."""
    try:
        return await asyncio.wait_for(anext(stream), seconds)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise ApiError("DEADLINE_EXCEEDED", stopped) from None
