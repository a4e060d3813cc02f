"""Safety classifiers: each gives a text a probability of harm per category (`policy.CATEGORIES`).

- `EmbeddingClassifier`, the default: a logistic-regression head per category on all-MiniLM-L6-v2 sentence
  vectors (the built-in embedding model) and alt-profanity-check's probability that the text is offensive (a
  trained linear model, strong on abuse; the head fits how much it counts), trained at start-up on
  `training.jsonl`, texts the team wrote for the five categories and for harmless look-alikes (medicine,
  security lessons, fiction, news, elections, sex education, programmers' "kill the process"). The evaluation set
  (benchmarks/safety/eval.jsonl) is a different set of texts.
- `ProfanityClassifier`: alt-profanity-check alone, as HARASSMENT.
- `JudgeClassifier`: an instruction-tuned generative model asked, per category, whether a text breaks that
  category's policy (ShieldGemma's prompt), the probability read from its scores for "Yes" and "No". Made for a
  safety model the user configures (`--safety-judge`, a ShieldGemma GGUF); the built-in 0.5B coder model is a
  poor judge (docs/safety.md has the figures), so it is not the default.
- `Combined`: a judge with HARASSMENT raised to the profanity model's probability where that is higher.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from gemserve.engine.embedding import EmbeddingEngine
from gemserve.engine.types import EngineError, GenerationRequest, SamplingParams, TokenEvent
from gemserve.errors import ApiError
from gemserve.models.chat_format import Message
from gemserve.models.registry import ServedModel
from gemserve.safety.policy import CATEGORIES
from gemserve.tuning.jobs import atomic_write_bytes

log = logging.getLogger("gemserve.safety")

TRAINING = Path(__file__).with_name("training.jsonl")
Probabilities = dict[str, float]


class Classifier(Protocol):
    async def probabilities(self, texts: Sequence[str]) -> list[Probabilities]:
        """Per text, each category's probability of harm."""
        ...


class EmbeddingClassifier:
    """Logistic regression per category on sentence vectors plus the profanity model's probability; trained once,
    off the event loop, on first use (`prepare()` starts it early).

    Its scores are mapped to probabilities the policy's cut-offs (0.25, 0.5, 0.75) read as LOW, MEDIUM and HIGH:
    a category's LOW cut-off is the score that `BENIGN_FLAGGED[0]` of the harmless training texts reach in 5-fold
    cross-validation (2%: with five categories, at most about one harmless text in ten is flagged in any), MEDIUM
    and HIGH the scores that 1% and 0.5% of them reach. Between cut-offs the map is linear.

    Where the profanity model is strong, at the top of its range, it also rates HARASSMENT on its own: from the
    probability that 0.5% of the harmless training texts reach (LOW), 0.25% (MEDIUM) and 0.1% (HIGH); open abuse
    the head underrates ("you're a braindead loser") is caught so."""

    def __init__(self, embedder: EmbeddingEngine, training: Path = TRAINING, cache_dir: Path | None = None) -> None:
        self.embedder = embedder
        self.training = training
        self.cache_dir = cache_dir  # where the trained head is kept, so that later starts only load it
        self._head: asyncio.Task[Head] | None = None
        # Pieces rated lately: a conversation's earlier turns (and a cached content) come again with every request.
        self._recent: OrderedDict[str, Probabilities] = OrderedDict()

    def prepare(self) -> None:
        if self._head is None:
            self._head = asyncio.get_running_loop().create_task(self._load_or_train())

    async def _load_or_train(self) -> Head:
        data, key = await asyncio.to_thread(self._training_and_key)
        kept = self.cache_dir / f"safety-head-{key[:16]}.npz" if self.cache_dir is not None else None
        if kept is not None and kept.is_file():
            try:
                return await asyncio.to_thread(Head.load, kept)
            except Exception as exc:  # a damaged file (truncated, empty, not a zip) is trained anew
                log.warning("safety classifier: the kept head could not be read; training again",
                            extra={"path": str(kept), "error": str(exc)})
        rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
        features = await self._features([row["text"] for row in rows])
        head = await asyncio.to_thread(fit_head, features, [row["category"] for row in rows])
        log.info("safety classifier trained", extra={"examples": len(rows), "training_sha256": key[:12]})
        if kept is not None:
            try:
                await asyncio.to_thread(head.save, kept)
            except OSError as exc:
                log.warning("safety classifier: the head could not be kept", extra={"error": str(exc)})
        return head

    def _training_and_key(self) -> tuple[bytes, str]:
        """The training set, and the kept head's key: that set, the encoder's files, the head's format."""
        data = self.training.read_bytes()
        identity = _encoder_identity(self.embedder.path)
        return data, hashlib.sha256(b"%s\0%s\0%d" % (data, identity, HEAD_FORMAT)).hexdigest()

    async def _features(self, texts: list[str]) -> np.ndarray:
        vectors, profane = await asyncio.gather(self.embedder.embed(texts), PROFANITY.probabilities(texts))
        offensive = np.array([[p["HARM_CATEGORY_HARASSMENT"]] for p in profane], dtype=np.float32)
        return np.hstack([vectors, offensive])

    async def probabilities(self, texts: Sequence[str]) -> list[Probabilities]:
        self.prepare()
        assert self._head is not None
        try:
            head = await asyncio.shield(self._head)
        except Exception as exc:  # every rating fails alike: say so, as a server-side unavailability
            raise ApiError("UNAVAILABLE", f"The safety classifier could not be trained: {exc}") from exc
        new = list(dict.fromkeys(t for t in texts if t not in self._recent))
        # In turns of RATED_AT_ONCE, so that a long prompt does not hold the encoder's thread for seconds on end:
        # other requests' ratings (and embedContent) get in between.
        for start in range(0, len(new), RATED_AT_ONCE):
            chunk = new[start:start + RATED_AT_ONCE]
            scores = head.probabilities(await self._features(chunk))
            for text, row in zip(chunk, scores, strict=True):
                self._recent[text] = dict(zip(CATEGORIES, map(float, row), strict=True))
        rated = [self._recent[t] for t in texts]
        for text in texts:
            self._recent.move_to_end(text)
        while len(self._recent) > RECENT_PIECES:
            self._recent.popitem(last=False)
        return rated


