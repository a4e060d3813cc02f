"""Drafting: more than one token per output-layer pass where prompt lookup has nothing to propose, with the same
output as decoding one token at a time.

A single-token pass of a small model is mostly its output layer: for Gemma 3 270M, 6.3 of 9.8 ms go to the 262144 x
640 matrix that turns the final hidden state into logits, and reading that matrix once costs about as much for 4
hidden states as for one. So a sequence that decodes alone may run a chain of passes through the transformer layers
only (`LlamaModel.decode(..., logits=False)`), guessing each next token from a shortlist of the vocabulary - its
common tokens, packed small (`OutputHead.build_shortlist`), and the tokens the sequence itself has seen or the
model wrote lately, scored from their dequantized rows - and then computes the whole output layer once for all the
chain's hidden states (`LlamaModel.logits_of`). Each position's token is then chosen exactly as without drafting
(`sequences.advance`: the same logits, sampling, constraint and random draw), and a drafted token is kept only if
it is the token chosen at the position before it (the engine's `_check_proposal`, shared with prompt lookup): the
first mismatch ends the chain and the cache of the passes after it is dropped. Greedy output is therefore the same
token for token, sampled output is drawn from the same distributions. What a wrong draft costs is the passes after
it.

Under a constraint, a draft is the best shortlist token the grammar permits (or the token it forces); drafted
tokens are consumed by the grammar while the chain runs, so that the next draft follows it, and rolled back before
the chain's tokens are chosen for real.

How long a chain runs is decided as prompt lookup's proposals are: by what the passes cost on this machine
(`DraftCosts`, measured as the model loads) and by how often this sequence's drafts were right (`Acceptance`):
the length with the most tokens per unit of time, and no chain where none beats one token a pass.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

from gemserve.engine.lookup import Acceptance
from gemserve.engine.types import SamplingParams

MAX_CHAIN = 8  # passes in one chain (the output-layer kernel takes 8 hidden states in one sweep of its matrix)
GREEDY_ACCEPTANCE = 0.9  # a greedy sequence's draft acceptance before any of its drafts was checked
SAMPLED_ACCEPTANCE = 0.5  # a sampled one's; both also learn from plain steps (the engine's `_step`)
MEASURING_ROUNDS = 3
CANDIDATES = 8  # best shortlist tokens asked of a constraint, in order, before giving up on a draft


class DraftHead(Protocol):
    """What drafting needs of an output layer (`output_head.OutputHead`)."""

    n_vocab: int
    n_embd: int
    shortlist: np.ndarray  # sorted token ids

    def shortlist_scores(self, hidden: np.ndarray) -> np.ndarray: ...

    def rows(self, tokens: list[int]) -> np.ndarray: ...


class Speculation(Protocol):
    """What drafting needs of a constraint (`constraints.Constraint`)."""

    def permits(self, token: int) -> bool: ...

    def forced(self) -> list[int]: ...


class Drafter:
    """One sequence's drafts: the shortlist, plus the tokens of its own that are not on it."""

    def __init__(self, head: DraftHead, greedy: bool) -> None:
        self._head = head
        self._seen = 0  # tokens of the sequence looked at (sync)
        self._extra: dict[int, int] = {}  # token off the shortlist -> its row in _rows
        self._rows = np.empty((0, 0), np.float32)
        self._on_shortlist = np.zeros(head.n_vocab, bool)
        self._on_shortlist[head.shortlist] = True
        self.acceptance = Acceptance(GREEDY_ACCEPTANCE if greedy else SAMPLED_ACCEPTANCE)

    def sync(self, history: list[int], pending: list[int]) -> None:
        """Take in the tokens of `history + pending` not seen yet (a sequence's tokens only ever grow)."""
        have = self._seen
        tokens = history[have:] + pending if have < len(history) else pending[have - len(history):]
        self._seen += len(tokens)
        self.add(tokens)

    def add(self, tokens: list[int]) -> None:
        """Score `tokens` too from now on (those off the shortlist: from their dequantized rows)."""
        new = [t for t in dict.fromkeys(tokens)
               if 0 <= t < self._head.n_vocab and not self._on_shortlist[t] and t not in self._extra]
        if not new:
            return
        rows = self._head.rows(new)
        self._rows = rows if not self._extra else np.concatenate([self._rows, rows])
        for token in new:
            self._extra[token] = len(self._extra)

    def propose(self, hidden: np.ndarray, constraint: Speculation | None, params: SamplingParams,
                generated: Counter[int]) -> int | None:
        """The token most likely to come after `hidden` by the shortlist's scores (penalties applied as sampling
        applies them) that `constraint` permits, or the token it forces; None when none of the best permits."""
        if constraint is not None:
            forced = constraint.forced()
            if forced:
                return forced[0]
        head = self._head
        scores = head.shortlist_scores(hidden)
        ids = head.shortlist
        if self._extra:
            scores = np.concatenate([scores, self._rows @ hidden])
            ids = np.concatenate([ids, np.fromiter(self._extra, np.int64, len(self._extra))])
        if generated and (params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0):
            scores = self._penalized(scores, head.shortlist, params, generated)
        best = int(np.argmax(scores))
        if constraint is None or constraint.permits(int(ids[best])):
            return int(ids[best])
        top = np.argpartition(scores, -CANDIDATES)[-CANDIDATES:] if len(scores) > CANDIDATES else np.arange(len(scores))
        for i in top[np.argsort(-scores[top])]:
            if constraint.permits(int(ids[i])):
                return int(ids[i])
        return None

    def _penalized(self, scores: np.ndarray, shortlist: np.ndarray, params: SamplingParams,
                   generated: Counter[int]) -> np.ndarray:
        scores = scores.copy()
        for token, count in generated.items():
            at = int(np.searchsorted(shortlist, token))
            if at < len(shortlist) and shortlist[at] == token:
                index = at
            elif token in self._extra:
                index = len(shortlist) + self._extra[token]
            else:
                continue
            value = float(scores[index])
            if params.repetition_penalty != 1.0:
                value = value / params.repetition_penalty if value > 0 else value * params.repetition_penalty
            scores[index] = value - params.presence_penalty - params.frequency_penalty * count
        return scores


