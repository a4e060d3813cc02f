"""Who a request comes from, as every layer below HTTP sees it: an owner id and a project number, never a key."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

LOCAL_OWNER = "local"


@dataclass(frozen=True)
class Caller:
    owner: str  # a stable, non-secret id of the API key ("local" in open mode)
    project_number: int  # what others list in a tuned model's readerProjectNumbers to share it with this key


def owner_of(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def project_number(key: str) -> int:
    """The project number of an API key: 12 digits derived from it (`gemserve project-number KEY` prints it)."""
    return int(hashlib.sha256(b"project:" + key.encode()).hexdigest()[:15], 16) % 10**12


def caller_for_key(key: str) -> Caller:
    return Caller(owner_of(key), project_number(key))


OPEN_MODE_CALLER = Caller(LOCAL_OWNER, 0)
