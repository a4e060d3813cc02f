"""The default classifier's head, trained on made-up vectors: no weights, no embedding model."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from gemserve.safety.classifiers import EmbeddingClassifier, Head, fit_head
from gemserve.safety.policy import CATEGORIES, level


def made_up(seed: int = 0) -> tuple[np.ndarray, list[str | None], np.ndarray]:
    """Six clusters in 12 dimensions (the five categories, and harmless texts), plus a profanity column that is
    low everywhere. Returns (features, labels, centres)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, 12)) * 1.5
    labels: list[str | None] = [*CATEGORIES, None]
    rows, names = [], []
    for centre, label in zip(centres, labels, strict=True):
        count = 300 if label is None else 60
        rows.append(centre + rng.normal(size=(count, 12)))
        names += [label] * count
    features = np.vstack(rows)
    profanity = rng.uniform(0.0, 0.3, size=(len(features), 1))
    return np.hstack([features, profanity]), names, centres


def test_each_category_is_rated_high_at_its_own_texts_and_negligible_elsewhere() -> None:
    features, labels, centres = made_up()
    head = fit_head(features, labels)
    assert np.all(np.diff(head.cutoffs, axis=1) > 0)  # LOW < MEDIUM < HIGH, per category
    points = np.hstack([centres, np.full((6, 1), 0.1)])
    rated = head.probabilities(points)
    for j in range(len(CATEGORIES)):
        assert level(rated[j, j]) == 3  # HIGH at its own centre
        assert all(level(rated[k, j]) == 0 for k in range(6) if k != j)  # NEGLIGIBLE at the others'
    # About 2% of harmless texts reach LOW in a category (the cut-off's definition, here on the training set).
    harmless = features[[label is None for label in labels]]
    flagged = (head.probabilities(harmless) >= 0.25).mean(axis=0)
    assert np.all(flagged <= 0.06)


def test_open_abuse_the_profanity_model_is_sure_of_is_harassment() -> None:
    features, labels, centres = made_up()
    head = fit_head(features, labels)
    harmless = np.hstack([centres[5], [0.1]])[None, :]
    profane = np.hstack([centres[5], [0.999]])[None, :]
    harassment = CATEGORIES.index("HARM_CATEGORY_HARASSMENT")
    assert level(head.probabilities(harmless)[0, harassment]) == 0
    assert level(head.probabilities(profane)[0, harassment]) == 3


class WordVectors:
    """An embedding engine stand-in: each text's vector counts a few words."""

    WORDS = ("bomb", "idiot", "vote", "nude", "vermin", "garden", "recipe", "code")

    def __init__(self) -> None:
        self.path = Path("/nowhere/word-vectors")
        self.calls = 0

    async def embed(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        vectors = np.array([[t.lower().count(w) for w in self.WORDS] for t in texts], dtype=np.float32) + 0.01
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def training_file(path: Path) -> Path:
    words = {"HARM_CATEGORY_DANGEROUS_CONTENT": "bomb", "HARM_CATEGORY_HARASSMENT": "idiot",
             "HARM_CATEGORY_CIVIC_INTEGRITY": "vote", "HARM_CATEGORY_SEXUALLY_EXPLICIT": "nude",
             "HARM_CATEGORY_HATE_SPEECH": "vermin"}
    rows = [{"text": f"{word} example {i}", "category": category, "kind": "prompt"}
            for category, word in words.items() for i in range(20)]
    rows += [{"text": f"{w} example {i}", "category": None, "kind": "prompt"}
             for w in ("garden", "recipe", "code") for i in range(40)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_the_trained_head_is_kept_and_later_starts_load_it(tmp_path: Path) -> None:
    training = training_file(tmp_path / "training.jsonl")

    async def rate(embedder: WordVectors) -> list[dict[str, float]]:
        classifier = EmbeddingClassifier(embedder, training, cache_dir=tmp_path / "kept")  # type: ignore[arg-type]
        return await classifier.probabilities(["a bomb example", "a garden example"])

    first = WordVectors()
    rated = asyncio.run(rate(first))
    assert level(rated[0]["HARM_CATEGORY_DANGEROUS_CONTENT"]) >= 2 and level(max(rated[1].values())) == 0
    assert first.calls == 2  # the training texts, then the two rated
    (kept,) = (tmp_path / "kept").glob("safety-head-*.npz")

    again = WordVectors()
    assert asyncio.run(rate(again)) == rated and again.calls == 1  # loaded, not trained

    kept.write_bytes(b"not a head")
    broken = WordVectors()
    assert asyncio.run(rate(broken)) == rated and broken.calls == 2  # trained again, and kept anew
    head = Head.load(kept)
    assert head.weights.shape == (len(CATEGORIES), len(WordVectors.WORDS) + 1)

    head.weights[0, 0] = np.nan  # a file that reads but holds no usable head is trained anew too
    head.save(kept)
    with pytest.raises(ValueError):
        Head.load(kept)
    nan = WordVectors()
    assert asyncio.run(rate(nan)) == rated and nan.calls == 2


def test_pieces_rated_lately_are_not_rated_again(tmp_path: Path) -> None:
    training = training_file(tmp_path / "training.jsonl")
    embedder = WordVectors()
    classifier = EmbeddingClassifier(embedder, training)  # type: ignore[arg-type]

    async def go() -> None:
        first = await classifier.probabilities(["a bomb example", "a garden example"])
        calls = embedder.calls
        again = await classifier.probabilities(["a garden example", "a bomb example", "a new code example"])
        assert again[:2] == first[::-1]
        assert embedder.calls == calls + 1  # only the new piece went to the encoder

    asyncio.run(go())
