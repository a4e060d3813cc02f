"""cachedContents in process, on a scripted model: the resource, ownership and expiry, the prefix pinned in the
engine, and how a request naming a cache is built."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gemserve.errors import ApiError
from gemserve.identity import Caller
from gemserve.models.catalog import Catalog, ModelSpec
from gemserve.models.registry import ModelRegistry
from gemserve.schema.content import GenerateContentRequest
from gemserve.schema.wire import parse_model
from gemserve.service import generation
from gemserve.service.cached_contents import CachedContents
from gemserve.service.requests import base_target, plan_generation, request_prompt
from gemserve.store.cached_contents import CachedContentStore
from gemserve.store.db import Database
from tests.service.scripted import ScriptedEngine, request_body, run

ALICE = Caller("alice", 1)
BOB = Caller("bob", 2)
DOC = "The vault's password is PINEAPPLE. " * 20


async def no_media(request: GenerateContentRequest) -> None:
    """Cache contents here hold text only: nothing to render."""


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[CachedContents, ModelRegistry, ScriptedEngine]]:
    engine = ScriptedEngine("Answer.")
    weights = tmp_path / "scripted.gguf"
    weights.write_bytes(b"")
    specs = {name: ModelSpec(id=name, display_name=name, description="", path=weights, temperature=0.0, top_k=1)
             for name in ("scripted", "other")}
    registry = ModelRegistry(Catalog(models=specs), tmp_path, lambda path, spec: engine)
    registry.load_all()
    caches = CachedContents(CachedContentStore(Database(tmp_path / "gemserve.db")), registry, tmp_path)
    yield caches, registry, engine
    registry.close()


def create(caches: CachedContents, caller: Caller = ALICE, **fields: Any) -> dict[str, Any]:
    body = {"model": "models/scripted", "contents": [{"role": "user", "parts": [{"text": DOC}]}],
            "systemInstruction": {"parts": [{"text": "Answer from the document."}]}, **fields}
    return asyncio.run(caches.create(caller, body, no_media))


def test_create_pins_the_prefix_every_request_naming_the_cache_begins_with(
        setup: tuple[CachedContents, ModelRegistry, ScriptedEngine]) -> None:
    caches, registry, engine = setup
    cache = create(caches, displayName="doc", ttl="300s")
    assert cache["name"].startswith("cachedContents/") and cache["model"] == "models/scripted"
    assert cache["displayName"] == "doc" and set(cache) >= {"createTime", "updateTime", "expireTime"}
    prefix = engine.pinned[cache["name"].removeprefix("cachedContents/")]
    assert cache["usageMetadata"] == {"totalTokenCount": len(prefix)}
    assert DOC.encode() in bytes(t for t in prefix if t < 256)  # the document is in the prefix
    assert engine.prompts[-1] == prefix  # computed once at creation

    model = registry.get("scripted")
    request = parse_model(GenerateContentRequest, {"contents": [{"parts": [{"text": "What is the password?"}]}],
                                                   "cachedContent": cache["name"]}, "GenerateContentRequest")
    merged, cached_tokens = asyncio.run(caches.apply(ALICE, model, request))
    assert cached_tokens == len(prefix)
    assert [c.parts[0].text for c in merged.contents] == [DOC, "What is the password?"]
    assert merged.system_instruction is not None and merged.cached_content is None
    assert request_prompt(model, merged).tokens[: len(prefix)] == list(prefix)

    async def answer() -> dict[str, Any]:
        return await generation.generate(await plan_generation(base_target(model), merged, cached_tokens))

    usage = asyncio.run(answer())["usageMetadata"]
    assert usage["cachedContentTokenCount"] == len(prefix) and usage["promptTokenCount"] > len(prefix)


def test_get_list_patch_delete_and_ownership(setup: tuple[CachedContents, ModelRegistry, ScriptedEngine]) -> None:
    caches, _, engine = setup
    names = [create(caches)["name"] for _ in range(3)]
    create(caches, BOB)
    page = asyncio.run(caches.list(ALICE, 2, None))
    assert [c["name"] for c in page["cachedContents"]] == names[:2]
    rest = asyncio.run(caches.list(ALICE, 2, page["nextPageToken"]))
    assert [c["name"] for c in rest["cachedContents"]] == names[2:] and "nextPageToken" not in rest
    with pytest.raises(ApiError, match="not found") as caught:
        asyncio.run(caches.get(BOB, names[0]))
    assert caught.value.code == 404
    before = asyncio.run(caches.get(ALICE, names[0]))["expireTime"]
    after = asyncio.run(caches.patch(ALICE, names[0], {"ttl": "7200s"}, "ttl"))["expireTime"]
    assert after > before
    with pytest.raises(ApiError, match="only ttl or expire_time"):
        asyncio.run(caches.patch(ALICE, names[0], {"displayName": "x"}, None))
    asyncio.run(caches.delete(ALICE, names[0]))
    assert names[0].removeprefix("cachedContents/") not in engine.pinned
    with pytest.raises(ApiError, match="not found"):
        asyncio.run(caches.get(ALICE, names[0]))


def test_an_expired_cache_is_gone(setup: tuple[CachedContents, ModelRegistry, ScriptedEngine]) -> None:
    caches, registry, engine = setup
    name = create(caches, ttl="1s")["name"]
    asyncio.run(asyncio.sleep(1.1))
    request = parse_model(GenerateContentRequest, {"contents": [{"parts": [{"text": "hi"}]}], "cachedContent": name},
                          "GenerateContentRequest")
    with pytest.raises(ApiError, match=r"CachedContent not found \(or permission denied\)") as caught:
        asyncio.run(caches.apply(ALICE, registry.get("scripted"), request))
    assert caught.value.code == 403
    asyncio.run(caches.sweep())
    assert name.removeprefix("cachedContents/") not in engine.pinned


@pytest.mark.parametrize(("fields", "words"), [
    ({"systemInstruction": {"parts": [{"text": "x"}]}}, "can not be used with GenerateContent request setting"),
    ({"tools": [{"functionDeclarations": [{"name": "f"}]}]}, "can not be used with GenerateContent request setting"),
])
def test_a_request_naming_a_cache_may_not_set_what_the_cache_holds(
        setup: tuple[CachedContents, ModelRegistry, ScriptedEngine], fields: dict[str, Any], words: str) -> None:
    caches, registry, _ = setup
    name = create(caches)["name"]
    request = parse_model(GenerateContentRequest, {"contents": [{"parts": [{"text": "hi"}]}], "cachedContent": name,
                                                   **fields}, "GenerateContentRequest")
    with pytest.raises(ApiError, match=words):
        asyncio.run(caches.apply(ALICE, registry.get("scripted"), request))


def test_a_cache_serves_only_its_own_model(setup: tuple[CachedContents, ModelRegistry, ScriptedEngine]) -> None:
    caches, registry, _ = setup
    name = create(caches)["name"]
    request = parse_model(GenerateContentRequest, {"contents": [{"parts": [{"text": "hi"}]}], "cachedContent": name},
                          "GenerateContentRequest")
    with pytest.raises(ApiError, match=r"\(models/other\) and CachedContent \(models/scripted\) has to be the same"):
        asyncio.run(caches.apply(ALICE, registry.get("other"), request))


@pytest.mark.parametrize(("fields", "words"), [
    ({"model": None}, "model"),
    ({"ttl": "ten minutes"}, "is not a duration"),
    ({"ttl": "0s"}, "must be positive"),
    ({"ttl": "60s", "expireTime": "2099-01-01T00:00:00Z"}, "mutually exclusive"),
    ({"expireTime": "2001-01-01T00:00:00Z"}, "must be in the future"),
    ({"contents": None, "systemInstruction": None}, "needs contents or a system_instruction"),
    ({"model": "models/nope"}, "is not found"),
])
def test_bad_creates_are_client_errors(setup: tuple[CachedContents, ModelRegistry, ScriptedEngine],
                                       fields: dict[str, Any], words: str) -> None:
    caches, _, _ = setup
    body = {"model": "models/scripted", "contents": [{"role": "user", "parts": [{"text": DOC}]}], **fields}
    with pytest.raises(ApiError, match=words) as caught:
        asyncio.run(caches.create(ALICE, {k: v for k, v in body.items() if v is not None}, no_media))
    assert 400 <= caught.value.code < 500


def test_a_cache_larger_than_the_models_budget_is_refused(
        setup: tuple[CachedContents, ModelRegistry, ScriptedEngine]) -> None:
    caches, _, engine = setup
    engine.pin_budget = 50  # type: ignore[attr-defined]
    with pytest.raises(ApiError, match="keeps at most 50 tokens of cached content") as caught:
        create(caches)
    assert caught.value.code == 400 and not engine.pinned


def test_a_prefix_reused_implicitly_is_reported_in_every_streamed_chunk() -> None:
    """Implicit caching: the tokens a kept cache gave the prompt count as cachedContentTokenCount from the first
    chunk on, like a named cache's, not only in the last (it came with the engine's finish before)."""
    chunks, _ = run("Hello there, friend.", request_body(), stream=True, reused=3)
    assert len(chunks) >= 2  # text, then the finish
    assert [chunk["usageMetadata"].get("cachedContentTokenCount") for chunk in chunks] == [3] * len(chunks)
    whole, _ = run("Hello there, friend.", request_body(), reused=3)
    assert whole["usageMetadata"]["cachedContentTokenCount"] == 3
    fresh, _ = run("Hello there, friend.", request_body(), stream=True)
    assert all("cachedContentTokenCount" not in chunk["usageMetadata"] for chunk in fresh)
