"""Embeddings on a real server with the built-in all-MiniLM-L6-v2, through google-genai, google-generativeai
(REST transport) and plain HTTP as in the reference's curl examples."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import httpx
import numpy as np
from google import genai
from google.genai import types

from tests.conftest import Server

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import google.generativeai as legacy

RETRIEVAL = json.loads((Path(__file__).parents[1] / "data" / "retrieval.json").read_text())


def client(server: Server) -> genai.Client:
    return genai.Client(api_key="any", http_options=types.HttpOptions(base_url=server.url))


def vectors(response: types.EmbedContentResponse) -> np.ndarray:
    assert response.embeddings is not None
    return np.array([e.values for e in response.embeddings])


def test_google_genai_embeds_one_text_and_a_list(server: Server) -> None:
    gemini = client(server)
    one = vectors(gemini.models.embed_content(model="text-embedding-004", contents="Hello world"))
    assert one.shape == (1, 384)
    np.testing.assert_allclose(np.linalg.norm(one, axis=1), 1, atol=1e-6)
    config = types.EmbedContentConfig(task_type="SEMANTIC_SIMILARITY", output_dimensionality=128)
    many = vectors(gemini.models.embed_content(
        model="gemini-embedding-001", contents=["A cat sits on the mat.", "A kitten rests on a rug.",
                                                "Interest rates rose again this quarter."], config=config))
    assert many.shape == (3, 128)
    np.testing.assert_allclose(np.linalg.norm(many, axis=1), 1, atol=1e-6)
    assert many[0] @ many[1] > many[0] @ many[2] + 0.3


def test_the_right_passage_ranks_first_for_every_question(server: Server) -> None:
    keys = list(RETRIEVAL["passages"])
    gemini = client(server)  # held: a client that is collected closes its connections
    documents = vectors(gemini.models.embed_content(
        model="text-embedding-004", contents=[RETRIEVAL["passages"][k] for k in keys],
        config=types.EmbedContentConfig(task_type="RETRIEVAL_DOCUMENT")))
    queries = vectors(gemini.models.embed_content(
        model="text-embedding-004", contents=[RETRIEVAL["questions"][k] for k in keys],
        config=types.EmbedContentConfig(task_type="RETRIEVAL_QUERY")))
    ranked = [keys[i] for i in (queries @ documents.T).argmax(axis=1)]
    assert ranked == keys


def test_google_generativeai_embed_content(server: Server) -> None:
    legacy.configure(api_key="any", transport="rest", client_options={"api_endpoint": server.url})
    one = legacy.embed_content(model="models/text-embedding-004", content="Hello world",
                               task_type="retrieval_query")
    assert len(one["embedding"]) == 384
    many = legacy.embed_content(model="models/embedding-001", content=["first", "second"],
                                task_type="retrieval_document", title="Notes", output_dimensionality=32)
    assert [len(v) for v in many["embedding"]] == [32, 32]


def test_plain_http_as_in_the_reference(server: Server) -> None:
    for version in ("v1", "v1beta"):
        answer = httpx.post(f"{server.url}/{version}/models/text-embedding-004:embedContent", timeout=60, json={
            "model": "models/text-embedding-004", "content": {"parts": [{"text": "What is the meaning of life?"}]}})
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["embedding"]["values"]) == 384
    batch = httpx.post(f"{server.url}/v1beta/models/text-embedding-004:batchEmbedContents", timeout=60, json={
        "requests": [{"model": "models/text-embedding-004", "content": {"parts": [{"text": t}]}}
                     for t in ("one", "two", "three")]})
    assert batch.status_code == 200 and len(batch.json()["embeddings"]) == 3
    counted = httpx.post(f"{server.url}/v1beta/models/text-embedding-004:countTokens", timeout=60,
                         json={"contents": [{"parts": [{"text": "Hello world"}]}]})
    assert counted.status_code == 200 and counted.json()["totalTokens"] == 4  # [CLS] hello world [SEP]
    empty = httpx.post(f"{server.url}/v1beta/models/text-embedding-004:embedContent", timeout=60,
                       json={"content": {"parts": [{"text": ""}]}})
    assert empty.status_code == 400 and "contains an empty Part" in empty.json()["error"]["message"]


def test_models_claim_only_the_methods_they_serve(server: Server) -> None:
    listed = httpx.get(f"{server.url}/v1beta/models", timeout=30).json()["models"]
    methods = {m["name"]: m["supportedGenerationMethods"] for m in listed}
    assert "embedContent" in methods["models/all-minilm-l6-v2"]
    assert "generateContent" not in methods["models/all-minilm-l6-v2"]
    assert "embedContent" not in methods["models/gemma-3-270m"]
    got = httpx.get(f"{server.url}/v1beta/models/text-embedding-004", timeout=30).json()
    assert got["name"] == "models/text-embedding-004" and got["inputTokenLimit"] == 256
    wrong = [
        httpx.post(f"{server.url}/v1beta/models/text-embedding-004:generateContent", timeout=30,
                   json={"contents": [{"parts": [{"text": "hi"}]}]}),
        httpx.post(f"{server.url}/v1beta/models/gemma-3-270m:embedContent", timeout=30,
                   json={"content": {"parts": [{"text": "hi"}]}}),
    ]
    for answer in wrong:
        assert answer.status_code == 404 and "is not supported for" in answer.json()["error"]["message"]
