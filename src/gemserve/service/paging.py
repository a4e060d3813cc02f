"""Page tokens for lists that page by position: an opaque token naming the list and the offset to go on from."""

from __future__ import annotations

import base64

from gemserve.errors import invalid_argument


def page_token(kind: str, offset: int) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{offset}".encode()).decode()


def page_offset(token: str, kind: str) -> int:
    """The offset a token of list `kind` stands for; a 400 naming page_token for anything else."""
    try:
        found, _, offset = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if found == kind and offset.isdigit():
            return int(offset)
    except (ValueError, UnicodeDecodeError):
        pass
    raise invalid_argument("page_token is not valid.", "page_token")
