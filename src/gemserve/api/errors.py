"""One place that turns exceptions into `google.rpc.Status` JSON: `{"error": {"code", "message", "status", "details"}}`.

`ApiError`s keep their status; FastAPI's own validation errors become INVALID_ARGUMENT; unknown routes
NOT_FOUND; a full or read-only data directory RESOURCE_EXHAUSTED or FAILED_PRECONDITION naming it; an engine that
cannot run a request (out of context memory, a dead engine thread) UNAVAILABLE; anything
unexpected is logged with its traceback and answered 500 INTERNAL without its text.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gemserve.engine.types import EngineBusy, EngineError
from gemserve.errors import RETRY_AFTER_SECONDS, STATUS_CODES, ApiError, invalid_argument, url_not_found

log = logging.getLogger("gemserve.api")


def error_response(error: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return JSONResponse(error.to_json(), status_code=error.code, headers=headers)


def storage_error(exc: OSError | sqlite3.OperationalError, data_dir: Path) -> ApiError:
    """A full or read-only data directory is the operator's to fix: say so, naming it; anything else is a 500."""
    text = str(exc).lower()
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "disk is full" in text:
        log.error("data directory full", extra={"data_dir": str(data_dir), "error": str(exc)})
        return ApiError("RESOURCE_EXHAUSTED", f"The server's data directory ({data_dir}) is full, so this change "
                        "cannot be stored; reading goes on. Free some space and try again.")
    if getattr(exc, "errno", None) in (errno.EROFS, errno.EACCES, errno.EPERM) or "readonly" in text:
        log.error("data directory not writable", extra={"data_dir": str(data_dir), "error": str(exc)})
        return ApiError("FAILED_PRECONDITION", f"The server's data directory ({data_dir}) is not writable, so this "
                        "change cannot be stored; reading goes on.")
    log.error("storage error", exc_info=exc)
    return ApiError("INTERNAL", "An internal error has occurred.")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header"))
        return error_response(invalid_argument(f"Invalid value at '{field}': {first.get('msg')}", field))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code in (404, 405):
            return error_response(url_not_found())
        status = next((s for s, c in STATUS_CODES.items() if c == exc.status_code), "INVALID_ARGUMENT")
        return error_response(ApiError(status, str(exc.detail)))

    @app.exception_handler(EngineBusy)
    async def _engine_busy(_: Request, exc: EngineBusy) -> JSONResponse:
        return error_response(ApiError("RESOURCE_EXHAUSTED", f"The server is busy: {exc}. Try again later.",
                                       retry_after=RETRY_AFTER_SECONDS))

    @app.exception_handler(EngineError)
    async def _engine_error(_: Request, exc: EngineError) -> JSONResponse:
        log.warning("engine refused a request", extra={"error": str(exc)})
        return error_response(ApiError("UNAVAILABLE", f"The model could not run this request: {exc}"))

    @app.exception_handler(OSError)
    async def _storage_error(_: Request, exc: OSError) -> JSONResponse:
        return error_response(storage_error(exc, app.state.settings.data_dir))

    @app.exception_handler(sqlite3.OperationalError)
    async def _database_error(_: Request, exc: sqlite3.OperationalError) -> JSONResponse:
        return error_response(storage_error(exc, app.state.settings.data_dir))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(ApiError("INTERNAL", "An internal error has occurred."))
