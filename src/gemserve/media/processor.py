"""The media pool: renderings are made on one worker thread (the readers are heavy and this machine is small),
never on the event loop, each reader loaded the first time it is needed and kept.

Keys take turns, round-robin: each key with jobs waiting gets one job done in its turn, so a key that sends a
hundred videos delays another key's image by one job at most, not by a hundred. A job whose caller leaves (a
file deleted while it is processed) stops at its next page, segment of speech or frame.

A job's progress (a fraction and what is being done) can be read while it waits or runs (`progress`), which the
Files API shows in a File being processed.

Renderings of inline bytes are kept by their digest and the key that sent them (the last `INLINE_CACHE` ones),
so a chat that sends the same image with every turn has it read once, and one key cannot tell from the time an
answer takes what another key sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from gemserve.engine.threads import releasing
from gemserve.media import render
from gemserve.media.readers import Readers
from gemserve.media.rendering import MediaError, Rendering

log = logging.getLogger("gemserve.media")

INLINE_CACHE = 64
T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    done: float  # 0 to 1
    step: str


class _Run:
    """One job's identity (progress reports of an older run of the same job are ignored) and its stop signal."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()


class Turns:
    """One job at a time, keys served in rotation (the event loop's side of the single worker)."""

    def __init__(self) -> None:
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()
        self._busy = False

    @property
    def busy(self) -> bool:
        return self._busy or bool(self._waiting)

    async def take(self, owner: str) -> None:
        if not self._busy and not self._waiting:
            self._busy = True
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(owner, deque()).append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release()  # the turn came as the waiter left: pass it on
            else:
                queue = self._waiting.get(owner)
                if queue is not None and turn in queue:
                    queue.remove(turn)
                    if not queue:
                        del self._waiting[owner]
            raise

    def release(self) -> None:
        while self._waiting:
            owner, queue = next(iter(self._waiting.items()))
            turn = queue.popleft()
            if queue:
                self._waiting.move_to_end(owner)  # served: to the back of the rotation
            else:
                del self._waiting[owner]
            if not turn.done():
                turn.set_result(None)
                return
        self._busy = False


class MediaProcessor:
    def __init__(self, data_dir: Path, readers: Readers | None = None) -> None:
        self.readers = readers or Readers(data_dir / "models")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gemserve-media")
        self._turns = Turns()
        self._recent: OrderedDict[str, Rendering] = OrderedDict()
        self._progress: dict[Hashable, tuple[_Run, Progress]] = {}  # job -> (its run, how far it is)

    def progress(self, job: Hashable) -> Progress | None:
        """How far a job (`render_file`'s `job`) has come, while it waits or runs; None once it has ended."""
        entry = self._progress.get(job)
        return None if entry is None else entry[1]

    async def render_file(self, path: Path, mime_type: str, name: str, owner: str,
                          job: Hashable | None = None) -> Rendering:
        return await self._run(owner, job, partial(render.render_file, path, mime_type, name, self.readers))

    async def render_bytes(self, data: bytes, mime_type: str, name: str, owner: str) -> Rendering:
        key = hashlib.sha256(data).hexdigest() + "\0" + mime_type + "\0" + name + "\0" + owner
        if key in self._recent:
            self._recent.move_to_end(key)
            return self._recent[key]
        rendering = await self._run(owner, None, partial(render.render_bytes, data, mime_type, name, self.readers))
        self._recent[key] = rendering
        while len(self._recent) > INLINE_CACHE:
            self._recent.popitem(last=False)
        return rendering

    async def _run(self, owner: str, job: Hashable | None, work: Callable[..., T]) -> T:
        loop = asyncio.get_running_loop()
        run = _Run()
        if job is not None:
            step = "waiting for other files to be processed first" if self._turns.busy else "starting"
            self._progress[job] = (run, Progress(0.0, step))
        try:
            await self._turns.take(owner)
            try:
                # torch's worker threads go after each job (engine/threads.py): idle readers slow no model.
                report = partial(self._report, loop, job, run)
                running = loop.run_in_executor(self._pool, releasing(partial(work, report=report)))
            except BaseException:
                self._turns.release()
                raise
            running.add_done_callback(self._finished)  # the turn passes on when the thread is done
            try:
                return await asyncio.shield(running)
            except asyncio.CancelledError:
                run.cancelled.set()  # the rendering stops at its next report (page, segment of speech, frame)
                raise
        finally:
            if job is not None and self._progress.get(job, (None,))[0] is run:
                del self._progress[job]

    def _finished(self, running: asyncio.Future[Any]) -> None:
        self._turns.release()
        if not running.cancelled():
            running.exception()  # a job whose caller left ends quietly

    def _report(self, loop: asyncio.AbstractEventLoop, job: Hashable | None, run: _Run, done: float,
                step: str) -> None:
        """Called on the worker thread as a rendering goes on; stops a rendering nobody waits for any more."""
        if run.cancelled.is_set():
            raise MediaError("the processing was cancelled.")
        if job is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: the server is stopping
                loop.call_soon_threadsafe(self._set_progress, job, run, Progress(min(1.0, max(0.0, done)), step))

    def _set_progress(self, job: Hashable, run: _Run, progress: Progress) -> None:
        if self._progress.get(job, (None,))[0] is run:  # this run's, and not after it ended
            self._progress[job] = (run, progress)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
