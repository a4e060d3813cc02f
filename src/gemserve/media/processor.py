"""The media pool: renderings are made on one worker thread (the readers are heavy and this machine is small),
never on the event loop, each reader loaded the first time it is needed and kept.

Renderings of inline bytes are kept by their digest (the last `INLINE_CACHE` ones), so a chat that sends the same
image with every turn has it read once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gemserve.media import render
from gemserve.media.readers import Readers
from gemserve.media.rendering import Rendering

log = logging.getLogger("gemserve.media")

INLINE_CACHE = 64


class MediaProcessor:
    def __init__(self, data_dir: Path, readers: Readers | None = None) -> None:
        self.readers = readers or Readers(data_dir / "models")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gemserve-media")
        self._recent: OrderedDict[str, Rendering] = OrderedDict()

    async def render_file(self, path: Path, mime_type: str, name: str) -> Rendering:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, render.render_file, path, mime_type, name, self.readers)

    async def render_bytes(self, data: bytes, mime_type: str, name: str) -> Rendering:
        key = hashlib.sha256(data).hexdigest() + mime_type + "\0" + name
        if key in self._recent:
            self._recent.move_to_end(key)
            return self._recent[key]
        loop = asyncio.get_running_loop()
        rendering = await loop.run_in_executor(self._pool, render.render_bytes, data, mime_type, name, self.readers)
        self._recent[key] = rendering
        while len(self._recent) > INLINE_CACHE:
            self._recent.popitem(last=False)
        return rendering

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
