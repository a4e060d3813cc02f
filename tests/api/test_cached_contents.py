"""Context caching on a real server through google-genai: caches.create / get / list / update / delete, and
generate_content with cached_content on the built-in instruct model."""

from __future__ import annotations

import time

import httpx
import pytest
from google import genai
from google.genai import errors, types

from tests.conftest import API_KEY, OTHER_KEY, Server

DOC = " ".join(f"Record {i}: shelf {i} holds {('maps', 'coins', 'letters', 'stamps')[i % 4]}." for i in range(60))
DOC += " The password of the vault is PINEAPPLE-42."


def client(server: Server, key: str = "any") -> genai.Client:
    return genai.Client(api_key=key, http_options=types.HttpOptions(base_url=server.url))


def test_the_caches_api_and_generating_from_a_cache(server: Server) -> None:
    gemini = client(server)
    cache = gemini.caches.create(model="gemini-2.5-flash", config=types.CreateCachedContentConfig(
        contents=[types.Content(role="user", parts=[types.Part(text=DOC)])], display_name="vault records",
        system_instruction="Answer questions about the records briefly.", ttl="300s"))
    assert cache.name and cache.name.startswith("cachedContents/")
    assert cache.model == "models/qwen2.5-coder-0.5b-instruct" and cache.display_name == "vault records"
    assert cache.usage_metadata is not None and (cache.usage_metadata.total_token_count or 0) > 500

    assert gemini.caches.get(name=cache.name).expire_time == cache.expire_time
    assert cache.name in [c.name for c in gemini.caches.list()]
    updated = gemini.caches.update(name=cache.name, config=types.UpdateCachedContentConfig(ttl="7200s"))
    assert updated.expire_time and cache.expire_time and updated.expire_time > cache.expire_time

    config = types.GenerateContentConfig(cached_content=cache.name, temperature=0, max_output_tokens=24)
    started = time.monotonic()
    answer = gemini.models.generate_content(model="gemini-2.5-flash", contents="What is the password of the vault?",
                                            config=config)
    assert "PINEAPPLE" in (answer.text or ""), answer.text
    assert answer.usage_metadata is not None
    assert answer.usage_metadata.cached_content_token_count == cache.usage_metadata.total_token_count
    assert (answer.usage_metadata.prompt_token_count or 0) > cache.usage_metadata.total_token_count
    streamed = "".join(c.text or "" for c in gemini.models.generate_content_stream(
        model="gemini-2.5-flash", contents="What is the password of the vault?", config=config))
    assert "PINEAPPLE" in streamed
    assert time.monotonic() - started < 120  # two answers from the computed prefix, not two prefills

    with pytest.raises(errors.ClientError) as caught:
        gemini.models.generate_content(model="gemini-2.5-flash", contents="x", config=types.GenerateContentConfig(
            cached_content=cache.name, system_instruction="Be brief."))
    assert caught.value.code == 400 and "can not be used with GenerateContent" in str(caught.value)

    gemini.caches.delete(name=cache.name)
    with pytest.raises(errors.ClientError) as caught:
        gemini.caches.get(name=cache.name)
    assert caught.value.code == 404


def test_an_expired_cache_is_refused(server: Server) -> None:
    gemini = client(server)
    cache = gemini.caches.create(model="gemini-2.5-flash", config=types.CreateCachedContentConfig(
        contents=[types.Content(role="user", parts=[types.Part(text="A short note about owls.")])], ttl="1s"))
    time.sleep(1.5)
    with pytest.raises(errors.ClientError) as caught:
        gemini.models.generate_content(model="gemini-2.5-flash", contents="What is the note about?",
                                       config=types.GenerateContentConfig(cached_content=cache.name))
    assert caught.value.code == 403 and "CachedContent not found" in str(caught.value)


def test_a_cache_belongs_to_the_key_that_made_it(keyed_server: Server) -> None:
    body = {"model": "models/qwen2.5-coder-0.5b-instruct",
            "contents": [{"role": "user", "parts": [{"text": "A short note about owls."}]}]}
    made = httpx.post(f"{keyed_server.url}/v1beta/cachedContents", json=body, timeout=300,
                      headers={"x-goog-api-key": API_KEY})
    assert made.status_code == 200, made.text
    name = made.json()["name"]
    other = httpx.get(f"{keyed_server.url}/v1beta/{name}", headers={"x-goog-api-key": OTHER_KEY}, timeout=30)
    assert other.status_code == 404
    listed = httpx.get(f"{keyed_server.url}/v1beta/cachedContents", headers={"x-goog-api-key": OTHER_KEY}, timeout=30)
    assert name not in [c["name"] for c in listed.json().get("cachedContents", [])]
    own = httpx.get(f"{keyed_server.url}/v1beta/{name}", headers={"x-goog-api-key": API_KEY}, timeout=30)
    assert own.status_code == 200 and own.json()["name"] == name
