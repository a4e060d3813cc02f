"""LangChain, pydantic-ai, LlamaIndex and LiteLLM against a real server, configured as their users configure them
for Google's Gemini API with only the base URL changed; and gemserve's embeddings against sentence-transformers.

They need google-genai 2.x while gemserve's own tests pin 3.x, so tests/clients/third_party.py runs in a virtual
environment of its own (.venv-clients, made by scripts/clients-venv.sh on first use) and reports what each library
returned; the assertions are here.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gemserve.models.catalog import packaged_minilm
from tests.conftest import Server

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(server: Server) -> dict[str, Any]:
    setup = subprocess.run(["bash", str(ROOT / "scripts" / "clients-venv.sh")], capture_output=True, text=True,
                           timeout=900)
    assert setup.returncode == 0, f"installing the client libraries failed:\n{setup.stdout}\n{setup.stderr}"
    script = ROOT / "tests" / "clients" / "third_party.py"
    run = subprocess.run([str(ROOT / ".venv-clients" / "bin" / "python"), str(script), server.url,
                          str(packaged_minilm())], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    return dict(json.loads(run.stdout.strip().splitlines()[-1]))


def value(results: dict[str, Any], name: str) -> Any:
    assert name in results, sorted(results)
    assert "error" not in results[name], results[name]["error"]
    return results[name]["value"]


def test_langchain(results: dict[str, Any]) -> None:
    assert isinstance(value(results, "langchain.invoke"), str | list) and value(results, "langchain.invoke")
    calls = value(results, "langchain.bind_tools")
    assert calls and calls[0]["name"] == "get_weather" and isinstance(calls[0]["args"]["city"], str)
    person = value(results, "langchain.structured_output")
    assert isinstance(person["name"], str) and isinstance(person["age"], int)


def test_pydantic_ai(results: dict[str, Any]) -> None:
    person = value(results, "pydantic_ai.output_type")
    assert isinstance(person["name"], str) and isinstance(person["age"], int)
    resident = value(results, "pydantic_ai.nested_output_type")  # its final_result tool's schema has $defs
    assert isinstance(resident["name"], str) and isinstance(resident["address"]["city"], str)
    assert isinstance(value(results, "pydantic_ai.tool"), str)
    assert results["pydantic_ai.tool"]["called"], "the agent never ran the tool"


def test_llama_index(results: dict[str, Any]) -> None:
    assert value(results, "llama_index.complete")
    person = value(results, "llama_index.structured_predict")
    assert isinstance(person["name"], str) and isinstance(person["age"], int)
    assert value(results, "llama_index.predict_and_call") == ["get_weather"]


def test_litellm(results: dict[str, Any]) -> None:
    assert value(results, "litellm.completion")
    calls = value(results, "litellm.tools")
    assert calls and calls[0]["name"] == "get_weather" and isinstance(calls[0]["arguments"]["city"], str)
    person = value(results, "litellm.response_format")
    assert isinstance(person["name"], str) and isinstance(person["age"], int)


KEYS = list(json.loads((ROOT / "tests" / "data" / "retrieval.json").read_text())["passages"])


def test_embedding_classes_retrieve_the_right_passages(results: dict[str, Any]) -> None:
    for name in ("langchain.embeddings", "llama_index.embeddings", "litellm.embedding"):
        assert value(results, name) == KEYS, name


def test_embeddings_agree_with_sentence_transformers(results: dict[str, Any]) -> None:
    assert value(results, "sentence_transformers.agreement") > 0.99
