"""The ASGI application: routes, error handlers, request log, and the model registry's lifetime."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gemserve.api import cached_contents, files, models, tuned_models
from gemserve.api.errors import install_error_handlers
from gemserve.api.openapi import openapi_document
from gemserve.config import Settings
from gemserve.identity import Identities, create_secret, unsalted_project_number
from gemserve.media.processor import MediaProcessor
from gemserve.models.registry import ModelRegistry
from gemserve.safety.server import Safety
from gemserve.sandbox.bwrap import Sandbox, SandboxUnavailable
from gemserve.service.cached_contents import CachedContents
from gemserve.service.files import Files
from gemserve.service.tuned_models import TunedModels
from gemserve.service.tuning_worker import WorkerSupervisor
from gemserve.store.cached_contents import CachedContentStore
from gemserve.store.db import Database
from gemserve.store.files import FileStore
from gemserve.store.tuned_models import TunedModelStore

log = logging.getLogger("gemserve.http")


class RequestLog:
    """One log line per request: method, path, status, time. A plain ASGI middleware, because Starlette's
    BaseHTTPMiddleware would hide client disconnects from the routes (and they cancel generations).
    The path only: the query string may carry the API key (`?key=`), and bodies are the user's data."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            log.info("request", extra={"method": scope["method"], "path": scope["path"], "status": status,
                                       "ms": round((time.perf_counter() - started) * 1000, 1)})


SWEEP_SECONDS = 60.0


async def _sweep_every(seconds: float, tuned_models: TunedModels, caches: CachedContents, files: Files) -> None:
    """Job directories of deleted models go once their job has stopped, not only at the next start; expired
    caches go with their computed state, expired files and uploads with their bytes."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await asyncio.to_thread(tuned_models.sweep_deleted)
            await caches.sweep()
            await files.sweep()
        except Exception:
            log.exception("sweeping failed")


async def _check_sandbox(sandbox: Sandbox) -> None:
    """At start-up, so that the first code execution does not wait for it and a missing piece shows in the log."""
    try:
        await sandbox.ready()
    except SandboxUnavailable as exc:
        log.warning("code execution is not available", extra={"reason": str(exc)})


def create_app(settings: Settings, registry: ModelRegistry) -> FastAPI:
    """`registry` may still be empty; it is loaded at start-up and closed at shutdown."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not registry.everything():
            registry.load_all()
        app.state.tuned_models.sweep()
        supervisor = WorkerSupervisor(settings.data_dir)
        if settings.tuning_worker:
            supervisor.start()
        await app.state.files.sweep()
        await app.state.files.resume()
        sweeper = asyncio.create_task(_sweep_every(SWEEP_SECONDS, app.state.tuned_models, app.state.cached_contents,
                                                   app.state.files))
        app.state.safety.start()
        restoring = asyncio.create_task(app.state.cached_contents.restore())
        checking = asyncio.create_task(_check_sandbox(app.state.sandbox))
        served = registry.everything()
        log.info("serving", extra={"models": [m.spec.id for m in served],
                                   "open_mode": settings.open_mode})
        yield
        sweeper.cancel()
        restoring.cancel()
        checking.cancel()
        await app.state.files.close()
        app.state.media.close()
        await supervisor.stop()
        registry.close()

    app = FastAPI(title="gemserve", lifespan=lifespan, docs_url="/docs", redoc_url=None, openapi_url="/openapi.json")
    app.openapi = lambda: openapi_document(app)  # type: ignore[method-assign]
    app.state.settings = settings
    app.state.registry = registry
    database = Database(settings.data_dir / "gemserve.db")
    app.state.tuned_models = TunedModels(TunedModelStore(database), registry.catalog, settings.data_dir,
                                         settings.tuning_seed)
    app.state.cached_contents = CachedContents(CachedContentStore(database), registry, settings.data_dir)
    app.state.sandbox = Sandbox(settings.sandbox_python)
    app.state.safety = Safety(registry, settings.safety_judge, settings.data_dir / "models")
    app.state.media = MediaProcessor(settings.data_dir)
    app.state.files = Files(FileStore(database, settings.data_dir), app.state.media)
    app.state.identities = Identities(create_secret(settings.data_dir))
    # Models shared before project numbers were salted list the old numbers of their readers: the keys this
    # server knows get theirs moved over.
    identities: Identities = app.state.identities
    moved = app.state.tuned_models.renumber_readers(
        {unsalted_project_number(k): identities.project_number(k) for k in settings.api_keys})
    if moved:
        log.info("readers renumbered", extra={"models": moved})
    install_error_handlers(app)
    app.include_router(models.router)
    app.include_router(tuned_models.router)
    app.include_router(cached_contents.router)
    app.include_router(files.router)

    app.add_middleware(RequestLog)

    return app
