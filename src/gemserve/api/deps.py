"""Who is calling: the API key (header `x-goog-api-key` or query `key`) checked against the configured keys.

With no keys configured the server runs in open local mode: every caller is the local owner. With keys, a
missing key is 403 PERMISSION_DENIED and a wrong key 400 INVALID_ARGUMENT (API_KEY_INVALID), as Google answers.
The key itself is never stored or logged: the caller is known by a digest of it.

Open mode trusts whoever can reach the server, and a web page the user visits can reach 127.0.0.1 too. So in
open mode a request must be addressed (`Host`) to an IP address, `localhost` or a name in
GEMSERVE_ALLOWED_HOSTS, which defeats DNS rebinding; and a browser's cross-site request (an `Origin` header
naming another site) is refused. Bodies must be JSON (`api/streaming.read_json`), which a page cannot send
cross-site without the browser asking the server first.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request

from gemserve.config import Settings
from gemserve.errors import ERROR_INFO_TYPE, ApiError, invalid_argument
from gemserve.identity import OPEN_MODE_CALLER, Caller, Identities


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


# Google's system parameters, and the parameters of gemserve's routes: any other is refused, as Google does.
SYSTEM_PARAMETERS = frozenset({"key", "alt", "$alt", "$.xgafv", "prettyPrint", "fields", "quotaUser", "callback",
                               "access_token", "oauth_token", "upload_protocol", "uploadType"})
ROUTE_PARAMETERS = frozenset({"pageSize", "pageToken", "tunedModelId", "updateMask", "filter", "upload_id"})
ALT_VALUES = frozenset({"json", "sse"})


def check_query(request: Request) -> None:
    for name in request.query_params:
        if name not in SYSTEM_PARAMETERS and name not in ROUTE_PARAMETERS:
            raise invalid_argument(f'Invalid JSON payload received. Unknown name "{name}": Cannot bind query '
                                   f"parameter. Field '{name}' could not be found in request message.", name)
    alt = request.query_params.get("alt")
    if alt is not None and alt not in ALT_VALUES:
        raise invalid_argument(f"Invalid value at 'alt' ({alt!r}): expected one of {', '.join(sorted(ALT_VALUES))}.",
                               "alt")


def caller(request: Request) -> Caller:
    check_query(request)
    settings = settings_of(request)
    key = request.headers.get("x-goog-api-key") or request.query_params.get("key")
    if settings.open_mode:
        check_local_request(request, settings)
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
    identities: Identities = request.app.state.identities
    return identities.caller_for_key(key)


CallerDep = Annotated[Caller, Depends(caller)]


def check_local_request(request: Request, settings: Settings) -> None:
    host = _host_name(request.headers.get("host", ""))
    if not _trusted_host(host, settings):
        raise ApiError("PERMISSION_DENIED", f"Requests addressed to host {host!r} are refused in open local mode "
                       "(no API keys configured). Use the server's IP address or localhost, set "
                       "GEMSERVE_ALLOWED_HOSTS, or configure GEMSERVE_API_KEYS.")
    origin = request.headers.get("origin")
    if origin is not None and origin != "null" and not _trusted_host(urlsplit(origin).hostname or "", settings):
        raise ApiError("PERMISSION_DENIED", f"Cross-site requests from {origin} are refused in open local mode "
                       "(no API keys configured). Configure GEMSERVE_API_KEYS to serve web pages of other sites.")


def _host_name(header: str) -> str:
    """`127.0.0.1:8080` -> `127.0.0.1`, `[::1]:8080` -> `::1`, `Example.COM` -> `example.com`."""
    return (urlsplit(f"//{header}").hostname or "").lower()


def _trusted_host(host: str, settings: Settings) -> bool:
    if host == "localhost" or host.endswith(".localhost") or host in settings.allowed_hosts:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
