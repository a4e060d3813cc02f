"""The ASGI application: routes, error handlers, request log, and the model registry's lifetime."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from gemserve.api import models
from gemserve.api.errors import install_error_handlers
from gemserve.config import Settings
from gemserve.models.registry import ModelRegistry

log = logging.getLogger("gemserve.http")


def create_app(settings: Settings, registry: ModelRegistry) -> FastAPI:
    """`registry` may still be empty; it is loaded at start-up and closed at shutdown."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not registry.served():
            registry.load_all()
        log.info("serving", extra={"models": [m.spec.id for m in registry.served()],
                                   "open_mode": settings.open_mode})
        yield
        registry.close()

    app = FastAPI(title="gemserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.registry = registry
    install_error_handlers(app)
    app.include_router(models.router)

    @app.middleware("http")
    async def request_log(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        # The path only: the query string may carry the API key (`?key=`), and bodies are the user's data.
        started = time.perf_counter()
        response = await call_next(request)
        log.info("request", extra={"method": request.method, "path": request.url.path,
                                   "status": response.status_code,
                                   "ms": round((time.perf_counter() - started) * 1000, 1)})
        return response

    return app
