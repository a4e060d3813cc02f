"""Errors a client can cause, with the canonical `google.rpc.Code` names Google's APIs answer with.

Any layer raises `ApiError`; the HTTP layer (`gemserve.api.errors`) turns it into a `google.rpc.Status` body.
"""

from __future__ import annotations

from typing import Any

BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo"
RETRY_INFO_TYPE = "type.googleapis.com/google.rpc.RetryInfo"
RETRY_AFTER_SECONDS = 5  # what a busy server asks a client to wait

STATUS_CODES = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


class ApiError(Exception):
    """An error with a canonical status, raised anywhere and answered as `google.rpc.Status`."""

    def __init__(self, status: str, message: str, details: list[dict[str, Any]] | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = STATUS_CODES[status]
        self.message = message
        self.details = details or []
        self.retry_after = retry_after  # seconds, for a Retry-After header and a RetryInfo detail
        if retry_after is not None:
            self.details.append({"@type": RETRY_INFO_TYPE, "retryDelay": f"{retry_after}s"})

    def to_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message, "status": self.status}
        if self.details:
            error["details"] = self.details
        return {"error": error}


def invalid_argument(message: str, field: str | None = None) -> ApiError:
    """400 INVALID_ARGUMENT; with `field`, a BadRequest detail names the offending field."""
    details = []
    if field is not None:
        details.append({"@type": BAD_REQUEST_TYPE, "fieldViolations": [{"field": field, "description": message}]})
    return ApiError("INVALID_ARGUMENT", message, details)


def url_not_found() -> ApiError:
    """A path no route serves (unknown version, method or resource), in Google's words."""
    return ApiError("NOT_FOUND", "The requested URL was not found on this server.")


def not_found(message: str) -> ApiError:
    return ApiError("NOT_FOUND", message)
