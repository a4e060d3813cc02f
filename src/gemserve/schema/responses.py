"""What generateContent answers: GenerateContentResponse and its parts, as typed models.

Field names and nesting follow the public Gemini API v1beta; `to_wire()` gives camelCase JSON without the unset
fields. Content and Part are the request's own models (`schema/content.py`): a response's parts are the same
typed parts a client sends back in the next turn.
"""

from __future__ import annotations

from gemserve.schema.content import Content
from gemserve.schema.wire import WireModel


class LogprobsCandidate(WireModel):
    token: str
    token_id: int
    log_probability: float


class TopCandidates(WireModel):
    candidates: list[LogprobsCandidate]


class LogprobsResult(WireModel):
    chosen_candidates: list[LogprobsCandidate]
    top_candidates: list[TopCandidates] | None = None


class SafetyRating(WireModel):
    category: str
    probability: str
    blocked: bool | None = None  # set (true) only on the rating that blocked the content


class PromptFeedback(WireModel):
    block_reason: str | None = None  # "SAFETY" when the prompt was blocked: then there are no candidates
    safety_ratings: list[SafetyRating] | None = None


class Candidate(WireModel):
    content: Content | None = None  # none when the candidate was blocked before any of it went out
    finish_reason: str | None = None
    safety_ratings: list[SafetyRating] | None = None
    index: int
    token_count: int | None = None
    avg_logprobs: float | None = None
    logprobs_result: LogprobsResult | None = None


class ModalityTokenCount(WireModel):
    modality: str
    token_count: int


class UsageMetadata(WireModel):
    prompt_token_count: int
    cached_content_token_count: int | None = None  # of the prompt's tokens, those that came from a cache
    candidates_token_count: int | None = None  # none when the prompt was blocked
    tool_use_prompt_token_count: int | None = None  # code execution: the run results fed back to the model
    total_token_count: int
    prompt_tokens_details: list[ModalityTokenCount] | None = None


class GenerateContentResponse(WireModel):
    candidates: list[Candidate] | None = None  # none when the prompt was blocked
    prompt_feedback: PromptFeedback | None = None
    usage_metadata: UsageMetadata
    model_version: str
    response_id: str


class CountTokensResponse(WireModel):
    total_tokens: int
    cached_content_token_count: int | None = None
    prompt_tokens_details: list[ModalityTokenCount]
