"""Media through the official clients on a real server: files uploaded with google-genai and google-generativeai,
the same media inline, countTokens with media; the built-in instruct model answers from what the media hold
(OCR, Whisper and the PDF's text run for real)."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import pytest
from google import genai
from google.genai import errors, types

from tests.conftest import API_KEY, OTHER_KEY, Server
from tests.media.samples import encoded, text_pdf, text_picture

MEDIA = Path(__file__).parent.parent / "data" / "media"
GREEDY = types.GenerateContentConfig(temperature=0, max_output_tokens=40)
MODEL = "gemini-2.5-flash"  # the built-in instruct model


def client(server: Server, key: str = API_KEY) -> genai.Client:
    return genai.Client(api_key=key, http_options=types.HttpOptions(base_url=server.url))


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("media")
    made = {"report.pdf": text_pdf(["Quarterly notes.", "The code name of the project is ZANZIBAR."]),
            "sign.png": encoded(text_picture(["The magic word is", "ZEPHYRINE"]), "PNG")}
    for name, data in made.items():
        (folder / name).write_bytes(data)
    return {**{name: folder / name for name in made}, "speech.mp3": MEDIA / "speech.mp3",
            "clip.mp4": MEDIA / "video.mp4"}


@pytest.mark.parametrize("name,question,word", [
    ("report.pdf", "What is the code name of the project in this document?", "zanzibar"),
    ("speech.mp3", "What is the secret password said in this audio?", "pineapple"),
    ("sign.png", "What is the magic word in this image?", "zephyrine"),
    ("clip.mp4", "What is the secret password said in this video?", "pineapple"),
])
def test_an_uploaded_file_reaches_the_model(keyed_server: Server, samples: dict[str, Path], name: str,
                                            question: str, word: str) -> None:
    gemini = client(keyed_server)
    file = gemini.files.upload(file=samples[name])
    assert file.name and file.uri and file.uri.startswith(keyed_server.url)
    assert file.size_bytes == samples[name].stat().st_size
    answer = gemini.models.generate_content(model=MODEL, contents=[file, question], config=GREEDY)
    assert word in (answer.text or "").lower(), answer.text
    details = {d.modality.value: d.token_count for d in answer.usage_metadata.prompt_tokens_details}
    modality = {"report.pdf": "DOCUMENT", "speech.mp3": "AUDIO", "sign.png": "IMAGE", "clip.mp4": "VIDEO"}[name]
    assert details[modality] > 10 and sum(details.values()) == answer.usage_metadata.prompt_token_count
    assert gemini.files.get(name=file.name).state == types.FileState.ACTIVE

    stranger = client(keyed_server, OTHER_KEY)
    for attempt in (lambda: stranger.files.get(name=file.name),
                    lambda: stranger.models.generate_content(model=MODEL, contents=[file, question])):
        with pytest.raises(errors.ClientError) as caught:
            attempt()
        assert caught.value.code == 403
    gemini.files.delete(name=file.name)
    assert file.name not in [f.name for f in gemini.files.list()]


def test_inline_media_and_count_tokens(keyed_server: Server, samples: dict[str, Path]) -> None:
    gemini = client(keyed_server)
    part = types.Part.from_bytes(data=samples["report.pdf"].read_bytes(), mime_type="application/pdf")
    contents = [part, "What is the code name of the project in this document?"]
    answer = gemini.models.generate_content(model=MODEL, contents=contents, config=GREEDY)
    assert "zanzibar" in (answer.text or "").lower()
    counted = gemini.models.count_tokens(model=MODEL, contents=contents)
    assert counted.total_tokens == answer.usage_metadata.prompt_token_count
    pdf = base64.b64encode(samples["report.pdf"].read_bytes()).decode()
    body = {"contents": [{"parts": [{"inlineData": {"mimeType": "application/pdf", "data": pdf}}, {"text": "Sum."}]}]}
    raw = httpx.post(f"{keyed_server.url}/v1beta/models/{MODEL}:countTokens", headers={"x-goog-api-key": API_KEY},
                     json=body).json()
    assert {d["modality"] for d in raw["promptTokensDetails"]} == {"TEXT", "DOCUMENT"}
    assert sum(d["tokenCount"] for d in raw["promptTokensDetails"]) == raw["totalTokens"]

    broken = types.Part.from_bytes(data=b"%PDF-1.4\n" + b"\x00" * 64, mime_type="application/pdf")
    with pytest.raises(errors.ClientError) as caught:
        gemini.models.generate_content(model=MODEL, contents=[broken, "Summarise."])
    assert caught.value.code == 400 and "contents[0].parts[0].inline_data" in str(caught.value)
    with pytest.raises(errors.ClientError) as caught:
        gemini.models.generate_content(model=MODEL, contents=[
            types.Part.from_uri(file_uri="https://example.com/v1beta/files/abc", mime_type="application/pdf"), "x"])
    assert caught.value.code == 400 and "not a file of this server" in str(caught.value)


def test_google_generativeai_upload_file(keyed_server: Server, samples: dict[str, Path],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import google.generativeai as legacy
    import google.generativeai.client as legacy_client

    # upload_file reads Google's discovery document from a fixed URL: the one setting a user changes too.
    monkeypatch.setattr(legacy_client, "GENAI_API_DISCOVERY_URL", f"{keyed_server.url}/$discovery/rest")
    legacy.configure(api_key=API_KEY, transport="rest", client_options={"api_endpoint": keyed_server.url})
    file = legacy.upload_file(samples["speech.mp3"], mime_type="audio/mpeg")
    assert file.state.name == "ACTIVE" and file.mime_type == "audio/mpeg"
    model = legacy.GenerativeModel(MODEL)
    answer = model.generate_content([file, "What is the secret password said in this audio?"],
                                    generation_config={"temperature": 0, "max_output_tokens": 40})
    assert "pineapple" in answer.text.lower()
    assert legacy.get_file(file.name).sha256_hash
    legacy.delete_file(file.name)
