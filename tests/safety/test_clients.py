"""A blocked candidate as the official clients see it: the application served by uvicorn on 127.0.0.1 in this
process, a scripted model that turns harmful mid-answer and the keyword classifier behind it (real models rarely
write harm on cue; tests/api/test_safety.py drives the real classifier)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import google.generativeai as legacy
import pytest
import uvicorn
from google import genai
from google.genai import types

from gemserve.api.app import create_app
from gemserve.config import Settings
from gemserve.models.catalog import Catalog, ModelSpec
from gemserve.models.registry import ModelRegistry
from tests.safety.test_enforcement import ALL, KeywordClassifier, PacedEngine

KEY = "client-key"
SCRIPT = "Sure, here is some text that is fine to read. " * 2 + "Now the bomb part, long enough for a window."


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("clients")
    spec = ModelSpec(id="scripted", display_name="scripted", description="", path=data / "none.gguf")
    registry = ModelRegistry(Catalog(models={"scripted": spec}, gemini_model="scripted"), data,
                             lambda path, spec: PacedEngine(SCRIPT, chat_template=None))
    registry.load_all()
    app = create_app(Settings(data_dir=Path(data), api_keys=frozenset({KEY}), tuning_worker=False), registry)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    app.state.safety._classifier = KeywordClassifier()
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_google_genai_sees_a_blocked_candidate(url: str) -> None:
    client = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=url))
    config = types.GenerateContentConfig(safety_settings=[
        types.SafetySetting(category=c, threshold=types.HarmBlockThreshold.BLOCK_MEDIUM_AND_ABOVE) for c in ALL])
    response = client.models.generate_content(model="gemini-2.5-flash", contents="Write", config=config)
    candidate = response.candidates[0]
    assert candidate.finish_reason == types.FinishReason.SAFETY and candidate.content is None
    assert response.text is None and response.prompt_feedback.block_reason is None
    blocked = [r for r in candidate.safety_ratings if r.blocked]
    assert [(r.category, r.probability) for r in blocked] == [
        (types.HarmCategory.HARM_CATEGORY_DANGEROUS_CONTENT, types.HarmProbability.HIGH)]

    chunks = list(client.models.generate_content_stream(model="gemini-2.5-flash", contents="Write", config=config))
    sent = "".join(chunk.text or "" for chunk in chunks)
    assert sent and SCRIPT.startswith(sent) and "bomb" not in sent
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.SAFETY


def test_google_generativeai_sees_a_blocked_candidate(url: str) -> None:
    legacy.configure(api_key=KEY, transport="rest", client_options={"api_endpoint": url})
    model = legacy.GenerativeModel("gemini-2.5-flash")
    response = model.generate_content("Write", safety_settings="MEDIUM")
    candidate = response.candidates[0]
    assert candidate.finish_reason == legacy.protos.Candidate.FinishReason.SAFETY
    assert any(r.blocked for r in candidate.safety_ratings)
    with pytest.raises(ValueError):
        response.text  # noqa: B018 - the client's own accessor refuses a blocked candidate
    with pytest.raises(legacy.types.StopCandidateException):
        model.start_chat().send_message("Write", safety_settings="MEDIUM")
