"""The sampling function on hand-made logits: each parameter has an effect that can be seen."""

from collections import Counter

import numpy as np
import pytest

from gemserve.engine.sampling import log_softmax, sample, top_ids
from gemserve.engine.types import SamplingParams

LOGITS = np.array([1.0, 3.0, 2.0, 0.5, -1.0], dtype=np.float32)


def draws(params: SamplingParams, n: int = 2000, seed: int = 0, generated: Counter | None = None) -> Counter:
    rng = np.random.default_rng(seed)
    return Counter(sample(LOGITS, params, generated or Counter(), rng).token for _ in range(n))


def test_temperature_zero_is_argmax() -> None:
    assert set(draws(SamplingParams(temperature=0.0), n=50)) == {1}


def test_top_k_limits_the_choice() -> None:
    assert set(draws(SamplingParams(temperature=1.0, top_k=2))) == {1, 2}


def test_top_p_keeps_the_nucleus() -> None:
    probs = np.exp(log_softmax(LOGITS))  # token 1 holds ~0.61, tokens 1+2 ~0.84
    assert probs[1] < 0.7 < probs[1] + probs[2]
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.7))) == {1, 2}


def test_full_distribution_is_followed() -> None:
    counts = draws(SamplingParams(temperature=1.0), n=20000)
    probs = np.exp(log_softmax(LOGITS))
    for token, p in enumerate(probs):
        assert abs(counts[token] / 20000 - p) < 0.02


def test_presence_and_frequency_penalties_push_used_tokens_down() -> None:
    greedy = SamplingParams(temperature=0.0, presence_penalty=1.5)
    assert sample(LOGITS, greedy, Counter({1: 1}), np.random.default_rng()).token == 2
    freq = SamplingParams(temperature=0.0, frequency_penalty=0.4)
    assert sample(LOGITS, freq, Counter({1: 2}), np.random.default_rng()).token == 1  # 3 - 0.8 > 2
    assert sample(LOGITS, freq, Counter({1: 3}), np.random.default_rng()).token == 2  # 3 - 1.2 < 2


def test_seed_reproduces_and_differs_between_seeds() -> None:
    params = SamplingParams(temperature=1.5)
    assert draws(params, n=50, seed=7) == draws(params, n=50, seed=7)
    rngs = [np.random.default_rng(1), np.random.default_rng(2)]
    sequences = [[sample(LOGITS, params, Counter(), rng).token for _ in range(30)] for rng in rngs]
    assert sequences[0] != sequences[1]


def test_logprobs_are_log_softmax_of_the_raw_logits_with_sorted_top() -> None:
    choice = sample(LOGITS, SamplingParams(temperature=0.0, logprobs=3), Counter(), np.random.default_rng())
    expected = log_softmax(LOGITS)
    assert choice.token == 1
    assert abs(choice.logprob - expected[1]) < 1e-9
    assert [t for t, _ in choice.top] == [1, 2, 0]
    assert np.allclose([lp for _, lp in choice.top], expected[[1, 2, 0]])


def test_nucleus_on_a_large_flat_vocabulary_grows_its_head() -> None:
    logits = np.zeros(100_000, dtype=np.float32)
    rng = np.random.default_rng(0)
    tokens = {sample(logits, SamplingParams(temperature=1.0, top_p=0.5), Counter(), rng).token for _ in range(200)}
    assert len(tokens) > 150  # half of a flat vocabulary is 50k tokens, not the first 256


def test_top_ids_is_exact_with_and_without_the_prefilter() -> None:
    rng = np.random.default_rng(0)
    peaked = rng.normal(size=50_000).astype(np.float32) * 4  # many scores within the margin
    flat_then_gap = np.concatenate([np.full(10, 100.0), np.zeros(50_000)]).astype(np.float32)  # too few near
    for scores in (peaked, flat_then_gap):
        for k in (1, 5, 64, 300):
            expected = np.argsort(-scores, kind="stable")[:k]
            assert sorted(scores[top_ids(scores, k)], reverse=True) == sorted(scores[expected], reverse=True)
            assert list(scores[top_ids(scores, k)]) == sorted(scores[top_ids(scores, k)], reverse=True)


class OnlyTokens:
    """A constraint allowing a fixed set of tokens, counting how often its whole mask is built."""

    def __init__(self, tokens: set[int]) -> None:
        self.tokens = tokens
        self.masks = 0

    def permits(self, token: int) -> bool:
        return token in self.tokens

    def allowed(self, n_vocab: int) -> np.ndarray:
        self.masks += 1
        mask = np.zeros(n_vocab, dtype=bool)
        mask[list(self.tokens)] = True
        return mask


def test_greedy_under_a_constraint_builds_the_mask_only_when_the_best_token_is_ruled_out() -> None:
    greedy = SamplingParams(temperature=0.0)
    best = int(np.argmax(LOGITS))
    follows = OnlyTokens({best, 0})
    assert sample(LOGITS, greedy, Counter(), np.random.default_rng(), follows).token == best
    assert follows.masks == 0
    ruled_out = OnlyTokens({0, 2})
    expected = max((0, 2), key=lambda t: LOGITS[t])
    assert sample(LOGITS, greedy, Counter(), np.random.default_rng(), ruled_out).token == expected
    assert ruled_out.masks == 1
    sampled = OnlyTokens({0})
    assert sample(LOGITS, SamplingParams(temperature=1.0), Counter(), np.random.default_rng(), sampled).token == 0
    assert sampled.masks == 1
    with pytest.raises(ValueError, match="allows no token"):
        sample(LOGITS, greedy, Counter(), np.random.default_rng(), OnlyTokens(set()))
