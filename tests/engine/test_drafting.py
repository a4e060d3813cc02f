"""Drafting's choices on a scripted output layer (no model): which token a draft is, under constraints and
penalties, and how long a chain runs by what its passes cost."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from gemserve.engine.drafting import MAX_CHAIN, DraftCosts, Drafter, chain_length
from gemserve.engine.types import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


class ScriptedHead:
    """An output layer of 64 tokens over hidden states of 8: the shortlist is the even tokens."""

    n_vocab = 64
    n_embd = 8

    def __init__(self) -> None:
        self.matrix = np.random.default_rng(0).standard_normal((self.n_vocab, self.n_embd)).astype(np.float32)
        self.shortlist = np.arange(0, self.n_vocab, 2)
        self.rows_read: list[int] = []

    def shortlist_scores(self, hidden: np.ndarray) -> np.ndarray:
        return self.matrix[self.shortlist] @ hidden

    def rows(self, tokens: list[int]) -> np.ndarray:
        self.rows_read += tokens
        return self.matrix[tokens]

    def hidden_preferring(self, token: int) -> np.ndarray:
        """A hidden state whose best token over the whole vocabulary is `token`."""
        return self.matrix[token] * 10


class ScriptedConstraint:
    def __init__(self, allowed: set[int], forced: list[int] | None = None) -> None:
        self.allowed = allowed
        self._forced = forced or []

    def permits(self, token: int) -> bool:
        return token in self.allowed

    def forced(self) -> list[int]:
        return self._forced


def best(head: ScriptedHead, hidden: np.ndarray, among: list[int]) -> int:
    scores = head.matrix[among] @ hidden
    return among[int(np.argmax(scores))]


def test_a_draft_is_the_best_shortlist_token_and_the_sequences_own_tokens_join_the_shortlist() -> None:
    head = ScriptedHead()
    drafter = Drafter(head, greedy=True)
    hidden = head.hidden_preferring(7)  # an odd token: off the shortlist
    assert drafter.propose(hidden, None, GREEDY, Counter()) == best(head, hidden, list(range(0, 64, 2)))
    drafter.sync([3, 7, 2], [9])  # the prompt and the pending token: 3, 7 and 9 are off the shortlist
    assert sorted(head.rows_read) == [3, 7, 9]
    assert drafter.propose(hidden, None, GREEDY, Counter()) == 7
    drafter.sync([3, 7, 2, 9], [7])  # only tokens not seen before are read
    assert sorted(head.rows_read) == [3, 7, 9]


def test_a_constraint_forces_its_token_or_gets_the_best_token_it_permits() -> None:
    head = ScriptedHead()
    drafter = Drafter(head, greedy=True)
    hidden = head.hidden_preferring(10)
    assert drafter.propose(hidden, ScriptedConstraint(set(range(64)), forced=[33]), GREEDY, Counter()) == 33
    permitted = {4, 20, 40}
    assert drafter.propose(hidden, ScriptedConstraint(permitted), GREEDY, Counter()) == best(head, hidden, [4, 20, 40])
    assert drafter.propose(hidden, ScriptedConstraint({5}), GREEDY, Counter()) is None  # nothing on the list


def test_penalties_move_the_draft_as_they_move_sampling() -> None:
    head = ScriptedHead()
    drafter = Drafter(head, greedy=True)
    hidden = head.hidden_preferring(10)
    first = drafter.propose(hidden, None, GREEDY, Counter())
    assert first == 10
    penalized = SamplingParams(temperature=0.0, presence_penalty=1e6)
    second = drafter.propose(hidden, None, penalized, Counter({10: 1}))
    assert second != 10 and second == best(head, hidden, [t for t in range(0, 64, 2) if t != 10])


def test_a_chain_runs_only_where_it_pays_and_longer_the_more_its_drafts_are_kept() -> None:
    assert chain_length(1.0, DraftCosts.guessed()) == 0  # a pass that costs a whole one never pays
    assert not DraftCosts.guessed().can_pay
    costs = DraftCosts(0.4, {n: 0.6 + 0.05 * (n - 1) for n in range(1, MAX_CHAIN + 1)})
    assert costs.can_pay
    assert chain_length(0.1, costs) == 0
    lengths = [chain_length(a, costs) for a in (0.6, 0.8, 0.95, 1.0)]
    assert lengths == sorted(lengths) and lengths[0] >= 2 and lengths[-1] == MAX_CHAIN
    assert chain_length(1.0, costs, limit=3) == 3  # within the sequence's budget
    assert chain_length(1.0, costs, limit=1) == 0


def test_costs_are_the_fastest_of_their_rounds_relative_to_a_plain_pass() -> None:
    draft_times = iter([9.0, 5.0, 4.0, 6.0])  # warm-up, then three rounds
    seen: list[int] = []

    def logits(n: int) -> float:
        seen.append(n)
        return 2.0 + n

    costs = DraftCosts.measure(lambda: next(draft_times), logits, unit=10.0, rounds=3)
    assert costs.draft == pytest.approx(0.4)
    assert costs.chain(2) == pytest.approx(2 * 0.4 + 0.4)
    assert seen[0] == MAX_CHAIN and set(seen) == set(range(1, MAX_CHAIN + 1))