class DraftCosts:
    """What a chain's parts cost, in single-token passes with logits: a pass through the layers with the
    shortlist's scores (`draft`), and the output layer for n hidden states (`logits(n)`); measured once."""

    def __init__(self, draft: float, logits: Mapping[int, float]) -> None:
        self.draft = draft
        self._logits = dict(logits)
        self.can_pay = chain_length(1.0, self) > 0  # whether any chain pays, were every draft right

    @classmethod
    def guessed(cls) -> DraftCosts:
        """Costs that make no chain pay (for engines whose costs were not measured)."""
        return cls(1.0, {n: 1.0 for n in range(1, MAX_CHAIN + 1)})

    @classmethod
    def measure(cls, draft: Callable[[], float], logits: Callable[[int], float], unit: float,
                rounds: int = MEASURING_ROUNDS) -> DraftCosts:
        """`draft()` times a drafting pass and `logits(n)` the output layer over n hidden states, in seconds; a
        single-token pass with logits takes `unit`. Each costs its fastest of `rounds`, after a warm-up."""
        draft()
        logits(MAX_CHAIN)
        fastest_draft = min(draft() for _ in range(rounds))
        fastest = {n: min(logits(n) for _ in range(rounds)) for n in range(1, MAX_CHAIN + 1)}
        unit = max(unit, 1e-9)
        return cls(fastest_draft / unit, {n: s / unit for n, s in fastest.items()})

    def chain(self, passes: int) -> float:
        return passes * self.draft + self._logits.get(passes, math.inf)

    def __str__(self) -> str:
        return f"draft pass {self.draft:.2f}, output layer " + " ".join(
            f"{n}:{cost:.2f}" for n, cost in sorted(self._logits.items()))


def chain_length(acceptance: float, costs: DraftCosts, limit: int = MAX_CHAIN) -> int:
    """How many passes a chain should run (the first token and up to n - 1 drafts): the n with the most tokens per
    unit of time, 1 + a + ... + a^(n-1) expected against `costs.chain(n)`; 0 where no chain beats one token a pass
    (a single-token pass with logits, costing 1)."""
    best, best_rate = 0, 1.0
    expected, kept_so_far = 1.0, 1.0
    for n in range(2, min(limit, MAX_CHAIN) + 1):
        kept_so_far *= acceptance
        expected += kept_so_far
        rate = expected / costs.chain(n)
        if rate > best_rate:
            best, best_rate = n, rate
    return best
