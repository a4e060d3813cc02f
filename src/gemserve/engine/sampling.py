"""Choosing the next token from a row of logits: a pure function of the logits, the parameters and an RNG.

Order of operations, as in llama.cpp and the Gemini API's description: presence/frequency penalties on the
tokens generated so far, then temperature, top-k, top-p (nucleus) and a draw. Temperature 0 is greedy.
Reported log-probabilities are those of the model's own distribution (log-softmax of the raw logits, before
penalties and temperature), so they can be checked against the model and compared across settings. Under a
constraint (`allowed`), tokens outside it are never drawn, but the reported figures stay the model's own: a
chosen token's log-probability is finite, and the top candidates may include tokens the constraint ruled out.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from gemserve.engine.types import SamplingParams

MIN_TEMPERATURE = 1e-4  # below this, dividing logits by the temperature overflows to inf: decode greedily
_NUCLEUS_FIRST_K = 256
_DIRECT_K = 4096
_PREFILTER_MARGIN = 16.0


@dataclass(frozen=True)
class Choice:
    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - float(np.max(logits))
    return shifted - np.log(np.sum(np.exp(shifted)))


def sample(logits: np.ndarray, params: SamplingParams, generated: Counter[int], rng: np.random.Generator,
           constraint: Rule | None = None) -> Choice:
    """Pick a token from `logits` (shape [vocab]); `generated` counts the tokens this sequence produced so far;
    `constraint`, when given, says which tokens may be drawn.

    Greedy under a constraint, the best token is asked about first: when the constraint permits it (as it
    nearly always does once a model follows the format), it is the masked argmax too, and the mask over the whole
    vocabulary - the per-token work that grows with it - is never built."""
    scores = _penalized(logits, params, generated)
    greedy = params.temperature < MIN_TEMPERATURE or params.top_k == 1
    if greedy:
        token = int(np.argmax(scores))
        if constraint is not None and not constraint.permits(token):
            token = int(np.argmax(_masked(scores, constraint, logits.shape[0])))
    else:
        if constraint is not None:
            scores = _masked(scores, constraint, logits.shape[0])
        token = _draw(scores, params, rng)
    if params.logprobs is None:
        return Choice(token, None, ())
    logprobs = log_softmax(logits)
    top: tuple[tuple[int, float], ...] = ()
    if params.scored:
        top = tuple((t, float(logprobs[t])) for t in params.scored)
    elif params.logprobs > 0:
        best = top_ids(logits, min(params.logprobs, logits.shape[0]))
        top = tuple((int(t), float(logprobs[t])) for t in best)
    return Choice(token, float(logprobs[token]), top)


class Rule(Protocol):
    """What sampling needs of a constraint (`engine.constraints.Constraint`)."""

    def permits(self, token: int) -> bool: ...

    def allowed(self, n_vocab: int) -> np.ndarray: ...


def _masked(scores: np.ndarray, constraint: Rule, n_vocab: int) -> np.ndarray:
    allowed = constraint.allowed(n_vocab)
    if not allowed.any():
        raise ValueError("the constraint allows no token here")
    return np.where(allowed, scores, np.float32(-np.inf))


def _penalized(logits: np.ndarray, params: SamplingParams, generated: Counter[int]) -> np.ndarray:
    if not generated or (params.presence_penalty == 0.0 and params.frequency_penalty == 0.0
                         and params.repetition_penalty == 1.0):
        return logits
    scores = np.array(logits, dtype=np.float32, copy=True)
    tokens = np.fromiter(generated.keys(), dtype=np.int64, count=len(generated))
    counts = np.fromiter(generated.values(), dtype=np.float32, count=len(generated))
    if params.repetition_penalty != 1.0:
        used = scores[tokens]
        scores[tokens] = np.where(used > 0, used / params.repetition_penalty, used * params.repetition_penalty)
    scores[tokens] -= params.presence_penalty + params.frequency_penalty * counts
    return scores


def _draw(scores: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    vocab = scores.shape[0]
    k = params.top_k if 0 < params.top_k < vocab else vocab
    temperature = params.temperature
    if params.top_p >= 1.0 and k == vocab:
        scaled = scores.astype(np.float64) / temperature
        weights = np.exp(scaled - scaled.max())
        return int(rng.choice(vocab, p=weights / weights.sum()))
    if params.top_p >= 1.0 or k <= _DIRECT_K:
        ids, weights = _head(scores, k, temperature)
        total = float(weights.sum())
    else:
        # Nucleus over a huge vocabulary: the head of the sorted distribution is enough; grow it until it
        # holds top_p of the mass. `total` is the whole distribution's mass in the same units as `weights`.
        scaled = scores.astype(np.float64) / temperature
        total = float(np.sum(np.exp(scaled - scaled.max())))
        k_try = _NUCLEUS_FIRST_K
        while True:
            ids, weights = _head(scores, k_try, temperature)
            if k_try >= k or weights.sum() >= params.top_p * total:
                break
            k_try = min(k, k_try * 4)
    if params.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(weights), params.top_p * total)) + 1
        ids, weights = ids[:keep], weights[:keep]
    return int(ids[rng.choice(len(ids), p=weights / weights.sum())])


def top_ids(scores: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k highest scores, highest first.

    Partitioning a 262k vocabulary costs milliseconds per token; but nearly all of it lies far below the best
    score, so the partition runs over the scores within a margin of the best whenever those are k or more.
    The result is exact either way: the k best are then all within the margin."""
    n = scores.shape[0]
    if k >= n:
        ids = np.arange(n)
    else:
        near = np.flatnonzero(scores >= scores.max() - _PREFILTER_MARGIN)
        if len(near) >= k:
            ids = near[np.argpartition(-scores[near], k - 1)[:k]]
        else:
            ids = np.argpartition(-scores, k - 1)[:k]
    return ids[np.argsort(-scores[ids], kind="stable")]


def _head(scores: np.ndarray, k: int, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """The k best token ids, best first, with tempered weights relative to the best token's (which is 1)."""
    ids = top_ids(scores, k)
    scaled = scores[ids].astype(np.float64) / temperature
    return ids, np.exp(scaled - scaled[0])
