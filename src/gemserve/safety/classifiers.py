"""Safety classifiers: each gives a text a probability of harm per category (`policy.CATEGORIES`).

- `EmbeddingClassifier`, the default: a logistic-regression head per category on all-MiniLM-L6-v2 sentence
  vectors (the built-in embedding model), trained at start-up on `training.jsonl`, texts the team wrote for the
  five categories and for harmless look-alikes (medicine, security lessons, fiction, news, elections, sex
  education, programmers' "kill the process"). The evaluation set (benchmarks/safety/eval.jsonl) is a different
  set of texts.
- `ProfanityClassifier`: alt-profanity-check's trained linear model, strong on abuse and insults; it adds to
  HARASSMENT.
- `JudgeClassifier`: an instruction-tuned generative model asked, per category, whether a text breaks that
  category's policy (ShieldGemma's prompt), the probability read from its scores for "Yes" and "No". Made for a
  safety model the user configures (`--safety-judge`, a ShieldGemma GGUF); the built-in 0.5B coder model is a
  poor judge (docs/safety.md has the figures), so it is not the default.
- `Combined`: a base classifier with HARASSMENT raised to the profanity model's probability where that is higher.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from gemserve.engine.embedding import EmbeddingEngine
from gemserve.engine.types import GenerationRequest, SamplingParams, TokenEvent
from gemserve.models.chat_format import Message
from gemserve.models.registry import ServedModel
from gemserve.safety.policy import CATEGORIES

log = logging.getLogger("gemserve.safety")

TRAINING = Path(__file__).with_name("training.jsonl")
Probabilities = dict[str, float]


class Classifier(Protocol):
    async def probabilities(self, texts: Sequence[str]) -> list[Probabilities]:
        """Per text, each category's probability of harm."""
        ...


class EmbeddingClassifier:
    """Logistic regression per category on sentence vectors; trained once, off the event loop, on first use
    (`prepare()` starts it early)."""

    def __init__(self, embedder: EmbeddingEngine, training: Path = TRAINING) -> None:
        self.embedder = embedder
        self.training = training
        self._head: asyncio.Task[tuple[np.ndarray, np.ndarray]] | None = None

    def prepare(self) -> None:
        if self._head is None:
            self._head = asyncio.get_running_loop().create_task(self._train())

    async def _train(self) -> tuple[np.ndarray, np.ndarray]:
        rows = [json.loads(line) for line in self.training.read_text(encoding="utf-8").splitlines() if line.strip()]
        vectors = await self.embedder.embed([row["text"] for row in rows])
        labels = [row["category"] for row in rows]
        head = await asyncio.to_thread(fit_head, vectors, labels)
        digest = hashlib.sha256(self.training.read_bytes()).hexdigest()[:12]
        log.info("safety classifier trained", extra={"examples": len(rows), "training_sha256": digest})
        return head

    async def probabilities(self, texts: Sequence[str]) -> list[Probabilities]:
        self.prepare()
        assert self._head is not None
        weights, bias = await asyncio.shield(self._head)
        vectors = await self.embedder.embed(list(texts))
        scores = 1.0 / (1.0 + np.exp(-(vectors @ weights.T + bias)))
        return [dict(zip(CATEGORIES, map(float, row), strict=True)) for row in scores]


def fit_head(vectors: np.ndarray, labels: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """(weights [categories, dims], biases [categories]): one category against all other texts, each."""
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]  # sklearn takes a second to import: only when training

    weights, biases = [], []
    for category in CATEGORIES:
        target = np.array([label == category for label in labels])
        model = LogisticRegression(C=4.0, class_weight="balanced", max_iter=2000)
        model.fit(vectors, target)
        weights.append(model.coef_[0])
        biases.append(model.intercept_[0])
    return np.array(weights, dtype=np.float32), np.array(biases, dtype=np.float32)


class ProfanityClassifier:
    """alt-profanity-check: the probability that a text is offensive, as HARASSMENT (the others stay 0)."""

    async def probabilities(self, texts: Sequence[str]) -> list[Probabilities]:
        return await asyncio.to_thread(self._predict, list(texts))

    @staticmethod
    def _predict(texts: list[str]) -> list[Probabilities]:
        from profanity_check import predict_prob  # type: ignore[import-untyped]  # loads scikit-learn and the model: only when first needed

        return [{"HARM_CATEGORY_HARASSMENT": float(p)} for p in predict_prob(texts)]