def _encoder_identity(path: Path) -> bytes:
    """The encoder's path and its files' names, sizes and times: new weights at the same path train a new head."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    stats = [f"{p.relative_to(path)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return "\n".join([str(path), *stats]).encode()


BENIGN_FLAGGED = (0.02, 0.01, 0.005)  # harmless training texts rated LOW, MEDIUM, HIGH in cross-validation
PROFANE_FLAGGED = (0.005, 0.0025, 0.001)  # harmless training texts the profanity model alone rates so
HARASSMENT = CATEGORIES.index("HARM_CATEGORY_HARASSMENT")
LEVEL_PROBABILITIES = (0.25, 0.5, 0.75)  # what those scores map to (policy.CUTOFFS)


HEAD_FORMAT = 1  # bumped when fitting or the kept file changes
RATED_AT_ONCE = 64  # pieces per turn on the encoder's thread
RECENT_PIECES = 4096  # pieces whose ratings are kept


class Head:
    """Per category: weights, bias, and the scores that map to each level's probability."""

    def __init__(self, weights: np.ndarray, biases: np.ndarray, cutoffs: np.ndarray, profane: np.ndarray) -> None:
        self.weights = weights  # [categories, features]; the last feature is the profanity model's probability
        self.biases = biases  # [categories]
        self.cutoffs = cutoffs  # [categories, levels], increasing along levels
        self.profane = profane  # [levels]: the profanity model's own cut-offs for HARASSMENT

    def save(self, path: Path) -> None:
        """Written whole or not at all (servers sharing a models directory may write it at once)."""
        data = io.BytesIO()
        np.savez(data, weights=self.weights, biases=self.biases, cutoffs=self.cutoffs, profane=self.profane)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data.getvalue())

    @staticmethod
    def load(path: Path) -> Head:
        """A kept head, checked (ValueError for one of the wrong shape or with values that are not finite)."""
        with np.load(path) as kept:
            head = Head(kept["weights"], kept["biases"], kept["cutoffs"], kept["profane"])
        levels = len(LEVEL_PROBABILITIES)
        shapes = (head.weights.ndim == 2 and head.weights.shape[0] == len(CATEGORIES)
                  and head.biases.shape == (len(CATEGORIES),) and head.cutoffs.shape == (len(CATEGORIES), levels)
                  and head.profane.shape == (levels,))
        arrays = (head.weights, head.biases, head.cutoffs, head.profane)
        if not shapes or not all(np.isfinite(a).all() for a in arrays):
            raise ValueError(f"{path} is not a safety head of this format")
        return head

    def scores(self, features: np.ndarray) -> np.ndarray:
        result: np.ndarray = 1.0 / (1.0 + np.exp(-(features @ self.weights.T + self.biases)))
        return result

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        scores = self.scores(features)
        out = np.empty_like(scores)
        for j in range(scores.shape[1]):
            out[:, j] = np.interp(scores[:, j], [0.0, *self.cutoffs[j], 1.0], [0.0, *LEVEL_PROBABILITIES, 1.0])
        profane = np.interp(features[:, -1], [0.0, *self.profane, 1.0], [0.0, *LEVEL_PROBABILITIES, 1.0])
        out[:, HARASSMENT] = np.maximum(out[:, HARASSMENT], profane)
        return out


