"""What a model reads of a medium: a rendering, and the error for media that cannot be read."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

MODALITIES = ("TEXT", "DOCUMENT", "IMAGE", "AUDIO", "VIDEO")


class MediaError(ValueError):
    """The bytes are not what they claim to be, or cannot be read: the client's to fix (a 400)."""


@dataclass(frozen=True)
class Rendering:
    """A medium as text: the text of a document's pages, a transcript with times, the text in an image and what
    it shows. `modality` is what promptTokensDetails counts its tokens under."""

    modality: str
    text: str
    duration: float | None = None  # seconds, for audio and video
    pages: int | None = None  # for documents

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Rendering:
        return cls(**{k: value[k] for k in ("modality", "text", "duration", "pages") if k in value})
