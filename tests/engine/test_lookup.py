"""Prompt lookup's n-gram index: what it proposes, and how the number proposed adapts."""

from __future__ import annotations

from gemserve.engine.lookup import FIRST_PROPOSED, MAX_PROPOSED, Lookup


def test_it_proposes_what_followed_the_latest_earlier_occurrence_of_the_last_three_tokens() -> None:
    lookup = Lookup()
    lookup.extend([1, 2, 3, 4, 5, 9, 2, 3, 4, 6, 7, 1, 2, 3, 4])
    lookup.proposing = 3
    assert lookup.propose(10) == [6, 7, 1]  # (2, 3, 4) last came before 6, not before 5
    assert lookup.propose(2) == [6, 7]
    assert lookup.propose(0) == []


def test_two_tokens_when_three_never_came_before_and_nothing_when_neither_did() -> None:
    lookup = Lookup()
    lookup.extend([5, 8, 9, 7, 8, 9])
    assert lookup.propose(4) == [7, 8]  # (8, 9) came before 7
    lookup.extend([3])
    assert lookup.propose(4) == []


def test_sync_indexes_only_new_tokens_even_after_the_history_was_set_aside() -> None:
    lookup = Lookup()
    lookup.sync([1, 2, 3], [4])
    lookup.sync([1, 2, 3, 4], [1])
    assert len(lookup) == 5
    lookup.sync([], [1, 2, 3, 4, 1, 2])  # the engine set the sequence aside: all of it is pending again
    assert len(lookup) == 6
    assert lookup.propose(5) == [3, 4]


def test_the_number_proposed_doubles_while_all_are_kept_and_falls_past_the_number_kept() -> None:
    lookup = Lookup()
    assert lookup.proposing == FIRST_PROPOSED
    lookup.learn(2, 2)
    lookup.learn(4, 4)
    lookup.learn(8, 8)
    assert lookup.proposing == MAX_PROPOSED
    lookup.learn(8, 2)
    assert lookup.proposing == 3
    lookup.learn(3, 0)
    assert lookup.proposing == 1
    lookup.learn(0, 0)
    assert lookup.proposing == 1
