"""The default classifier's head, trained on made-up vectors: no weights, no embedding model."""

from __future__ import annotations

import numpy as np

from gemserve.safety.classifiers import fit_head
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
