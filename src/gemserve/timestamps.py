"""Timestamps as the Gemini API writes them: RFC 3339 in UTC with microseconds and a `Z`."""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def utc_now() -> str:
    return rfc3339(datetime.now(UTC))


def parse_rfc3339(text: str) -> datetime:
    """The moment a timestamp names (ValueError when it is not one); without an offset it is taken as UTC."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
