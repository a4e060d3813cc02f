"""The codeExecution tool end to end: the seed's example through the official clients against a real server, the
built-in instruction-tuned model writing the code and the bubblewrap sandbox running it.

The model is small and its arithmetic is its own; what is checked is what the server guarantees: the parts come
in Google's order, each result is what the shown code prints when run on its own, and the answer that follows
is written after the real output (which it quotes when it states a number).
"""

from __future__ import annotations

import asyncio
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import google.generativeai as old_genai
import pytest
from google import genai
from google.genai import types

from gemserve.sandbox.bwrap import Sandbox, default_python
from tests.conftest import Server

MODEL = "gemini-2.5-flash"  # any gemini-* name reaches models/qwen2.5-coder-0.5b-instruct
SEED_PROMPT = ("What is the sum of the first 50 prime numbers? Generate and run code for the calculation, and make "
               "sure you get all 50.")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(server: Server) -> genai.Client:
    return genai.Client(api_key="anything", http_options=types.HttpOptions(base_url=server.url))


def code_config(max_output_tokens: int = 600) -> types.GenerateContentConfig:
    return types.GenerateContentConfig(tools=[types.Tool(code_execution=types.ToolCodeExecution())], seed=0,
                                       max_output_tokens=max_output_tokens)


def run_alone(code: str) -> str:
    """What the code prints when run on its own, in a sandbox of the test's own."""
    result = asyncio.run(Sandbox(default_python()).run(code))
    return result.output


def check_code_parts(parts: list[Any]) -> None:
    kinds = [("code" if p.executable_code else "result" if p.code_execution_result else
              "image" if p.inline_data else "text") for p in parts]
    assert "code" in kinds, kinds
    for i, kind in enumerate(kinds):
        if kind == "code":  # every block is followed by its result
            assert kinds[i + 1] == "result", kinds
            code, result = parts[i].executable_code, parts[i + 1].code_execution_result
            assert code.language == "PYTHON"
            assert (result.output or "") == run_alone(code.code), code.code
    last_result = max(i for i, kind in enumerate(kinds) if kind == "result")
    after = "".join(p.text for p in parts[last_result + 1:] if p.text)
    output = parts[last_result].code_execution_result.output or ""
    numbers = re.findall(r"\d+", after)
    if numbers and parts[last_result].code_execution_result.outcome == "OUTCOME_OK":
        assert any(n in output for n in numbers), (output, after)


def test_seed_example_with_google_genai(client: genai.Client) -> None:
    response = client.models.generate_content(model=MODEL, contents=SEED_PROMPT, config=code_config())
    parts = response.candidates[0].content.parts
    check_code_parts(parts)
    assert response.candidates[0].finish_reason == types.FinishReason.STOP
    assert response.usage_metadata.tool_use_prompt_token_count > 0


def test_seed_example_with_google_generativeai(server: Server) -> None:
    old_genai.configure(api_key="anything", transport="rest", client_options={"api_endpoint": server.url})
    model = old_genai.GenerativeModel(model_name="gemini-1.5-flash", tools="code_execution")
    # This SDK cannot send a seed: greedy, so that whether the model writes code does not depend on a draw.
    response = model.generate_content(SEED_PROMPT, generation_config={"max_output_tokens": 600, "temperature": 0})
    parts = response.candidates[0].content.parts
    assert any(p.executable_code.code for p in parts)
    for i, part in enumerate(parts):
        if part.executable_code.code:
            result = parts[i + 1].code_execution_result
            assert result.outcome.name in ("OUTCOME_OK", "OUTCOME_FAILED", "OUTCOME_DEADLINE_EXCEEDED")
            assert result.output == run_alone(part.executable_code.code)
    code = next(p.executable_code.code for p in parts if p.executable_code.code)
    if any(p.inline_data.data for p in parts):  # code that drew a chart: the SDK has no text for an image part
        with pytest.raises(ValueError, match="inline_data"):
            _ = response.text
    else:
        assert code in response.text  # the SDK renders the parts as markdown


def test_streaming_delivers_code_then_result_then_text(client: genai.Client) -> None:
    kinds = []
    for chunk in client.models.generate_content_stream(model=MODEL, contents="Use Python to compute 2**100.",
                                                       config=code_config()):
        for part in chunk.candidates[0].content.parts or []:
            kinds.append("code" if part.executable_code else "result" if part.code_execution_result else "text")
    assert "code" in kinds and kinds.index("code") < kinds.index("result"), kinds


def test_a_chat_with_code_parts_continues(client: genai.Client) -> None:
    chat = client.chats.create(model=MODEL, config=code_config())
    first = chat.send_message("Use Python to compute 12 * 34.")
    assert any(p.executable_code for p in first.candidates[0].content.parts)
    second = chat.send_message("Now add 100 to that result.")
    assert second.candidates[0].content.parts


def test_eight_code_executions_at_once_while_a_stream_flows(client: genai.Client) -> None:
    prompts = [f"Use Python to compute {n} factorial." for n in range(10, 18)]
    config = code_config(max_output_tokens=200)
    stream_chunks: list[str] = []
    started = threading.Event()

    def stream() -> None:
        started.set()
        for chunk in client.models.generate_content_stream(
                model=MODEL, contents="Write a short poem about rivers.",
                config=types.GenerateContentConfig(max_output_tokens=120, seed=1)):
            stream_chunks.append(chunk.text or "")

    with ThreadPoolExecutor(max_workers=9) as pool:
        streaming = pool.submit(stream)
        started.wait()
        responses = list(pool.map(lambda p: client.models.generate_content(model=MODEL, contents=p, config=config),
                                  prompts))
        streaming.result()
    assert len(responses) == 8
    ran = [r for r in responses if any(p.code_execution_result for p in r.candidates[0].content.parts)]
    assert len(ran) >= 6, [r.text for r in responses]  # a small model may now and then answer without code
    assert len(stream_chunks) > 3 and "".join(stream_chunks).strip()
