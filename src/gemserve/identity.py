"""Who a request comes from, as every layer below HTTP sees it: an owner id and a project number, never a key.

Project numbers are what keys share tuned models by (`readerProjectNumbers`), so other keys see them: they are
derived from the key with a secret of the server's (`<data-dir>/secret.key`, made at the first start), so that
nobody can test guesses of a key against a number offline. Owner ids never leave the server.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

LOCAL_OWNER = "local"
SECRET_FILE = "secret.key"


@dataclass(frozen=True)
class Caller:
    owner: str  # a stable, non-secret id of the API key ("local" in open mode)
    project_number: int  # what others list in a tuned model's readerProjectNumbers to share it with this key


def owner_of(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _twelve_digits(digest: str) -> int:
    return int(digest[:15], 16) % 10**12


def unsalted_project_number(key: str) -> int:
    """Project numbers as servers before the secret derived them (for moving records over to the new ones)."""
    return _twelve_digits(hashlib.sha256(b"project:" + key.encode()).hexdigest())


class Identities:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def project_number(self, key: str) -> int:
        """12 digits (`gemserve project-number KEY --data-dir D` prints them)."""
        return _twelve_digits(hmac.new(self._secret, b"project:" + key.encode(), hashlib.sha256).hexdigest())

    def caller_for_key(self, key: str) -> Caller:
        return Caller(owner_of(key), self.project_number(key))


def read_secret(data_dir: Path) -> bytes | None:
    path = data_dir / SECRET_FILE
    return path.read_bytes() if path.is_file() else None


def create_secret(data_dir: Path) -> bytes:
    """The data dir's secret, made if there is none: written whole (owner-only), then linked into place, which
    fails if another process got there first; that one's secret is then everyone's."""
    existing = read_secret(data_dir)
    if existing is not None:
        return existing
    partial = data_dir / f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_bytes(32))
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileExistsError):  # another process's is in place: it is read below
            os.link(partial, data_dir / SECRET_FILE)
    finally:
        partial.unlink()
    secret = read_secret(data_dir)
    assert secret is not None
    return secret


OPEN_MODE_CALLER = Caller(LOCAL_OWNER, 0)
