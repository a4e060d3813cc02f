"""Routes under `/{v1,v1beta}/tunedModels`: create, get, list, patch, delete, generate, and their operations."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gemserve.api.deps import CallerDep
from gemserve.api.models import attach, check_version, generate_response, registry_of, split_call
from gemserve.api.streaming import read_json
from gemserve.errors import ApiError, url_not_found
from gemserve.schema.content import GenerateContentRequest
from gemserve.schema.tuning import TunedModelIn
from gemserve.schema.wire import camelize, parse_model
from gemserve.service.requests import tuned_target
from gemserve.service.tuned_models import TunedModels

router = APIRouter()

GENERATION_METHODS = ("generateContent", "streamGenerateContent")


def tuned_models_of(request: Request) -> TunedModels:
    service: TunedModels = request.app.state.tuned_models
    return service


@router.post("/{version}/tunedModels")
async def create_tuned_model(version: str, request: Request, caller: CallerDep,
                             tunedModelId: str | None = None) -> dict[str, Any]:  # noqa: N803
    check_version(version)
    body = await asyncio.to_thread(parse_model, TunedModelIn, await read_json(request), "TunedModel")
    return await asyncio.to_thread(tuned_models_of(request).create, caller, body, tunedModelId)


@router.get("/{version}/tunedModels")
async def list_tuned_models(version: str, request: Request, caller: CallerDep, pageSize: int | None = None,  # noqa: N803
                            pageToken: str | None = None, filter: str | None = None) -> dict[str, Any]:  # noqa: A002, N803
    check_version(version)
    return await asyncio.to_thread(tuned_models_of(request).list, caller, pageSize, pageToken, filter)


@router.get("/{version}/tunedModels/{model_id}")
async def get_tuned_model(version: str, model_id: str, request: Request, caller: CallerDep) -> dict[str, Any]:
    check_version(version)
    if ":" in model_id:
        raise url_not_found()
    return await asyncio.to_thread(tuned_models_of(request).get, caller, model_id)


@router.patch("/{version}/tunedModels/{model_id}")
async def patch_tuned_model(version: str, model_id: str, request: Request, caller: CallerDep,
                            updateMask: str | None = None) -> dict[str, Any]:  # noqa: N803
    check_version(version)
    raw = await read_json(request)
    parsed = await asyncio.to_thread(parse_model, TunedModelIn, raw, "TunedModel")
    present = set(camelize(raw)) if isinstance(raw, dict) else set()
    return await asyncio.to_thread(tuned_models_of(request).patch, caller, model_id, parsed, present, updateMask)


@router.delete("/{version}/tunedModels/{model_id}")
async def delete_tuned_model(version: str, model_id: str, request: Request, caller: CallerDep) -> dict[str, Any]:
    check_version(version)
    served = await asyncio.to_thread(tuned_models_of(request).delete, caller, model_id)
    if served is not None:
        base_model, adapter = served
        with contextlib.suppress(ApiError):  # a base model no longer served has nothing to free
            registry_of(request).get(base_model).engine.forget_adapter(str(adapter))
    return {}


@router.post("/{version}/tunedModels/{name_and_method}")
async def call_tuned_model(version: str, name_and_method: str, request: Request, caller: CallerDep) -> Response:
    name, method = split_call(version, name_and_method, GENERATION_METHODS)
    body = await read_json(request)
    tuned = await asyncio.to_thread(tuned_models_of(request).usable, caller, name)
    model = registry_of(request).get(tuned.base_model, method, version)
    target = tuned_target(model, tuned, caller.owner)
    parsed = await asyncio.to_thread(parse_model, GenerateContentRequest, body, "GenerateContentRequest")
    await attach(request, caller, parsed)
    return await generate_response(request, method, target, parsed)


@router.get("/{version}/tunedModels/{model_id}/operations")
async def list_operations(version: str, model_id: str, request: Request, caller: CallerDep) -> dict[str, Any]:
    check_version(version)
    return await asyncio.to_thread(tuned_models_of(request).list_operations, caller, model_id)


@router.get("/{version}/tunedModels/{model_id}/operations/{operation_id}")
async def get_operation(version: str, model_id: str, operation_id: str, request: Request,
                        caller: CallerDep) -> dict[str, Any]:
    check_version(version)
    return await asyncio.to_thread(tuned_models_of(request).get_operation, caller, model_id, operation_id)


@router.post("/{version}/tunedModels/{model_id}/operations/{operation_and_method}")
async def cancel_operation(version: str, model_id: str, operation_and_method: str, request: Request,
                           caller: CallerDep) -> dict[str, Any]:
    operation_id, _ = split_call(version, operation_and_method, ["cancel"])
    await asyncio.to_thread(tuned_models_of(request).cancel_operation, caller, model_id, operation_id)
    return {}
