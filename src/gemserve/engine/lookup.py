"""Prompt-lookup decoding: more than one token per forward pass where the text repeats itself, with the same
output as decoding one token at a time.

A sequence's tokens so far (prompt and output) are indexed by their last 3 and 2 tokens. When a sequence decodes
alone, the tokens that followed the latest earlier occurrence of its last 3 (else 2) tokens are proposed and fed
in the same forward pass as its next token, each with logits. Each position's token is then chosen exactly as
without lookup (`sequences.advance`: the same sampling, constraint and random draw); a proposed token is kept
only if it is the token chosen at the position before it, so every logit used was computed on the sequence's own
tokens, and the first mismatch ends the step (the cache beyond it is dropped). Greedy output is therefore the
same token for token, and sampled output is drawn from the same distributions.

Checking proposals is not free, and what it costs depends on the machine: on two cores a pass over 1 + k tokens
costs 1.2-1.3 (k = 1) to 2-3.5 (k = 8) single-token passes on one (`benchmarks/lookup.py`), 1.9 to 5.3 on another
for Qwen2.5-Coder-0.5B, whose layers there batch poorly. So the engine feeds only as many proposed tokens as pay,
by what it measured (`PassCosts`: the median time of its latest passes of each size) and by how often this
sequence's proposals were right (`Acceptance`, which also learns from proposals it looked at but did not feed):
the number k that gives the most tokens per unit of time, 1 + a + ... + a^k expected against the cost of a pass
over 1 + k tokens, and none where no k beats one token a pass.
"""

from __future__ import annotations

import statistics
from collections import deque

MAX_PROPOSED = 8
GUESSED_COST = 0.3  # single-token passes each proposed token adds, assumed until a pass of that size has run
COST_SAMPLES = 5  # the latest passes of each size whose median is its cost
CONFIRMING_SAMPLES = 3  # passes of a size after which its measured cost counts even where a guess is lower
FIRST_ACCEPTANCE = 0.5  # a sequence's acceptance rate before any proposal of its was checked
ACCEPTANCE_WEIGHT = 0.25  # the weight of each new observation in the rate


class Lookup:
    """One sequence's n-gram index and how many tokens it proposes next."""

    def __init__(self) -> None:
        self._tokens: list[int] = []
        self._after3: dict[tuple[int, int, int], int] = {}  # last 3 tokens -> where what followed them starts
        self._after2: dict[tuple[int, int], int] = {}
        self.acceptance = Acceptance(FIRST_ACCEPTANCE)

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
        """Up to `limit` tokens that followed the latest earlier occurrence of the last 3 (else 2) tokens."""
        t, n = self._tokens, len(self._tokens)
        if limit <= 0 or n < 3:
            return []
        start = self._after3.get((t[n - 3], t[n - 2], t[n - 1]))
        if start is None:
            start = self._after2.get((t[n - 2], t[n - 1]))
        return [] if start is None else t[start : start + limit]


class Acceptance:
    """How often proposed tokens were the ones chosen at their positions: a moving average."""

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def observe(self, proposed: int, kept: int) -> None:
        """Of `proposed` tokens checked in order (fed, or one looked at unfed), the first `kept` were chosen. The
        ones after the first wrong one say nothing."""
        for i in range(min(kept + 1, proposed)):
            self.rate += ACCEPTANCE_WEIGHT * ((1.0 if i < kept else 0.0) - self.rate)


class PassCosts:
    """What a forward pass of one sequence decoding alone costs, by the number of tokens fed, as the engine
    measured it: the median seconds of its latest passes of each size. A size not measured yet is guessed from
    the largest smaller one measured, at its cost per added token (at most GUESSED_COST), so that sizes are tried
    once they look worth it; until CONFIRMING_SAMPLES passes of a size ran, the lower of its measured cost and the
    guess counts, so one pass that something else slowed down does not rule a size out. With `learn=False` the
    guesses are all there is (for tests that need proposals fed whatever the machine)."""

    def __init__(self, guessed: float = GUESSED_COST, *, learn: bool = True) -> None:
        self._guessed = guessed
        self._learn = learn
        self._seconds: dict[int, deque[float]] = {}
        self._median: dict[int, float] = {}  # of each size's seconds, kept as they come: asked for every step

    def record(self, tokens: int, seconds: float) -> None:
        if self._learn:
            times = self._seconds.setdefault(tokens, deque(maxlen=COST_SAMPLES))
            times.append(seconds)
            self._median[tokens] = statistics.median(times)

    def samples(self, tokens: int) -> int:
        """How many passes of this size the cost is taken from."""
        return len(self._seconds.get(tokens, ()))

    def relative(self, tokens: int) -> float | None:
        """A pass over `tokens` tokens in single-token passes; None while no single-token pass has been measured."""
        if not self._learn:
            return 1 + self._guessed * (tokens - 1)
        if 1 not in self._median or tokens == 1:
            return 1.0 if 1 in self._median else None
        unit = max(self._median[1], 1e-9)
        smaller = max((n for n in self._median if 1 < n < tokens), default=1)
        base = self._median[smaller] / unit if smaller > 1 else 1.0
        slope = min(self._guessed, max(0.0, base - 1) / (smaller - 1)) if smaller > 1 else self._guessed
        guess = base + slope * (tokens - smaller)
        if tokens not in self._median:
            return guess
        cost = self._median[tokens] / unit
        return cost if self.samples(tokens) >= CONFIRMING_SAMPLES else min(cost, guess)


def worth_feeding(available: int, acceptance: float, costs: PassCosts) -> int:
    """How many of `available` proposed tokens to feed beside the next one: the number k with the most tokens
    per unit of time, 1 + a + ... + a^k expected (each kept with probability a = `acceptance` once those before
    it were) against the cost of a pass over 1 + k tokens; 0 where no k beats one token a pass."""
    best, best_rate = 0, 1.0
    expected, kept_so_far = 1.0, 1.0
    for k in range(1, available + 1):
        cost = costs.relative(1 + k)
        if cost is None:
            return 0
        kept_so_far *= acceptance
        expected += kept_so_far
        if expected / cost > best_rate:
            best, best_rate = k, expected / cost
    return best
