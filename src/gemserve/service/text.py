"""From token bytes to the text a client sees: UTF-8 reassembly and stop sequences.

A token may end in the middle of a UTF-8 character, and a stop sequence may arrive split over several tokens.
`TextStream` emits only text that is final: complete characters that can no longer become part of a stop
sequence. The stop sequence itself is never emitted, as the API specifies.
"""

from __future__ import annotations

import codecs


class TextStream:
    def __init__(self, stop_sequences: list[str] | tuple[str, ...] = ()) -> None:
        self._stops = [s for s in stop_sequences if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self.stopped = False

    def push(self, piece: bytes) -> str:
        """Add a token's bytes; return the text that became final. Sets `stopped` when a stop sequence appears."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(piece)
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            text, self._pending = self._pending[:cut], ""
            return text
        hold = self._held_back()
        text = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(text) :]
        return text

    def flush(self) -> str:
        """The generation ended: whatever was held back is final now."""
        if self.stopped:
            return ""
        text = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return text

    def _held_back(self) -> int:
        """Length of the longest end of the pending text that could still grow into a stop sequence."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:size]):
                    longest = size
                    break
        return longest