# ShieldGemma's policies, one per category, and its prompt (the question is asked about a user's prompt; a
# model's answer is judged as such by the same prompt).
POLICIES = {
    "HARM_CATEGORY_SEXUALLY_EXPLICIT": '"No Sexually Explicit Information": The prompt shall not contain or seek '
    "generation of content that contains references to sexual acts or other lewd content (e.g., sexually graphic "
    "descriptions, content aimed at causing arousal). Medical or scientific terms related to human anatomy or sex "
    "education are permitted.",
    "HARM_CATEGORY_HATE_SPEECH": '"No Hate Speech": The prompt shall not contain or seek generation of content '
    "that expresses, incites, or promotes hate based on race, gender, ethnicity, religion, nationality, sexual "
    "orientation, disability status, or caste.",
    "HARM_CATEGORY_HARASSMENT": '"No Harassment": The prompt shall not contain or seek generation of content that '
    "is malicious, intimidating, bullying, or abusive content targeting another individual (e.g., physical "
    "threats, denial of tragic events, disparaging victims of violence).",
    "HARM_CATEGORY_DANGEROUS_CONTENT": '"No Dangerous Content": The prompt shall not contain or seek generation of '
    "content that harms oneself and/or others (e.g., accessing or building firearms and explosive devices, "
    "promotion of terrorism, instructions for suicide).",
    "HARM_CATEGORY_CIVIC_INTEGRITY": '"No Election Misinformation": The prompt shall not contain or seek '
    "generation of content that misleads people about elections or voting (e.g., false dates, places or ways "
    "to vote, voter suppression, impersonating election officials, fake ballots).",
}
JUDGE_PROMPT = (
    "You are a policy expert trying to help determine whether a user prompt is in violation of the defined "
    "safety policies.\n\n<start_of_turn>\nHuman Question: {text}\n<end_of_turn>\n\nOur safety principle is "
    "defined in the below:\n\n* {policy}\n\n===\n\nDoes the human question violate the above principle? Your "
    "answer must start with 'Yes' or 'No'."
)


class JudgeClassifier:
    """A generative model as judge: one short sequence per category, batched by its engine, never shown."""

    def __init__(self, model: ServedModel) -> None:
        self.model = model
        engine = model.engine
        self.yes_no = tuple(engine.tokenize(word, add_bos=False, parse_special=False)[0] for word in ("Yes", "No"))

    async def probabilities(self, texts: Sequence[str]) -> list[Probabilities]:
        return list(await asyncio.gather(*(self._rate(text) for text in texts)))

    async def _rate(self, text: str) -> Probabilities:
        scores = await asyncio.gather(*(self._ask(text, POLICIES[c]) for c in CATEGORIES))
        return dict(zip(CATEGORIES, scores, strict=True))

    async def _ask(self, text: str, policy: str) -> float:
        engine = self.model.engine
        message = Message("user", JUDGE_PROMPT.format(text=text, policy=policy))
        bos = engine.tokenize("", add_bos=True, parse_special=False)
        prompt = await asyncio.to_thread(
            self.model.chat.prompt_ids, [message],
            lambda s, special: engine.tokenize(s, add_bos=False, parse_special=special), bos[0] if bos else None)
        sampling = SamplingParams(temperature=0.0, logprobs=0, scored=self.yes_no)
        request = GenerationRequest(prompt=tuple(prompt), sampling=sampling, max_new_tokens=1)
        async for event in engine.generate(request):
            if isinstance(event, TokenEvent):
                scored = dict(event.top)
                yes, no = scored[self.yes_no[0]], scored[self.yes_no[1]]
                return 1.0 / (1.0 + math.exp(no - yes))
        return 0.0


class Combined:
    """`base`'s probabilities, with HARASSMENT raised to `profanity`'s where that is higher."""

    def __init__(self, base: Classifier, profanity: Classifier) -> None:
        self.base = base
        self.profanity = profanity

    async def probabilities(self, texts: Sequence[str]) -> list[Probabilities]:
        base, extra = await asyncio.gather(self.base.probabilities(texts), self.profanity.probabilities(texts))
        out = []
        for one, more in zip(base, extra, strict=True):
            merged = dict(one)
            for category, p in more.items():
                merged[category] = max(merged.get(category, 0.0), p)
            out.append(merged)
        return out
