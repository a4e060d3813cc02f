"""MIME types: which kind of medium each names, and whether bytes are what their type claims.

The types are those Google lists for Gemini's inputs, with their common aliases. Bytes are recognised by their
signatures (the `filetype` package); a text type must be UTF-8.
"""

from __future__ import annotations

import re

import filetype  # type: ignore[import-untyped]

SNIFF_BYTES = 8192

IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/jpg", "image/webp", "image/heic", "image/heif",
                         "image/gif", "image/bmp", "image/tiff"})
AUDIO_TYPES = frozenset({"audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave", "audio/mp3", "audio/mpeg",
                         "audio/aiff", "audio/x-aiff", "audio/aac", "audio/x-aac", "audio/ogg", "audio/opus",
                         "audio/flac", "audio/x-flac", "audio/webm", "audio/mp4", "audio/m4a", "audio/x-m4a"})
VIDEO_TYPES = frozenset({"video/mp4", "video/mpeg", "video/mpg", "video/mov", "video/quicktime", "video/avi",
                         "video/x-msvideo", "video/x-flv", "video/webm", "video/wmv", "video/x-ms-wmv", "video/3gpp",
                         "video/x-matroska"})
DOCUMENT_TYPES = frozenset({"application/pdf"})
TEXT_APPLICATION_TYPES = frozenset({
    "application/json", "application/xml", "application/javascript", "application/x-javascript",
    "application/x-typescript", "application/x-python", "application/x-python-code", "application/rtf",
    "application/x-sh", "application/x-yaml", "application/yaml", "application/sql", "application/x-tex",
    "application/ld+json",
})
MODALITY = {"text": "TEXT", "document": "DOCUMENT", "image": "IMAGE", "audio": "AUDIO", "video": "VIDEO"}
_MIME = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")


def valid_mime_type(mime_type: str) -> bool:
    return _MIME.fullmatch(mime_type) is not None


def kind_of(mime_type: str) -> str | None:
    """"text", "document", "image", "audio", "video", or None for a type no model here reads."""
    mime = mime_type.split(";")[0].strip().lower()
    if mime.startswith("text/") or mime in TEXT_APPLICATION_TYPES:
        return "text"
    if mime in DOCUMENT_TYPES:
        return "document"
    if mime in IMAGE_TYPES:
        return "image"
    if mime in AUDIO_TYPES:
        return "audio"
    if mime in VIDEO_TYPES:
        return "video"
    return None


def sniffed_kind(head: bytes) -> str | None:
    """The kind the bytes' signature shows, or None when they show none."""
    guess = filetype.guess_mime(head)
    if guess is None:
        return None
    if guess == "application/pdf":
        return "document"
    family = guess.split("/")[0]
    return family if family in ("image", "audio", "video") else "other"


def mismatch(mime_type: str, head: bytes) -> str | None:
    """Why bytes beginning with `head` are not of `mime_type`, or None when they may well be."""
    kind = kind_of(mime_type)
    if kind is None:
        return None  # stored as given; a request that uses it is told the type is not supported
    found = sniffed_kind(head)
    if kind == "text":
        if found not in (None, "other") or not _utf8(head):
            return f"the file is declared {mime_type}, but its bytes are not UTF-8 text."
        return None
    if found is None:
        # Raw AAC or MPEG streams have no signature the sniffer knows: decoding tells later.
        return None if kind in ("audio", "video") else f"the file is declared {mime_type}, but its bytes are not."
    if found == kind or {found, kind} <= {"audio", "video"}:  # containers hold either
        return None
    return f"the file is declared {mime_type}, but its bytes are {filetype.guess_mime(head)}."


def _utf8(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 3 and len(head) >= SNIFF_BYTES  # a character cut at the end of the head
    return b"\x00" not in head
