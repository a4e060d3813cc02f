"""Which harms a request rates and blocks, and how a probability of harm becomes Google's HarmProbability.

A request's `safetySettings` give a threshold per harm category; a category it leaves out takes the default,
`OFF`, as on Google's current models: such a request is not rated at all and pays nothing. `OFF` skips a
category's rating; `BLOCK_NONE` rates it (responses carry its rating) but never blocks; the three `BLOCK_*`
thresholds block content rated at or above their level.

A classifier gives each category a probability of harm in [0, 1]; `CUTOFFS` map it to NEGLIGIBLE, LOW, MEDIUM
or HIGH (docs/safety.md gives the measured precision and recall at each).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gemserve.errors import invalid_argument
from gemserve.schema.content import SafetySetting
from gemserve.schema.responses import SafetyRating

# The categories Gemini models rate, in the order Google's responses list them.
CATEGORIES = ("HARM_CATEGORY_SEXUALLY_EXPLICIT", "HARM_CATEGORY_HATE_SPEECH", "HARM_CATEGORY_HARASSMENT",
              "HARM_CATEGORY_DANGEROUS_CONTENT", "HARM_CATEGORY_CIVIC_INTEGRITY")
LEVELS = ("NEGLIGIBLE", "LOW", "MEDIUM", "HIGH")
# The lowest probability of harm rated LOW, MEDIUM and HIGH.
CUTOFFS = (0.25, 0.5, 0.75)
# The level from which each blocking threshold blocks.
BLOCKS_FROM = {"BLOCK_LOW_AND_ABOVE": 1, "BLOCK_MEDIUM_AND_ABOVE": 2, "BLOCK_ONLY_HIGH": 3}
NEVER_BLOCKS = ("BLOCK_NONE", "OFF")
DEFAULT_THRESHOLD = "OFF"


def level(probability: float) -> int:
    """0..3: NEGLIGIBLE, LOW, MEDIUM, HIGH."""
    return sum(probability >= cutoff for cutoff in CUTOFFS)


@dataclass(frozen=True)
class Verdict:
    """A text's ratings, one per rated category, and whether any of them blocks it."""

    ratings: tuple[SafetyRating, ...]
    blocked: bool


@dataclass(frozen=True)
class SafetyPolicy:
    """The rated categories of a request (report order) with their thresholds."""

    thresholds: tuple[tuple[str, str], ...]

    @property
    def blocks(self) -> bool:
        """Whether anything can be blocked (else ratings are only reported)."""
        return any(threshold in BLOCKS_FROM for _, threshold in self.thresholds)

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(category for category, _ in self.thresholds)

    def judge(self, probabilities: Mapping[str, float]) -> Verdict:
        ratings = []
        blocked = False
        for category, threshold in self.thresholds:
            rated = level(probabilities.get(category, 0.0))
            blocks = threshold in BLOCKS_FROM and rated >= BLOCKS_FROM[threshold]
            blocked = blocked or blocks
            ratings.append(SafetyRating(category=category, probability=LEVELS[rated], blocked=blocks or None))
        return Verdict(tuple(ratings), blocked)


def safety_policy(settings: Sequence[SafetySetting] | None) -> SafetyPolicy | None:
    """The policy of a request's safety settings (checked: a 400 names a bad one); None when nothing is rated."""
    chosen: dict[str, str] = {}
    for i, setting in enumerate(settings or []):
        where = f"safety_settings[{i}]"
        if setting.category not in CATEGORIES:
            raise invalid_argument(f"{where}.category: {setting.category} is not a valid harm category for this "
                                   f"model; use one of {', '.join(CATEGORIES)}.", f"{where}.category")
        if setting.category in chosen:
            raise invalid_argument(f"{where}.category: {setting.category} is set more than once.", f"{where}.category")
        if setting.threshold is None or setting.threshold == "HARM_BLOCK_THRESHOLD_UNSPECIFIED":
            raise invalid_argument(f"{where}.threshold: a threshold is required for {setting.category}.",
                                   f"{where}.threshold")
        chosen[setting.category] = setting.threshold
    thresholds = tuple((c, chosen.get(c, DEFAULT_THRESHOLD)) for c in CATEGORIES)
    rated = tuple((c, t) for c, t in thresholds if t != "OFF")
    return SafetyPolicy(rated) if rated else None
