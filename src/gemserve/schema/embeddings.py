"""The embedContent vocabulary: EmbedContentRequest, BatchEmbedContentsRequest and their answers.

Field names follow the public Gemini API v1beta (`models.embedContent`, `models.batchEmbedContents`).
"""

from __future__ import annotations

from pydantic import Field

from gemserve.schema.content import Content, enum_field
from gemserve.schema.wire import OneOrMany, WireModel

TASK_TYPES = [
    "TASK_TYPE_UNSPECIFIED", "RETRIEVAL_QUERY", "RETRIEVAL_DOCUMENT", "SEMANTIC_SIMILARITY", "CLASSIFICATION",
    "CLUSTERING", "QUESTION_ANSWERING", "FACT_VERIFICATION", "CODE_RETRIEVAL_QUERY",
]


class EmbedContentRequest(WireModel):
    model: str | None = None
    content: Content | None = None
    task_type: enum_field(TASK_TYPES) | None = None  # type: ignore[valid-type]
    title: str | None = None
    output_dimensionality: int | None = None


class BatchEmbedContentsRequest(WireModel):
    requests: OneOrMany[EmbedContentRequest] = Field(default_factory=list)


class ContentEmbedding(WireModel):
    values: list[float]


class EmbedContentResponse(WireModel):
    embedding: ContentEmbedding


class BatchEmbedContentsResponse(WireModel):
    embeddings: list[ContentEmbedding]
