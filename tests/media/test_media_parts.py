"""Media parts in a request, with a scripted model: renderings take the parts' places in the prompt, tokens are
counted per modality, and inline data that is not what it claims is a 400 naming the part."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest

from gemserve.errors import ApiError
from gemserve.identity import OPEN_MODE_CALLER
from gemserve.media.processor import MediaProcessor
from gemserve.media.rendering import Rendering
from gemserve.schema.content import GenerateContentRequest
from gemserve.schema.wire import parse_model
from gemserve.service.media import attach_media
from gemserve.service.requests import base_target, plan_generation, request_prompt
from tests.media.samples import ScriptedReaders, text_pdf
from tests.service.scripted import ScriptedEngine, served

PDF = text_pdf(["The code name is ZANZIBAR."])


def request(*parts: dict[str, object]) -> GenerateContentRequest:
    return parse_model(GenerateContentRequest, {"contents": [{"role": "user", "parts": list(parts)}]}, "Request")


def attached(parsed: GenerateContentRequest, tmp_path: Path) -> GenerateContentRequest:
    processor = MediaProcessor(tmp_path, readers=ScriptedReaders())  # type: ignore[arg-type]
    try:
        asyncio.run(attach_media(parsed, OPEN_MODE_CALLER, None, processor, "127.0.0.1:8080"))  # type: ignore[arg-type]
    finally:
        processor.close()
    return parsed


def inline(data: bytes, mime: str) -> dict[str, object]:
    return {"inlineData": {"mimeType": mime, "data": base64.b64encode(data).decode()}}


def test_a_rendering_takes_the_parts_place_and_its_tokens_count_under_its_modality(tmp_path: Path) -> None:
    engine = ScriptedEngine()
    model = served(engine)
    parsed = attached(request({"text": "Read this:"}, inline(PDF, "application/pdf"),
                              inline(b"a text file", "text/plain"), {"text": "What is the code name?"}), tmp_path)
    prompt = request_prompt(model, parsed)
    text = engine.detokenize(prompt.tokens)
    assert "Read this:[Document" in text and "The code name is ZANZIBAR.\n[End of document]" in text
    assert text.index("ZANZIBAR") < text.index("a text file") < text.index("What is the code name?")
    details = dict(prompt.details)
    document = parsed.contents[0].parts[1].rendering
    assert isinstance(document, Rendering)
    assert details == {"TEXT": len(prompt.tokens) - details["DOCUMENT"],  # the text file counts as TEXT, once
                       "DOCUMENT": len(engine.tokenize(document.text, add_bos=False, parse_special=False))}
    assert len(prompt.details) == 2


@pytest.mark.parametrize("part,field,words", [
    (inline(PDF, "image/png"), "contents[0].parts[0].inline_data.mime_type", "bytes are application/pdf"),
    (inline(PDF, "application/x-unknown"), "contents[0].parts[0].inline_data.mime_type", "Unsupported MIME type"),
    ({"inlineData": {"mimeType": "application/pdf", "data": "%%%"}}, "contents[0].parts[0].inline_data.data",
     "not valid base64"),
    (inline(b"%PDF-1.4\n" + b"\x00" * 50, "application/pdf"), "contents[0].parts[0].inline_data", "PDF cannot be read"),
    ({"fileData": {"fileUri": "https://generativelanguage.googleapis.com/v1beta/files/abc"}},
     "contents[0].parts[0].file_data.file_uri", "not a file of this server"),
])
def test_bad_media_are_400s_naming_the_part(tmp_path: Path, part: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(ApiError) as caught:
        attached(request(part, {"text": "Describe it."}), tmp_path)
    assert caught.value.code == 400 and words in caught.value.message
    assert caught.value.message.startswith(field)


def test_figures_in_the_models_own_turns_stay_out_of_the_prompt(tmp_path: Path) -> None:
    parsed = parse_model(GenerateContentRequest, {"contents": [
        {"role": "user", "parts": [{"text": "Plot it."}]},
        {"role": "model", "parts": [inline(b"\x89PNG\r\n\x1a\nnot decoded", "image/png"), {"text": "Done."}]},
        {"role": "user", "parts": [{"text": "Thanks."}]}]}, "Request")
    attached(parsed, tmp_path)
    assert parsed.contents[1].parts[0].rendering is None


def test_a_medium_too_long_for_the_window_is_named(tmp_path: Path) -> None:
    model = served(ScriptedEngine())  # one token a byte, an 8192-token window
    parsed = attached(request({"text": "Summarise:"}, inline(b"lorem ipsum " * 800, "text/plain")), tmp_path)
    with pytest.raises(ApiError) as caught:
        asyncio.run(plan_generation(base_target(model), parsed))
    assert caught.value.code == 400 and caught.value.message.startswith("contents[0].parts[1]: The input token count")
    assert "This part's contents take 96" in caught.value.message
