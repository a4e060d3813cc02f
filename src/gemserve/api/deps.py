"""Who is calling: the API key (header `x-goog-api-key` or query `key`) checked against the configured keys.

With no keys configured the server runs in open local mode: every caller is the local owner. With keys, a
missing key is 403 PERMISSION_DENIED and a wrong key 400 INVALID_ARGUMENT (API_KEY_INVALID), as Google answers.
The key itself is never stored or logged: the caller is known by a digest of it.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from gemserve.config import Settings
from gemserve.errors import ERROR_INFO_TYPE, ApiError
from gemserve.identity import OPEN_MODE_CALLER, Caller, caller_for_key


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def caller(request: Request) -> Caller:
    settings = settings_of(request)
    key = request.headers.get("x-goog-api-key") or request.query_params.get("key")
    if settings.open_mode:
        return OPEN_MODE_CALLER
    if not key:
        raise ApiError(
            "PERMISSION_DENIED",
            "Method doesn't allow unregistered callers (callers without established identity). "
            "Please use API Key or other form of API consumer identity to call this API.",
        )
    if not any(hmac.compare_digest(key.encode(), known.encode()) for known in settings.api_keys):
        raise ApiError(
            "INVALID_ARGUMENT",
            "API key not valid. Please pass a valid API key.",
            [{"@type": ERROR_INFO_TYPE, "reason": "API_KEY_INVALID", "domain": "googleapis.com",
              "metadata": {"service": "generativelanguage.googleapis.com"}}],
        )
    return caller_for_key(key)


CallerDep = Annotated[Caller, Depends(caller)]
