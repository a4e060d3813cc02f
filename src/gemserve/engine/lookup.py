"""Prompt-lookup decoding: more than one token per forward pass where the text repeats itself, with the same
output as decoding one token at a time.

A sequence's tokens so far (prompt and output) are indexed by their last 3 and 2 tokens. When a sequence decodes
alone, the tokens that followed the latest earlier occurrence of its last 3 (else 2) tokens are proposed and fed
in the same forward pass as its next token, each with logits. Each position's token is then chosen exactly as
without lookup (`sequences.advance`: the same sampling, constraint and random draw); a proposed token is kept
only if it is the token chosen at the position before it, so every logit used was computed on the sequence's own
tokens, and the first mismatch ends the step (the cache beyond it is dropped). Greedy output is therefore the
same token for token, and sampled output is drawn from the same distributions.

Checking proposals is not free: on two cores a pass over 1 + k tokens costs 1.2-1.3 (k = 1) to 2-3.5 (k = 8)
single-token passes (`benchmarks/lookup.py`). So the number proposed adapts to how many were right: it doubles
after a step that kept them all, and falls to one past the number kept after one that did not.
"""

from __future__ import annotations

MAX_PROPOSED = 8
FIRST_PROPOSED = 2


class Lookup:
    """One sequence's n-gram index and how many tokens it proposes next."""

    def __init__(self) -> None:
        self._tokens: list[int] = []
        self._after3: dict[tuple[int, int, int], int] = {}  # last 3 tokens -> where what followed them starts
        self._after2: dict[tuple[int, int], int] = {}
        self.proposing = FIRST_PROPOSED

    def __len__(self) -> int:
        return len(self._tokens)

    def extend(self, tokens: list[int]) -> None:
        t = self._tokens
        for token in tokens:
            n = len(t)  # the n-grams ending at the last token are followed by `token`, at n
            if n >= 3:
                self._after3[(t[n - 3], t[n - 2], t[n - 1])] = n
            if n >= 2:
                self._after2[(t[n - 2], t[n - 1])] = n
            t.append(token)

    def sync(self, history: list[int], pending: list[int]) -> None:
        """Index the tokens of `history + pending` not indexed yet (a sequence's tokens only ever grow)."""
        have = len(self._tokens)
        if have < len(history):
            self.extend(history[have:])
            have = len(history)
        self.extend(pending[have - len(history):])

    def propose(self, limit: int) -> list[int]:
        """Up to min(`proposing`, `limit`) tokens that followed the latest earlier occurrence of the last 3 (else
        2) tokens."""
        t, n = self._tokens, len(self._tokens)
        k = min(self.proposing, limit)
        if k <= 0 or n < 3:
            return []
        start = self._after3.get((t[n - 3], t[n - 2], t[n - 1]))
        if start is None:
            start = self._after2.get((t[n - 2], t[n - 1]))
        return [] if start is None else t[start : start + k]

    def learn(self, proposed: int, kept: int) -> None:
        if proposed == 0:
            return
        self.proposing = adapted(self.proposing, proposed, kept)


def adapted(proposing: int, proposed: int, kept: int) -> int:
    """How many to propose next: twice as many after a pass that kept all `proposed`, else one past those kept."""
    return min(MAX_PROPOSED, 2 * proposing) if kept == proposed else max(1, kept + 1)
