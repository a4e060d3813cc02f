"""embedContent, batchEmbedContents and countTokens in process, on a tiny BERT built in the test."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from gemserve.engine.embedding import EmbeddingEngine
from gemserve.errors import ApiError
from gemserve.models.catalog import Catalog, ModelSpec
from gemserve.models.registry import ServedEmbedder
from gemserve.service.embeddings import batch_embed_contents, count_tokens, embed_content
from tests.engine.tiny_encoder import make_encoder_dir

SPEC = ModelSpec(id="tiny-embed", display_name="tiny", description="tiny", path=None, kind="embed")
OTHER = ModelSpec(id="tiny-gen", display_name="gen", description="gen", path=None)
CATALOG = Catalog(models={SPEC.id: SPEC, OTHER.id: OTHER}, aliases={"text-embedding-004": SPEC.id})


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedEmbedder]:
    engine = EmbeddingEngine(make_encoder_dir(tmp_path_factory.mktemp("encoder")))
    yield ServedEmbedder(SPEC, engine)
    engine.close()


def text(value: str) -> dict[str, Any]:
    return {"parts": [{"text": value}]}


def one(embedder: ServedEmbedder, body: dict[str, Any]) -> np.ndarray:
    return np.array(asyncio.run(embed_content(embedder, body))["embedding"]["values"])


def batch(embedder: ServedEmbedder, requests: list[dict[str, Any]]) -> list[np.ndarray]:
    answer = asyncio.run(batch_embed_contents(embedder, CATALOG, {"requests": requests}))
    return [np.array(e["values"]) for e in answer["embeddings"]]


def direct(embedder: ServedEmbedder, value: str) -> np.ndarray:
    return embedder.engine.loaded().encode([value])[0]


def test_embed_content_is_the_models_unit_vector(embedder: ServedEmbedder) -> None:
    got = one(embedder, {"content": text("the cat sat on the mat"), "taskType": "SEMANTIC_SIMILARITY"})
    assert got.shape == (32,)
    np.testing.assert_allclose(got, direct(embedder, "the cat sat on the mat"), atol=1e-7)


def test_text_parts_are_joined_and_a_documents_title_goes_first(embedder: ServedEmbedder) -> None:
    parts = one(embedder, {"content": {"parts": [{"text": "the cat"}, {"text": "sat on the mat"}]}})
    np.testing.assert_allclose(parts, direct(embedder, "the cat\nsat on the mat"), atol=1e-7)
    titled = one(embedder, {"content": text("the cat sat"), "task_type": "RETRIEVAL_DOCUMENT", "title": "harbour"})
    np.testing.assert_allclose(titled, direct(embedder, "harbour\nthe cat sat"), atol=1e-7)


def test_output_dimensionality_keeps_the_first_values_renormalised(embedder: ServedEmbedder) -> None:
    full = direct(embedder, "a dog")
    got = one(embedder, {"content": text("a dog"), "outputDimensionality": 8})
    assert got.shape == (8,)
    np.testing.assert_allclose(got, full[:8] / np.linalg.norm(full[:8]), atol=1e-7)


def test_a_batch_answers_each_request_in_order_with_its_own_settings(embedder: ServedEmbedder) -> None:
    texts = ["the cat sat on the mat", "a dog", "storm sails ship harbour sea wind rain"]
    got = batch(embedder, [
        {"model": "models/tiny-embed", "content": text(texts[0])},
        {"model": "models/text-embedding-004", "content": text(texts[1]), "outputDimensionality": 4},
        {"content": text(texts[2]), "taskType": "RETRIEVAL_QUERY"},
    ])
    assert [len(v) for v in got] == [32, 4, 32]
    np.testing.assert_allclose(got[0], direct(embedder, texts[0]), atol=1e-6)
    np.testing.assert_allclose(got[2], direct(embedder, texts[2]), atol=1e-6)


def test_token_counts_are_the_embedding_models(embedder: ServedEmbedder) -> None:
    answer = asyncio.run(count_tokens(embedder, {"contents": [text("the cat"), text("a dog sat")]}))
    assert answer["totalTokens"] == 4 + 5
    assert answer["promptTokensDetails"] == [{"modality": "TEXT", "tokenCount": 9}]
    empty = asyncio.run(count_tokens(embedder, {"contents": [text("")]}))  # counted, though embedContent refuses it
    assert empty["totalTokens"] == 2  # [CLS] and [SEP]


@pytest.mark.parametrize(("body", "field", "words"), [
    ({}, "content", "content is required"),
    ({"content": {"parts": []}}, "content.parts", "must not be empty"),
    ({"content": {"parts": [{"inlineData": {"mimeType": "image/png", "data": "AAAA"}}]}}, "content.parts[0]",
     "only text parts"),
    ({"content": {"parts": [{"text": "a"}, {"text": ""}]}}, "content.parts[1].text", "contains an empty Part"),
    ({"content": text("a"), "title": "T"}, "title", "RETRIEVAL_DOCUMENT"),
    ({"content": text("a"), "title": "T", "taskType": "RETRIEVAL_QUERY"}, "title", "RETRIEVAL_DOCUMENT"),
    ({"content": text("a"), "outputDimensionality": 33}, "output_dimensionality", "between 1 and 32"),
    ({"content": text("a"), "outputDimensionality": 0}, "output_dimensionality", "between 1 and 32"),
    ({"content": text("a"), "taskType": "SUMMARIZATION"}, "task_type", "Invalid value"),
    ({"content": text("a"), "temperature": 1}, "temperature", "Unknown name"),
])
def test_bad_requests_are_400s_naming_the_field(embedder: ServedEmbedder, body: dict[str, Any], field: str,
                                                words: str) -> None:
    with pytest.raises(ApiError) as caught:
        one(embedder, body)
    assert caught.value.code == 400 and words in caught.value.message
    assert field in caught.value.message or any(field in v["field"] for d in caught.value.details
                                                for v in d["fieldViolations"])


@pytest.mark.parametrize(("requests", "field", "words"), [
    ([], "requests", "at least one"),
    ([{"content": text("a")}] * 101, "requests", "at most 100"),
    ([{"content": text("a")}, {"model": "models/tiny-gen", "content": text("b")}], "requests[1].model",
     "the batch's own"),
    ([{"content": text("a")}, {"content": text("b"), "outputDimensionality": 99}],
     "requests[1].output_dimensionality", "between 1 and 32"),
])
def test_bad_batches_are_400s_naming_the_request(embedder: ServedEmbedder, requests: list[dict[str, Any]],
                                                 field: str, words: str) -> None:
    with pytest.raises(ApiError) as caught:
        batch(embedder, requests)
    assert caught.value.code == 400 and words in caught.value.message and field in caught.value.message


def test_count_tokens_refuses_a_generate_content_request(embedder: ServedEmbedder) -> None:
    with pytest.raises(ApiError, match="contents only"):
        asyncio.run(count_tokens(embedder, {"generateContentRequest": {"contents": [text("a")]}}))
