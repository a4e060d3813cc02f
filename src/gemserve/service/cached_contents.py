"""cachedContents: a prompt prefix (contents, system instruction, tools) stored once and used by many requests.

A cache belongs to the key that created it (others get 404) and to one base model. Its record keeps what the
request gave, as on the wire. Its computed state lives in the model's engine: at creation the prefix is
computed and pinned (`Engine.pin`), so that a request naming the cache starts from a copy of it instead of
processing those tokens again; after a restart each cache is computed once more in the background.

The prefix is found without knowing the chat format: the cache's contents followed by two different user turns
render to two prompts, and their common beginning is what every request naming the cache shares.

A request naming a cache gets the cache's contents before its own, and the cache's system instruction, tools
and tool config; it may not set those itself (400, as at Google). `usageMetadata.cachedContentTokenCount`
reports the prefix's tokens, and `promptTokenCount` includes them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gemserve.engine.types import GenerationRequest, SamplingParams
from gemserve.errors import ApiError, invalid_argument
from gemserve.identity import Caller
from gemserve.models.registry import ModelRegistry, ServedModel
from gemserve.schema.content import Content, GenerateContentRequest, Tool, ToolConfig
from gemserve.schema.wire import OneOrMany, WireModel, parse_model, snake
from gemserve.service import paging
from gemserve.service.media import renderings_of, restore_renderings
from gemserve.service.requests import request_prompt
from gemserve.store.cached_contents import CachedContentRecord, CachedContentStore
from gemserve.timestamps import parse_rfc3339, rfc3339

log = logging.getLogger("gemserve.caching")

DEFAULT_TTL = timedelta(hours=1)
MAX_TTL = timedelta(days=366)
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_DISPLAY_NAME = 128
RENDERINGS = "mediaRenderings"  # kept beside the contents: [content index, part index, rendering]
Attach = Callable[[GenerateContentRequest], Awaitable[None]]
_DURATION = re.compile(r"(\d{1,12})(\.\d{1,9})?s")


class CachedContentIn(WireModel):
    name: str | None = None
    model: str | None = None
    display_name: str | None = None
    contents: OneOrMany[Content] | None = None
    system_instruction: Content | None = None
    tools: OneOrMany[Tool] | None = None
    tool_config: ToolConfig | None = None
    ttl: str | None = None
    expire_time: str | None = None
    create_time: str | None = None
    update_time: str | None = None
    usage_metadata: dict[str, Any] | None = None


def _expiry(body: CachedContentIn, now: datetime, default: timedelta | None) -> datetime | None:
    """The expiry a body asks for (`ttl` or `expireTime`, not both), or `now + default`."""
    if body.ttl is not None and body.expire_time is not None:
        raise invalid_argument("ttl and expire_time are mutually exclusive.", "ttl")
    if body.ttl is not None:
        match = _DURATION.fullmatch(body.ttl.strip())
        if not match:
            raise invalid_argument(f"ttl: {body.ttl!r} is not a duration such as \"3600s\".", "ttl")
        ttl = timedelta(seconds=int(match.group(1)) + float(match.group(2) or 0))
        if not timedelta(0) < ttl <= MAX_TTL:
            raise invalid_argument(f"ttl: must be positive and at most {MAX_TTL.days} days.", "ttl")
        return now + ttl
    if body.expire_time is not None:
        try:
            moment = parse_rfc3339(body.expire_time)
        except ValueError:
            raise invalid_argument(f"expire_time: {body.expire_time!r} is not an RFC 3339 timestamp.",
                                   "expire_time") from None
        if not now < moment <= now + MAX_TTL:
            raise invalid_argument("expire_time: must be in the future, and within a year.", "expire_time")
        return moment
    return now + default if default is not None else None


def _expired(record: CachedContentRecord, now: datetime) -> bool:
    return parse_rfc3339(record.expire_time) <= now


class CachedContents:
    def __init__(self, store: CachedContentStore, registry: ModelRegistry, data_dir: Path) -> None:
        self._store = store
        self._registry = registry
        self._states = data_dir / "caches"  # computed states, so that a restart does not compute them again

    def _state_file(self, cache_id: str) -> Path:
        return self._states / f"{cache_id}.kvstate"

    # ---- the resource -------------------------------------------------------------------------------------

    async def create(self, caller: Caller, body: Any, attach: Attach) -> dict[str, Any]:
        """`attach` sets the renderings of the contents' media parts; they are kept with the cache, so a file
        that expires before the cache does not take the cache's meaning with it."""
        parsed: CachedContentIn = await asyncio.to_thread(parse_model, CachedContentIn, body, "CachedContent")
        if not parsed.model:
            raise invalid_argument("model: the model the cache is for is required.", "model")
        model = self._registry.get(parsed.model, "createCachedContent")
        if not parsed.contents and parsed.system_instruction is None:
            raise invalid_argument("contents: a cached content needs contents or a system_instruction.",
                                   "contents")
        display_name = parsed.display_name or ""
        if len(display_name) > MAX_DISPLAY_NAME:
            raise invalid_argument(f"display_name: must be at most {MAX_DISPLAY_NAME} characters.", "display_name")
        now = datetime.now(UTC)
        expires = _expiry(parsed, now, DEFAULT_TTL)
        assert expires is not None
        content = parsed.model_dump(by_alias=True, exclude_none=True, mode="json",
                                    include={"contents", "system_instruction", "tools", "tool_config"})
        if parsed.contents:
            media = GenerateContentRequest(contents=parsed.contents)
            await attach(media)
            if renderings := renderings_of(media):
                content[RENDERINGS] = renderings
        prefix = await asyncio.to_thread(self._prefix, model, content)
        budget = getattr(model.engine, "pin_budget", None)
        if budget is not None and len(prefix) > budget:
            raise ApiError("INVALID_ARGUMENT", f"This cached content has {len(prefix)} tokens; models/"
                           f"{model.spec.id} keeps at most {budget} tokens of cached content (the server's "
                           "--cache-tokens).")
        record = CachedContentRecord(
            id=secrets.token_hex(8), owner=caller.owner, model=model.spec.id, content=content,
            token_count=len(prefix), create_time=rfc3339(now), update_time=rfc3339(now),
            expire_time=rfc3339(expires), display_name=display_name)
        await asyncio.to_thread(self._store.insert, record)
        try:
            await asyncio.to_thread(self._states.mkdir, parents=True, exist_ok=True)
            model.engine.pin(record.id, prefix, saved=self._state_file(record.id), scope=caller.owner)
            await _compute(model, prefix, caller.owner)
        except BaseException:  # no cache the client was not told about
            await asyncio.shield(asyncio.to_thread(self._store.delete, record.id))
            await asyncio.to_thread(self._unpin, record)
            raise
        log.info("cached content created", extra={"cache": record.id, "model": model.spec.id,
                                                   "tokens": len(prefix)})
        return self.resource(record)

    async def get(self, caller: Caller, name: str) -> dict[str, Any]:
        return self.resource(await self._owned(caller, name))

    async def list(self, caller: Caller, page_size: int | None, page_token: str | None) -> dict[str, Any]:
        size = page_size or DEFAULT_PAGE_SIZE
        if size < 0:
            raise invalid_argument("page_size must not be negative.", "page_size")
        size = min(size, MAX_PAGE_SIZE)
        start = paging.page_offset(page_token, "caches") if page_token else 0
        now = datetime.now(UTC)
        records = [r for r in await asyncio.to_thread(self._store.owned_by, caller.owner) if not _expired(r, now)]
        page: dict[str, Any] = {"cachedContents": [self.resource(r) for r in records[start : start + size]]}
        if start + size < len(records):
            page["nextPageToken"] = paging.page_token("caches", start + size)
        return page

    async def patch(self, caller: Caller, name: str, body: Any, update_mask: str | None) -> dict[str, Any]:
        record = await self._owned(caller, name)
        parsed: CachedContentIn = await asyncio.to_thread(parse_model, CachedContentIn, body, "CachedContent")
        given = {k for k, v in parsed.model_dump(exclude_none=True).items() if k not in ("name", "model")}
        # With a mask, fields outside it are ignored (a client may send the whole resource back), as at Google.
        fields = {snake(f.strip()) for f in update_mask.split(",") if f.strip()} if update_mask else given
        if not fields or not fields <= {"ttl", "expire_time"}:
            raise invalid_argument("update_mask: only ttl or expire_time can be updated.", "update_mask")
        now = datetime.now(UTC)
        expires = _expiry(parsed.model_copy(update={k: None for k in ("ttl", "expire_time") if k not in fields}),
                          now, None)
        if expires is None:
            raise invalid_argument("ttl: a new ttl or expire_time is required.", "ttl")
        record.expire_time, record.update_time = rfc3339(expires), rfc3339(now)
        await asyncio.to_thread(self._store.set_expiry, record.id, record.expire_time, record.update_time)
        return self.resource(record)

    async def delete(self, caller: Caller, name: str) -> None:
        record = await self._owned(caller, name)
        await asyncio.to_thread(self._store.delete, record.id)
        self._unpin(record)

    def resource(self, record: CachedContentRecord) -> dict[str, Any]:
        out: dict[str, Any] = {"name": f"cachedContents/{record.id}", "model": f"models/{record.model}"}
        if record.display_name:
            out["displayName"] = record.display_name
        out.update(createTime=record.create_time, updateTime=record.update_time, expireTime=record.expire_time,
                   usageMetadata={"totalTokenCount": record.token_count})
        return out

    # ---- use in generateContent and countTokens -------------------------------------------------------------

    async def apply(self, caller: Caller, model: ServedModel,
                    request: GenerateContentRequest) -> tuple[GenerateContentRequest, int]:
        """The request with its cache's contents first (and the cache's prefix length), or as it is."""
        if not request.cached_content:
            return request, 0
        record = await self._usable(caller, request.cached_content)
        if record.model != model.spec.id:
            raise invalid_argument(f"Model used by GenerateContent request (models/{model.spec.id}) and "
                                   f"CachedContent (models/{record.model}) has to be the same.", "model")
        if request.system_instruction is not None or request.tools or request.tool_config is not None:
            raise invalid_argument("CachedContent can not be used with GenerateContent request setting "
                                   "system_instruction, tools or tool_config. Proposed fix: move those values to "
                                   "CachedContent from GenerateContent request.", "cached_content")
        cached = await asyncio.to_thread(_parse_cached, record.content)
        merged = request.model_copy(update={
            "contents": [*cached.contents, *request.contents], "system_instruction": cached.system_instruction,
            "tools": cached.tools, "tool_config": cached.tool_config, "cached_content": None})
        return merged, record.token_count

    # ---- lifetime -----------------------------------------------------------------------------------------

    async def restore(self) -> None:
        """After a start: pin every live cache again. Saved states are read back when first needed; a cache
        without one (the engine could not save it) is computed again, one after another in the background."""
        await self.sweep()
        records = await asyncio.to_thread(self._store.all)
        await asyncio.to_thread(self._remove_stray_states, {r.id for r in records})
        for record in records:
            try:
                model = self._registry.get(record.model)
                prefix = await asyncio.to_thread(self._prefix, model, record.content)
            except ApiError:
                continue  # its model is no longer served; it expires in time
            saved = self._state_file(record.id)
            model.engine.pin(record.id, prefix, saved=saved, scope=record.owner)
            if not await asyncio.to_thread(saved.is_file):
                try:
                    await _compute(model, prefix, record.owner)
                except Exception:  # the first request naming it computes it instead
                    log.exception("computing a cached content again failed", extra={"cache": record.id})

    async def sweep(self) -> None:
        """Forget expired caches, records and computed state alike."""
        now = datetime.now(UTC)
        for record in await asyncio.to_thread(self._store.all):
            if _expired(record, now):
                await asyncio.to_thread(self._store.delete, record.id)
                self._unpin(record)

    # ---- helpers ------------------------------------------------------------------------------------------

    def _remove_stray_states(self, live: set[str]) -> None:
        """Saved states of caches deleted while the engine was writing them, and half-written ones."""
        for path in self._states.glob("*") if self._states.is_dir() else []:
            if path.suffix == ".partial" or path.stem not in live:
                path.unlink(missing_ok=True)

    def _unpin(self, record: CachedContentRecord) -> None:
        served = {m.spec.id: m for m in self._registry.served()}
        if record.model in served:
            served[record.model].engine.unpin(record.id)
        self._state_file(record.id).unlink(missing_ok=True)

    @staticmethod
    def _prefix(model: ServedModel, content: dict[str, Any]) -> tuple[int, ...]:
        """The tokens every request naming this cache begins with (see the module docstring)."""
        prompts = []
        for probe in ("A", "B"):
            body = {**content, "contents": [*content.get("contents", []), {"role": "user", "parts": [{"text": probe}]}]}
            request = _parse_cached(body)
            prompts.append(request_prompt(model, request).tokens)
        n = 0
        while n < min(map(len, prompts)) and prompts[0][n] == prompts[1][n]:
            n += 1
        return tuple(prompts[0][:n])

    async def _owned(self, caller: Caller, name: str) -> CachedContentRecord:
        cache_id = name.removeprefix("cachedContents/")
        record = await asyncio.to_thread(self._store.get, cache_id)
        if record is None or record.owner != caller.owner or _expired(record, datetime.now(UTC)):
            raise ApiError("NOT_FOUND", f"cachedContents/{cache_id} not found.")
        return record

    async def _usable(self, caller: Caller, name: str) -> CachedContentRecord:
        try:
            return await self._owned(caller, name)
        except ApiError:
            raise ApiError("PERMISSION_DENIED", "CachedContent not found (or permission denied)") from None


def _parse_cached(content: dict[str, Any]) -> GenerateContentRequest:
    """A cache's stored content as a request, its media parts' renderings set again."""
    body = {k: v for k, v in content.items() if k != RENDERINGS}
    request: GenerateContentRequest = parse_model(GenerateContentRequest, body, "CachedContent")
    restore_renderings(request, content.get(RENDERINGS, []))
    return request


async def _compute(model: ServedModel, prefix: tuple[int, ...], scope: str) -> None:
    """Run the prefix through the engine (one token generated), which pins its state as the sequence ends."""
    if not prefix:
        return
    request = GenerationRequest(prompt=prefix, sampling=SamplingParams(temperature=0.0), max_new_tokens=1,
                                scope=scope)
    async for _ in model.engine.generate(request):
        pass
