"""embedContent, batchEmbedContents and countTokens on an embedding model.

A request's text is its content's text parts joined by newlines; with `taskType: RETRIEVAL_DOCUMENT` a
`title` goes first, on a line of its own. Texts longer than the model's window are cut there, as Google's
service truncates by default (`autoTruncate` is a Vertex AI field; the Gemini API has none). The task type is
checked and accepted, but all-MiniLM-L6-v2 was trained without task instructions, so it does not change the
vector. `outputDimensionality` keeps the first values and normalises them again. A batch (at most 100
requests, as Google allows) goes to the engine as one job.

Not here: the encoder (`engine/embedding.py`), routes (`api/models.py`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from gemserve.errors import invalid_argument
from gemserve.models.catalog import Catalog
from gemserve.models.registry import ServedEmbedder
from gemserve.schema.content import Content, CountTokensRequest
from gemserve.schema.embeddings import (
    BatchEmbedContentsRequest,
    BatchEmbedContentsResponse,
    ContentEmbedding,
    EmbedContentRequest,
    EmbedContentResponse,
)
from gemserve.schema.responses import CountTokensResponse, ModalityTokenCount
from gemserve.schema.wire import parse_model

MAX_BATCH = 100
DIGITS = 8  # decimals sent per value: float32 carries about seven significant digits


def _text(content: Content | None, field: str, counting: bool = False) -> str:
    """A content's text; every part text, and (but for countTokens) none empty."""
    if content is None:
        raise invalid_argument(f"* {field}: content is required.", field)
    if not content.parts:
        raise invalid_argument(f"* {field}.parts: contents.parts must not be empty.", f"{field}.parts")
    texts = []
    for i, part in enumerate(content.parts):
        if part.text is None:
            raise invalid_argument(f"* {field}.parts[{i}]: only text parts can be embedded by this model.",
                                   f"{field}.parts[{i}]")
        if not part.text and not counting:  # as Google's embedContent answers an empty string
            raise invalid_argument(f"* {field}.parts[{i}].text: EmbedContentRequest.content contains an empty Part.",
                                   f"{field}.parts[{i}].text")
        texts.append(part.text)
    return "\n".join(texts)


def _checked(request: EmbedContentRequest, field: str, dimensions: int) -> tuple[str, int]:
    """The text to embed and the number of values to return, or a 400 naming the field."""
    text = _text(request.content, f"{field}content")
    if request.title is not None:
        if request.task_type != "RETRIEVAL_DOCUMENT":
            raise invalid_argument(f"* {field}title: a title is only allowed with task_type RETRIEVAL_DOCUMENT.",
                                   f"{field}title")
        text = f"{request.title}\n{text}"
    wanted = request.output_dimensionality
    if wanted is None:
        return text, dimensions
    if not 0 < wanted <= dimensions:
        raise invalid_argument(f"* {field}output_dimensionality: must be between 1 and {dimensions} for this model, "
                               f"got {wanted}.", f"{field}output_dimensionality")
    return text, wanted


def _embedding(vector: np.ndarray, size: int) -> ContentEmbedding:
    kept = vector[:size].astype(np.float64)
    norm = float(np.linalg.norm(kept))
    if norm > 0:
        kept /= norm
    return ContentEmbedding(values=np.round(kept, DIGITS).tolist())


async def embed_content(embedder: ServedEmbedder, body: Any) -> dict[str, Any]:
    request: EmbedContentRequest = await asyncio.to_thread(parse_model, EmbedContentRequest, body,
                                                           "EmbedContentRequest")
    text, size = _checked(request, "", embedder.engine.layout.dimensions)
    vectors = await embedder.engine.embed([text])
    return EmbedContentResponse(embedding=_embedding(vectors[0], size)).to_wire()


async def batch_embed_contents(embedder: ServedEmbedder, catalog: Catalog, body: Any) -> dict[str, Any]:
    batch: BatchEmbedContentsRequest = await asyncio.to_thread(parse_model, BatchEmbedContentsRequest, body,
                                                               "BatchEmbedContentsRequest")
    if not batch.requests:
        raise invalid_argument("* BatchEmbedContentsRequest.requests: at least one request is required.", "requests")
    if len(batch.requests) > MAX_BATCH:
        raise invalid_argument(f"* BatchEmbedContentsRequest.requests: at most {MAX_BATCH} requests can be in one "
                               f"batch, got {len(batch.requests)}.", "requests")
    checked = []
    for i, request in enumerate(batch.requests):
        field = f"requests[{i}]."
        if request.model is not None and catalog.resolve(request.model) is not embedder.spec:
            raise invalid_argument(f"* BatchEmbedContentsRequest.{field}model: the model of every request must be "
                                   f"the batch's own, models/{embedder.spec.id}; got {request.model!r}.",
                                   f"{field}model")
        checked.append(_checked(request, field, embedder.engine.layout.dimensions))
    vectors = await embedder.engine.embed([text for text, _ in checked])
    embeddings = [_embedding(vector, size) for vector, (_, size) in zip(vectors, checked, strict=True)]
    return BatchEmbedContentsResponse(embeddings=embeddings).to_wire()


async def count_tokens(embedder: ServedEmbedder, body: Any) -> dict[str, Any]:
    """Tokens of the contents as the embedding model reads them (its [CLS] and [SEP] included), uncut."""
    parsed: CountTokensRequest = parse_model(CountTokensRequest, body, "CountTokensRequest")
    if parsed.generate_content_request is not None:
        raise invalid_argument("* CountTokensRequest.generate_content_request: an embedding model counts contents "
                               "only.", "generate_content_request")
    if not parsed.contents:
        raise invalid_argument("* CountTokensRequest: contents must be set.", "contents")
    texts = [_text(content, f"contents[{i}]", counting=True) for i, content in enumerate(parsed.contents)]
    total = await embedder.engine.count_tokens(texts)
    details = [ModalityTokenCount(modality="TEXT", token_count=total)]
    return CountTokensResponse(total_tokens=total, prompt_tokens_details=details).to_wire()