def fit_head(features: np.ndarray, labels: Sequence[str | None]) -> Head:
    """One category against all other texts, each; cut-offs from 5-fold cross-validated scores."""
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]
    from sklearn.model_selection import StratifiedKFold, cross_val_predict  # type: ignore[import-untyped]

    harmless = np.array([label is None for label in labels])
    weights, biases, cutoffs = [], [], []
    for category in CATEGORIES:
        target = np.array([label == category for label in labels])
        model = LogisticRegression(C=16.0, class_weight="balanced", max_iter=3000)
        folds = StratifiedKFold(5, shuffle=True, random_state=0)
        held_out = cross_val_predict(model, features, target, cv=folds, method="predict_proba")[:, 1]
        cutoffs.append(_cutoffs(held_out[harmless], BENIGN_FLAGGED))
        model.fit(features, target)
        weights.append(model.coef_[0])
        biases.append(model.intercept_[0])
    profane = _cutoffs(features[harmless, -1], PROFANE_FLAGGED)
    return Head(np.array(weights, dtype=np.float32), np.array(biases, dtype=np.float32), np.array(cutoffs), profane)


def _cutoffs(harmless_scores: np.ndarray, shares: Sequence[float]) -> np.ndarray:
    """The scores that `shares` of the harmless texts reach, strictly increasing and below 1."""
    cuts = [float(np.quantile(harmless_scores, 1.0 - share)) for share in shares]
    for k in range(1, len(cuts)):
        cuts[k] = max(cuts[k], cuts[k - 1] + 1e-6)
    return np.minimum(cuts, 1.0 - 1e-6 * np.arange(len(cuts), 0, -1))


class ProfanityClassifier:
    """alt-profanity-check: the probability that a text is offensive, as HARASSMENT (the others stay 0)."""

    async def probabilities(self, texts: Sequence[str]) -> list[Probabilities]:
        return await asyncio.to_thread(self._predict, list(texts))

    @staticmethod
    def _predict(texts: list[str]) -> list[Probabilities]:
        from profanity_check import predict_prob  # type: ignore[import-untyped]  # loads scikit-learn and the model: only when first needed

        return [{"HARM_CATEGORY_HARASSMENT": float(p)} for p in predict_prob(texts)]


PROFANITY = ProfanityClassifier()

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


JUDGE_SEQUENCES = 16


class JudgeClassifier:
    """A generative model as judge: one short sequence per category, batched by its engine, never shown."""

    def __init__(self, model: ServedModel) -> None:
        self.model = model
        engine = model.engine
        self.yes_no = tuple(engine.tokenize(word, add_bos=False, parse_special=False)[0] for word in ("Yes", "No"))
        # Its questions in flight at once, over all requests: a long text's many pieces wait their turn here
        # rather than fill the engine's queue (which refuses new sequences past 256).
        self._slots = asyncio.Semaphore(JUDGE_SEQUENCES)

    async def probabilities(self, texts: Sequence[str]) -> list[Probabilities]:
        try:
            async with asyncio.TaskGroup() as group:  # one failure cancels the other questions
                asked = [[group.create_task(self._ask(text, POLICIES[c])) for c in CATEGORIES] for text in texts]
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None  # the first failure, as it is (EngineBusy stays EngineBusy)
        return [dict(zip(CATEGORIES, (task.result() for task in tasks), strict=True)) for tasks in asked]

    async def _ask(self, text: str, policy: str) -> float:
        async with self._slots:
            return await self._question(text, policy)

    async def _question(self, text: str, policy: str) -> float:
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
        # It ended its turn at once: no answer is no rating, never a harmless one.
        raise EngineError(f"the safety judge {self.model.spec.id} gave no answer")


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
