"""Prompt lookup's n-gram index, and how many proposed tokens are worth feeding."""

from __future__ import annotations

import pytest

from gemserve.engine.lookup import Acceptance, Lookup, PassCosts, worth_feeding


def test_it_proposes_what_followed_the_latest_earlier_occurrence_of_the_last_three_tokens() -> None:
    lookup = Lookup()
    lookup.extend([1, 2, 3, 4, 5, 9, 2, 3, 4, 6, 7, 1, 2, 3, 4])
    assert lookup.propose(3) == [6, 7, 1]  # (2, 3, 4) last came before 6, not before 5
    assert lookup.propose(2) == [6, 7]
    assert lookup.propose(0) == []


def test_two_tokens_when_three_never_came_before_and_nothing_when_neither_did() -> None:
    lookup = Lookup()
    lookup.extend([5, 8, 9, 7, 8, 9])
    assert lookup.propose(2) == [7, 8]  # (8, 9) came before 7
    lookup.extend([3])
    assert lookup.propose(4) == []


def test_sync_indexes_only_new_tokens_even_after_the_history_was_set_aside() -> None:
    lookup = Lookup()
    lookup.sync([1, 2, 3], [4])
    lookup.sync([1, 2, 3, 4], [1])
    assert len(lookup) == 5
    lookup.sync([], [1, 2, 3, 4, 1, 2])  # the engine set the sequence aside: all of it is pending again
    assert len(lookup) == 6
    assert lookup.propose(2) == [3, 4]


def test_acceptance_counts_the_tokens_up_to_the_first_wrong_one() -> None:
    rate = Acceptance(0.5)
    rate.observe(4, 4)  # four right
    assert rate.rate == pytest.approx(1 - 0.5 * 0.75**4)
    before = rate.rate
    rate.observe(4, 1)  # one right, one wrong, two after it that say nothing
    assert rate.rate == pytest.approx((before + 0.25 * (1 - before)) * 0.75)
    rate.observe(0, 0)
    assert rate.rate == pytest.approx((before + 0.25 * (1 - before)) * 0.75)


def measured(costs: dict[int, float]) -> PassCosts:
    """Pass costs as an engine would have measured them: seconds by tokens fed, three passes of each size."""
    passes = PassCosts()
    for tokens, seconds in costs.items():
        for noise in (1.0, 1.02, 0.98):
            passes.record(tokens, seconds * noise)
    return passes


# Seconds per pass over 1 + k tokens on two machines (benchmarks/lookup.py): Qwen2.5-Coder-0.5B where its
# layers batch poorly, and Gemma 3 270M.
QWEN_SLOW_BATCHES = {1: 0.040, 2: 0.076, 3: 0.104, 4: 0.109, 5: 0.128, 6: 0.118, 7: 0.154, 8: 0.172, 9: 0.212}
GEMMA = {1: 0.024, 2: 0.032, 3: 0.038, 4: 0.046, 5: 0.056, 6: 0.057, 7: 0.068, 8: 0.073, 9: 0.093}


def test_proposals_are_fed_only_where_they_pay_on_the_machine_measured() -> None:
    qwen, gemma = measured(QWEN_SLOW_BATCHES), measured(GEMMA)
    assert qwen.relative(2) == pytest.approx(1.9)
    # Half right: a pass over two tokens costs 1.9 there, so one token a pass is best; Gemma's passes are cheap.
    assert worth_feeding(8, 0.5, qwen) == 0
    assert worth_feeding(8, 0.5, gemma) == 1
    # Nearly always right: several, but not the most a pass can take where the largest passes cost most.
    assert worth_feeding(8, 0.95, qwen) == 5  # past a dip: the pass over six tokens is cheaper than over five
    assert worth_feeding(8, 0.95, gemma) == 5
    assert worth_feeding(2, 0.95, gemma) == 2  # no more than there are
    assert worth_feeding(0, 0.95, gemma) == 0
    assert worth_feeding(8, 0.0, gemma) == 0


def test_the_cost_is_the_median_of_the_latest_passes_of_a_size() -> None:
    passes = PassCosts()
    for seconds in (0.04, 0.04, 0.2, 0.04):  # one single-token pass that something else slowed down
        passes.record(1, seconds)
    for seconds in (0.1, 0.1, 0.1, 0.1, 0.1, 0.06, 0.06, 0.06):  # the machine got faster: the latest 5 count
        passes.record(2, seconds)
    assert passes.samples(2) == 5
    assert passes.relative(2) == pytest.approx(1.5)


def test_sizes_not_measured_yet_are_guessed_and_nothing_is_fed_before_one_token_passes_were() -> None:
    passes = PassCosts()
    assert passes.relative(1) is None and worth_feeding(8, 0.99, passes) == 0  # nothing to compare with yet
    passes.record(1, 0.04)
    assert passes.relative(3) == pytest.approx(1.6)  # 0.3 single-token passes a proposed token, guessed
    assert worth_feeding(8, 0.9, passes) == 5
    # Measured sizes set the slope of the guess beyond them, where it is lower than the guessed one.
    for _ in range(3):
        passes.record(2, 0.042)
    assert passes.relative(9) == pytest.approx(1.05 + 7 * 0.05)
    assert worth_feeding(8, 0.85, passes) == 8
    # One slow pass does not rule a size out until enough confirm it: the guess counts where lower.
    passes.record(3, 0.2)
    assert passes.relative(3) == pytest.approx(1.1)
    passes.record(3, 0.2)
    passes.record(3, 0.2)
    assert passes.relative(3) == pytest.approx(5.0)
    assert PassCosts(0.1, learn=False).relative(9) == pytest.approx(1.8)
