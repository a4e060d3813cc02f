"""The generateContent vocabulary: Content, Part, GenerationConfig, SafetySetting and the request bodies.

Field names follow the public Gemini API v1beta (as carried by google-genai's types). Every field the official
clients may send is declared, so that a request Google accepts is accepted here; names Google does not know are
rejected by `WireModel`. Whether a declared feature is *supported* is decided by the service, not here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, PrivateAttr

from gemserve.schema.wire import OneOrMany, WireModel, enum_by_name_or_number

HARM_CATEGORIES = [
    "HARM_CATEGORY_UNSPECIFIED", "HARM_CATEGORY_DEROGATORY", "HARM_CATEGORY_TOXICITY", "HARM_CATEGORY_VIOLENCE",
    "HARM_CATEGORY_SEXUAL", "HARM_CATEGORY_MEDICAL", "HARM_CATEGORY_DANGEROUS", "HARM_CATEGORY_HARASSMENT",
    "HARM_CATEGORY_HATE_SPEECH", "HARM_CATEGORY_SEXUALLY_EXPLICIT", "HARM_CATEGORY_DANGEROUS_CONTENT",
    "HARM_CATEGORY_CIVIC_INTEGRITY",
]
HARM_BLOCK_THRESHOLDS = [
    "HARM_BLOCK_THRESHOLD_UNSPECIFIED", "BLOCK_LOW_AND_ABOVE", "BLOCK_MEDIUM_AND_ABOVE", "BLOCK_ONLY_HIGH",
    "BLOCK_NONE", "OFF",
]
HARM_BLOCK_METHODS = ["HARM_BLOCK_METHOD_UNSPECIFIED", "SEVERITY", "PROBABILITY"]
MODALITIES = ["MODALITY_UNSPECIFIED", "TEXT", "IMAGE", "AUDIO"]
MEDIA_RESOLUTIONS = ["MEDIA_RESOLUTION_UNSPECIFIED", "MEDIA_RESOLUTION_LOW", "MEDIA_RESOLUTION_MEDIUM",
                     "MEDIA_RESOLUTION_HIGH"]
LANGUAGES = ["LANGUAGE_UNSPECIFIED", "PYTHON"]
OUTCOMES = ["OUTCOME_UNSPECIFIED", "OUTCOME_OK", "OUTCOME_FAILED", "OUTCOME_DEADLINE_EXCEEDED"]
SCHEMA_TYPES = ["TYPE_UNSPECIFIED", "STRING", "NUMBER", "INTEGER", "BOOLEAN", "ARRAY", "OBJECT", "NULL"]
FUNCTION_CALLING_MODES = ["MODE_UNSPECIFIED", "AUTO", "ANY", "NONE", "VALIDATED"]


def enum_field(members: list[str]) -> Any:
    """A field holding one of `members`, given by name or by proto number."""
    return Annotated[Literal[tuple(members)], BeforeValidator(enum_by_name_or_number(members))]  # type: ignore[valid-type]


HarmCategory = enum_field(HARM_CATEGORIES)
HarmBlockThreshold = enum_field(HARM_BLOCK_THRESHOLDS)


class Blob(WireModel):
    mime_type: str | None = None
    data: str | None = None
    display_name: str | None = None


class FileData(WireModel):
    mime_type: str | None = None
    file_uri: str | None = None
    display_name: str | None = None


class FunctionCall(WireModel):
    id: str | None = None
    name: str | None = None
    args: dict[str, Any] | None = None


class FunctionResponse(WireModel):
    id: str | None = None
    name: str | None = None
    response: dict[str, Any] | None = None
    will_continue: bool | None = None
    scheduling: str | None = None


class ExecutableCode(WireModel):
    id: str | None = None
    language: enum_field(LANGUAGES) | None = None  # type: ignore[valid-type]
    code: str | None = None


class CodeExecutionResult(WireModel):
    id: str | None = None
    outcome: enum_field(OUTCOMES) | None = None  # type: ignore[valid-type]
    output: str | None = None


class VideoMetadata(WireModel):
    start_offset: str | None = None
    end_offset: str | None = None
    fps: float | None = None


class Part(WireModel):
    text: str | None = None
    inline_data: Blob | None = None
    file_data: FileData | None = None
    function_call: FunctionCall | None = None
    function_response: FunctionResponse | None = None
    executable_code: ExecutableCode | None = None
    code_execution_result: CodeExecutionResult | None = None
    video_metadata: VideoMetadata | None = None
    thought: bool | None = None
    thought_signature: str | None = None
    # What a model reads of an inlineData or fileData part (a media.rendering.Rendering), set by
    # service/media.attach_media before the conversation is built; never on the wire.
    _rendering: Any = PrivateAttr(default=None)

    @property
    def rendering(self) -> Any:
        return self._rendering


class Content(WireModel):
    role: str | None = None
    parts: OneOrMany[Part] = Field(default_factory=list)


class SafetySetting(WireModel):
    category: HarmCategory | None = None  # type: ignore[valid-type]
    threshold: HarmBlockThreshold | None = None  # type: ignore[valid-type]
    method: enum_field(HARM_BLOCK_METHODS) | None = None  # type: ignore[valid-type]


class Schema(WireModel):
    type: enum_field(SCHEMA_TYPES) | None = None  # type: ignore[valid-type]
    format: str | None = None
    title: str | None = None
    description: str | None = None
    nullable: bool | None = None
    enum: list[str] | None = None
    max_items: int | None = None
    min_items: int | None = None
    properties: dict[str, Schema] | None = None
    required: list[str] | None = None
    min_properties: int | None = None
    max_properties: int | None = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None
    example: Any = None
    any_of: list[Schema] | None = None
    property_ordering: list[str] | None = None
    default: Any = None
    items: Schema | None = None
    minimum: float | None = None
    maximum: float | None = None


class ThinkingConfig(WireModel):
    include_thoughts: bool | None = None
    thinking_budget: int | None = None
    thinking_level: str | None = None


class GenerationConfig(WireModel):
    stop_sequences: list[str] | None = None
    response_mime_type: str | None = None
    response_schema: Schema | None = None
    response_json_schema: Any = None
    response_modalities: list[enum_field(MODALITIES)] | None = None  # type: ignore[valid-type]
    candidate_count: int | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    response_logprobs: bool | None = None
    logprobs: int | None = None
    enable_enhanced_civic_answers: bool | None = None
    speech_config: dict[str, Any] | None = None
    thinking_config: ThinkingConfig | None = None
    image_config: dict[str, Any] | None = None
    media_resolution: enum_field(MEDIA_RESOLUTIONS) | None = None  # type: ignore[valid-type]


class FunctionDeclaration(WireModel):
    name: str | None = None
    description: str | None = None
    parameters: Schema | None = None
    parameters_json_schema: Any = None
    response: Any = None
    response_json_schema: Any = None
    behavior: str | None = None


class Tool(WireModel):
    function_declarations: list[FunctionDeclaration] | None = None
    code_execution: dict[str, Any] | None = None
    google_search: dict[str, Any] | None = None
    google_search_retrieval: dict[str, Any] | None = None
    url_context: dict[str, Any] | None = None


class FunctionCallingConfig(WireModel):
    mode: enum_field(FUNCTION_CALLING_MODES) | None = None  # type: ignore[valid-type]
    allowed_function_names: list[str] | None = None


class ToolConfig(WireModel):
    function_calling_config: FunctionCallingConfig | None = None


class GenerateContentRequest(WireModel):
    model: str | None = None
    contents: OneOrMany[Content] = Field(default_factory=list)
    system_instruction: Content | None = None
    tools: OneOrMany[Tool] | None = None
    tool_config: ToolConfig | None = None
    safety_settings: OneOrMany[SafetySetting] | None = None
    generation_config: GenerationConfig | None = None
    cached_content: str | None = None


class CountTokensRequest(WireModel):
    contents: OneOrMany[Content] | None = None
    generate_content_request: GenerateContentRequest | None = None
