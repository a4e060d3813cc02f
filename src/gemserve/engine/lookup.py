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
by what passes of each size cost on this machine (`PassCosts`, measured when the model loads) and by how often
this sequence's proposals were right (`Acceptance`, which also learns from proposals it looked at but did not
feed): the number k that gives the most tokens per unit of time, 1 + a + ... + a^k expected against the cost of a
pass over 1 + k tokens, and none where no k beats one token a pass.

Which passes are fed changes no logits: with the llama.cpp engine a token's logits are the same bits in any pass
(gemserve's products and attention, `_q5_0.c` and `_attention.h`; models loaded without
llama.cpp's repacked products, `llamacpp_model._model_params`). The costs stay as measured at load all the same,
so that what a request is fed does not move with the machine's load from one call to the next.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

MAX_PROPOSED = 8
GUESSED_COST = 0.3  # single-token passes each proposed token adds, where the engine was not left to measure them
MEASURING_ROUNDS = 2  # passes of each size timed at load; the fastest counts
PASS_SIZES = tuple(range(1, MAX_PROPOSED + 2))
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
        return self.propose_after(self._tokens[-3:], limit) if len(self._tokens) >= 3 else []

    def propose_after(self, last: list[int], limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest occurrence of `last`'s last 3 (else 2) tokens among those
        indexed (for tokens not indexed yet: a chain's drafts)."""
        t = self._tokens
        if limit <= 0 or len(last) < 3:
            return []
        start = self._after3.get((last[-3], last[-2], last[-1]))
        if start is None:
            start = self._after2.get((last[-2], last[-1]))
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
    """What a forward pass of one sequence decoding alone costs, in single-token passes, by the number of tokens
    fed (1 to MAX_PROPOSED + 1): measured once (`measure`), then fixed."""

    def __init__(self, relative: Mapping[int, float]) -> None:
        self._relative = dict(relative)

    @classmethod
    def guessed(cls, per_token: float = GUESSED_COST) -> PassCosts:
        """Each token beyond the first adds `per_token` (for tests that need proposals fed whatever the machine)."""
        return cls({n: 1 + per_token * (n - 1) for n in PASS_SIZES})

    @classmethod
    def measure(cls, run: Callable[[int], float], rounds: int = MEASURING_ROUNDS) -> PassCosts:
        """Time `run(n)`, one pass over n tokens that returns its seconds, for every size: once each for the
        smallest and the largest to warm up, then `rounds` times in alternating order. A size costs its fastest
        pass: whatever else runs on the machine only ever adds time."""
        run(PASS_SIZES[-1])
        run(PASS_SIZES[0])
        fastest = dict.fromkeys(PASS_SIZES, math.inf)
        for i in range(rounds):
            for n in PASS_SIZES if i % 2 == 0 else PASS_SIZES[::-1]:
                fastest[n] = min(fastest[n], run(n))
        unit = max(fastest[1], 1e-9)
        return cls({n: seconds / unit for n, seconds in fastest.items()})

    def relative(self, tokens: int) -> float:
        """A pass over `tokens` tokens in single-token passes (infinite beyond the sizes measured)."""
        return self._relative.get(tokens, math.inf)

    def __str__(self) -> str:
        return " ".join(f"{n}:{cost:.2f}" for n, cost in sorted(self._relative.items()))


def worth_feeding(available: int, acceptance: float, costs: PassCosts) -> int:
    """How many of `available` proposed tokens to feed beside the next one: the number k with the most tokens
    per unit of time, 1 + a + ... + a^k expected (each kept with probability a = `acceptance` once those before
    it were) against the cost of a pass over 1 + k tokens; 0 where no k beats one token a pass."""
    best, best_rate = 0, 1.0
    expected, kept_so_far = 1.0, 1.0
    for k in range(1, available + 1):
        cost = costs.relative(1 + k)
        kept_so_far *= acceptance
        expected += kept_so_far
        if expected / cost > best_rate:
            best, best_rate = k, expected / cost
    return best
