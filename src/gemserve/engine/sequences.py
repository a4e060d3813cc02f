"""What every engine backend shares: sequences handed from the event loop to one engine thread, the choice of
each next token, and events handed back.

`Inbox` is the way in: `stream()` (on the event loop) queues a sequence and yields its events; the engine thread
`take()`s new sequences between steps. `Outbox` is the way back: events produced during one engine step are
delivered together, one wake-up of the event loop per step rather than one per token. `advance()` is the step
every decoding sequence takes once its logits are known.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from gemserve.engine.sampling import sample
from gemserve.engine.types import EngineBusy, EngineError, Event, FinishEvent, GenerationRequest, TokenEvent

log = logging.getLogger("gemserve.engine")

Message = Event | BaseException


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Message]
    rng: np.random.Generator
    pending: list[int] = field(default_factory=list)  # tokens to feed in the next steps
    generated: Counter[int] = field(default_factory=Counter)
    n_generated: int = 0
    cancelled: bool = False
    cached_tokens: int = 0  # prompt tokens taken from a kept or pinned cache


S = TypeVar("S", bound=Sequence)


class Outbox:
    """Events of one engine step, grouped by event loop, handed over in one call each."""

    def __init__(self) -> None:
        self._items: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Message], Message]]] = {}

    def put(self, seq: Sequence, message: Message) -> None:
        self._items.setdefault(seq.loop, []).append((seq.queue, message))

    def flush(self) -> None:
        items, self._items = self._items, {}
        for loop, messages in items.items():
            with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is waiting any more
                loop.call_soon_threadsafe(_deliver, messages)


def _deliver(messages: list[tuple[asyncio.Queue[Message], Message]]) -> None:
    for queue, message in messages:
        queue.put_nowait(message)


def rng_for(seed: int | None) -> np.random.Generator:
    """A sequence's random stream; any 32-bit seed, negative ones too, as the API allows."""
    return np.random.default_rng(None if seed is None else seed & 0xFFFFFFFF)


def advance(seq: Sequence, logits: np.ndarray, is_end: Callable[[int], bool], outbox: Outbox) -> bool:
    """Choose `seq`'s next token from `logits` and report it. True when the sequence has ended.

    Under a constraint, only tokens it allows are drawn, and the sequence ends where the grammar is complete.
    A failure here belongs to this sequence alone: it gets the error and ends; the engine goes on."""
    constraint = seq.request.constraint
    try:
        choice = sample(logits, seq.request.sampling, seq.generated, seq.rng, constraint)
        if constraint is not None and not is_end(choice.token):
            constraint.consume(choice.token)
    except Exception as exc:
        log.exception("sampling failed")
        outbox.put(seq, EngineError(f"sampling failed for this request: {exc}"))
        return True
    if is_end(choice.token):
        outbox.put(seq, FinishEvent("STOP", seq.cached_tokens))
        return True
    seq.generated[choice.token] += 1
    seq.n_generated += 1
    outbox.put(seq, TokenEvent(choice.token, choice.logprob, choice.top,
                               seq.cached_tokens if seq.n_generated == 1 else None))
    if constraint is not None and constraint.finished:
        outbox.put(seq, FinishEvent("STOP", seq.cached_tokens))
        return True
    if seq.n_generated >= seq.request.max_new_tokens:
        outbox.put(seq, FinishEvent("MAX_TOKENS", seq.cached_tokens))
        return True
    seq.pending.append(choice.token)
    return False


class Inbox(Generic[S]):
    """Sequences on their way to the engine thread, and whether that thread still runs."""

    def __init__(self, max_waiting: int = 256) -> None:
        self._cond = threading.Condition()
        self._max_waiting = max_waiting
        self._incoming: deque[S] = deque()
        self._closed = False
        self._failure: BaseException | None = None

    async def stream(self, make: Callable[[asyncio.AbstractEventLoop, asyncio.Queue[Message]], S],
                     ) -> AsyncIterator[Event]:
        """Queue the sequence `make` builds and yield its events; leaving early cancels it."""
        queue: asyncio.Queue[Message] = asyncio.Queue()
        seq = make(asyncio.get_running_loop(), queue)
        with self._cond:
            if self._failure is not None or self._closed:
                raise EngineError("the engine has stopped") from self._failure
            if len(self._incoming) >= self._max_waiting:
                raise EngineBusy(f"{len(self._incoming)} requests are already waiting for this model")
            self._incoming.append(seq)
            self._cond.notify()
        try:
            while True:
                message = await queue.get()
                if isinstance(message, BaseException):
                    raise message
                yield message
                if isinstance(message, FinishEvent):
                    return
        finally:
            seq.cancelled = True

    def empty(self) -> bool:
        """No new sequence waits to be taken (a hint: one may arrive at once)."""
        with self._cond:
            return not self._incoming

    def take(self, room: int, busy: bool) -> list[S] | None:
        """Up to `room` new sequences; waits while there is nothing to do (`busy` is False). None once closed."""
        with self._cond:
            while not self._closed and not self._incoming and not busy:
                self._cond.wait()
            if self._closed:
                return None
            taken: list[S] = []
            while self._incoming and len(taken) < room:
                seq = self._incoming.popleft()
                if not seq.cancelled:
                    taken.append(seq)
            return taken

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def fail(self, exc: BaseException, running: list[S], outbox: Outbox, for_good: bool = True) -> None:
        """The engine thread failed: what it produced is delivered, then the sequences it had get an error; for
        good, every sequence it would have had too, later ones included."""
        with self._cond:
            waiting = list(running)
            if for_good:
                self._failure = exc
                waiting += self._incoming
                self._incoming.clear()
        for seq in waiting:
            outbox.put(seq, EngineError("the engine stopped while serving this request"))
        outbox.flush()
