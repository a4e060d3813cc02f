"""Routes under `/{v1,v1beta}/models`: list, get, generateContent, streamGenerateContent, countTokens, and
embedContent and batchEmbedContents on embedding models."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gemserve.api.deps import CallerDep
from gemserve.api.streaming import read_json, streaming_response, until_disconnect
from gemserve.errors import invalid_argument, url_not_found
from gemserve.identity import Caller
from gemserve.models.registry import ModelRegistry, ServedEmbedder, ServedModel
from gemserve.safety.policy import safety_policy
from gemserve.schema.content import CountTokensRequest, GenerateContentRequest
from gemserve.schema.responses import CountTokensResponse, ModalityTokenCount
from gemserve.schema.wire import parse_model
from gemserve.service import embeddings, generation
from gemserve.service.cached_contents import CachedContents
from gemserve.service.media import attach_media
from gemserve.service.paging import page_offset, page_token
from gemserve.service.requests import Target, base_target, plan_generation, request_prompt
from gemserve.service.safety import Guard, prompt_turns

router = APIRouter()

API_VERSIONS = ("v1", "v1beta")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
GENERATION_METHODS = ["generateContent", "streamGenerateContent", "countTokens"]
EMBEDDING_METHODS = ["embedContent", "batchEmbedContents", "countTokens"]
MODEL_METHODS = [*GENERATION_METHODS, "embedContent", "batchEmbedContents"]
# Google's Model resource has no field for the inputs a model takes: its description says it.
MEDIA_INPUTS = ("Inputs: text; PDFs, images, audio, video and text files reach it as text renderings (their "
                "text, OCR, image labels, transcripts with times; see docs/media.md).")


def registry_of(request: Request) -> ModelRegistry:
    registry: ModelRegistry = request.app.state.registry
    return registry


def check_version(version: str) -> None:
    if version not in API_VERSIONS:
        raise url_not_found()


def split_call(version: str, name_and_method: str, methods: Sequence[str]) -> tuple[str, str]:
    """`name:method` of a custom-method URL, checked (an unknown version or method is a 404, as Google's)."""
    check_version(version)
    name, _, method = name_and_method.partition(":")
    if method not in methods:
        raise url_not_found()
    return name, method


def model_resource(model: ServedModel | ServedEmbedder, name: str | None = None) -> dict[str, Any]:
    spec = model.spec
    resource: dict[str, Any] = {
        "name": f"models/{name or spec.id}",
        "baseModelId": spec.id,
        "version": spec.version,
        "displayName": spec.display_name,
        "description": spec.description,
    }
    if isinstance(model, ServedEmbedder):
        return {**resource, "inputTokenLimit": model.engine.layout.max_tokens, "outputTokenLimit": 1,
                "supportedGenerationMethods": EMBEDDING_METHODS}
    resource["description"] = f"{spec.description} {MEDIA_INPUTS}".strip()
    return {
        **resource,
        "inputTokenLimit": model.input_token_limit,
        "outputTokenLimit": model.output_token_limit,
        "supportedGenerationMethods": GENERATION_METHODS,
        "temperature": spec.temperature,
        "maxTemperature": spec.max_temperature,
        "topP": spec.top_p,
        "topK": spec.top_k,
    }


@router.get("/{version}/models")
async def list_models(version: str, request: Request, _: CallerDep,
                      pageSize: int | None = None, pageToken: str | None = None) -> dict[str, Any]:  # noqa: N803
    check_version(version)
    size = pageSize or DEFAULT_PAGE_SIZE
    if size < 0:
        raise invalid_argument("page_size must not be negative.", "page_size")
    size = min(size, MAX_PAGE_SIZE)
    start = page_offset(pageToken, "models") if pageToken else 0
    registry = registry_of(request)
    models = [model_resource(m) for m in registry.everything()]
    page: dict[str, Any] = {"models": models[start : start + size]}
    if start + size < len(models):
        page["nextPageToken"] = page_token("models", start + size)
    return page


@router.get("/{version}/models/{name}")
async def get_model(version: str, name: str, request: Request, _: CallerDep) -> dict[str, Any]:
    check_version(version)
    if ":" in name:
        raise url_not_found()
    model = registry_of(request).get_any(name, version)
    return model_resource(model, name.removeprefix("models/"))


@router.post("/{version}/models/{name_and_method}")
async def call_model(version: str, name_and_method: str, request: Request, caller: CallerDep) -> Response:
    name, method = split_call(version, name_and_method, MODEL_METHODS)
    registry = registry_of(request)
    spec = registry.catalog.resolve(name)
    if method in ("embedContent", "batchEmbedContents") or (method == "countTokens" and spec and spec.kind == "embed"):
        embedder = registry.get_embedder(name, method, version)
        body = await read_json(request)
        if method == "embedContent":
            return JSONResponse(await embeddings.embed_content(embedder, body))
        if method == "batchEmbedContents":
            return JSONResponse(await embeddings.batch_embed_contents(embedder, registry.catalog, body))
        return JSONResponse(await embeddings.count_tokens(embedder, body))
    model = registry.get(name, method, version)
    body = await read_json(request)
    caches: CachedContents = request.app.state.cached_contents
    if method == "countTokens":
        inner = await asyncio.to_thread(count_tokens_request, body)
        inner, cached_tokens = await caches.apply(caller, model, inner)
        await attach(request, caller, inner)
        return JSONResponse(await asyncio.to_thread(count_tokens, model, inner, cached_tokens))
    parsed: GenerateContentRequest = await asyncio.to_thread(parse_model, GenerateContentRequest, body,
                                                             "GenerateContentRequest")
    parsed, cached_tokens = await caches.apply(caller, model, parsed)
    await attach(request, caller, parsed)
    target = replace(base_target(model), scope=caller.owner)
    return await generate_response(request, method, target, parsed, cached_tokens)


async def generate_response(request: Request, method: str, target: Target, parsed: GenerateContentRequest,
                            cached_tokens: int = 0) -> Response:
    """generateContent or streamGenerateContent (`alt=sse` or a JSON array) for a base or tuned model."""
    plan = await plan_generation(target, parsed, cached_tokens, request.app.state.sandbox)
    policy = safety_policy(parsed.safety_settings)
    if policy is not None:  # rated: the prompt now (before a stream starts), candidates as they are written
        guard = Guard(request.app.state.safety.classifier(), policy, prompt_turns(parsed))
        await until_disconnect(request, guard.rate_prompt())  # a long prompt's rating stops if the client leaves
        plan = replace(plan, safety=guard)
    if method == "streamGenerateContent":
        sse = request.query_params.get("alt") == "sse"
        return streaming_response(generation.stream(plan), sse)
    return JSONResponse(await until_disconnect(request, generation.generate(plan)))


async def attach(request: Request, caller: Caller, parsed: GenerateContentRequest) -> None:
    """The renderings of the request's media parts (inline, or files of this server)."""
    await attach_media(parsed, caller, request.app.state.files, request.app.state.media,
                       request.headers.get("host", ""))


def count_tokens_request(body: Any) -> GenerateContentRequest:
    """The generateContent request a countTokens body stands for."""
    parsed: CountTokensRequest = parse_model(CountTokensRequest, body, "CountTokensRequest")
    if parsed.contents and parsed.generate_content_request is not None:
        raise invalid_argument("contents and generate_content_request are mutually exclusive.", "contents")
    if parsed.generate_content_request is not None:
        return parsed.generate_content_request
    if parsed.contents:
        return GenerateContentRequest(contents=parsed.contents)
    raise invalid_argument("* CountTokensRequest: contents or generate_content_request must be set.", "contents")


def count_tokens(model: ServedModel, inner: GenerateContentRequest, cached_tokens: int = 0) -> dict[str, Any]:
    """Tokens of the prompt exactly as generateContent would build it (chat format and cached content included)."""
    built = request_prompt(model, inner)
    total = len(built.tokens)
    details = [ModalityTokenCount(modality=m, token_count=n) for m, n in built.details]
    return CountTokensResponse(total_tokens=total, cached_content_token_count=cached_tokens or None,
                               prompt_tokens_details=details).to_wire()
