"""Prompt lookup's n-gram index, and how many proposed tokens are worth feeding."""

from __future__ import annotations

import math

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


def measured(seconds: dict[int, float]) -> PassCosts:
    """Pass costs as an engine measures them as it loads, from seconds by tokens fed."""
    return PassCosts.measure(lambda n: seconds[n])


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


def test_each_size_costs_its_fastest_pass_after_a_warm_up() -> None:
    passes: list[int] = []
    slowed = {0: 9.0, 1: 9.0, 4: 0.5}  # the two warm-up passes, and one that something else slowed down

    def run(n: int) -> float:
        passes.append(n)
        return slowed.get(len(passes) - 1, 0.04 * (1 + 0.25 * (n - 1)))

    costs = PassCosts.measure(run, rounds=2)
    assert passes == [9, 1, *range(1, 10), *range(9, 0, -1)]  # alternating: a slow spell does not hit one end only
    assert [costs.relative(n) for n in range(1, 10)] == pytest.approx([1 + 0.25 * k for k in range(9)])
    assert costs.relative(10) == math.inf  # beyond what was measured, never fed
    assert worth_feeding(12, 0.99, costs) == 8
    assert str(PassCosts.guessed(0.1)).startswith("1:1.00 2:1.10 3:1.20")
    assert PassCosts.guessed(0.1).relative(9) == pytest.approx(1.8)
