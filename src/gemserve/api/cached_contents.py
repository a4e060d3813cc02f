"""Routes under `/{v1,v1beta}/cachedContents`: create, get, list, patch (ttl or expireTime), delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from gemserve.api.deps import CallerDep
from gemserve.api.models import attach, check_version
from gemserve.api.streaming import read_json
from gemserve.errors import url_not_found
from gemserve.schema.content import GenerateContentRequest
from gemserve.service.cached_contents import CachedContents

router = APIRouter()


def caches_of(request: Request) -> CachedContents:
    service: CachedContents = request.app.state.cached_contents
    return service


@router.post("/{version}/cachedContents")
async def create_cached_content(version: str, request: Request, caller: CallerDep) -> dict[str, Any]:
    check_version(version)
    body = await read_json(request)

    async def attach_to(parsed: GenerateContentRequest) -> None:
        await attach(request, caller, parsed)

    return await caches_of(request).create(caller, body, attach_to)


@router.get("/{version}/cachedContents")
async def list_cached_contents(version: str, request: Request, caller: CallerDep, pageSize: int | None = None,  # noqa: N803
                               pageToken: str | None = None) -> dict[str, Any]:  # noqa: N803
    check_version(version)
    return await caches_of(request).list(caller, pageSize, pageToken)


@router.get("/{version}/cachedContents/{cache_id}")
async def get_cached_content(version: str, cache_id: str, request: Request, caller: CallerDep) -> dict[str, Any]:
    check_version(version)
    if ":" in cache_id:
        raise url_not_found()
    return await caches_of(request).get(caller, cache_id)


@router.patch("/{version}/cachedContents/{cache_id}")
async def patch_cached_content(version: str, cache_id: str, request: Request, caller: CallerDep,
                               updateMask: str | None = None) -> dict[str, Any]:  # noqa: N803
    check_version(version)
    return await caches_of(request).patch(caller, cache_id, await read_json(request), updateMask)


@router.delete("/{version}/cachedContents/{cache_id}")
async def delete_cached_content(version: str, cache_id: str, request: Request, caller: CallerDep) -> dict[str, Any]:
    check_version(version)
    await caches_of(request).delete(caller, cache_id)
    return {}
