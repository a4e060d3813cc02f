"""Drives gemserve with LangChain, pydantic-ai, LlamaIndex and LiteLLM, each configured as its users configure it
for Google's Gemini API, with only the base URL changed; and compares gemserve's embeddings with
sentence-transformers' own on the same model directory. Runs in .venv-clients (see requirements.txt), not in
gemserve's own environment; prints one JSON object: check name -> what came back, for the test to judge.

    .venv-clients/bin/python tests/clients/third_party.py http://127.0.0.1:8080 EMBEDDING_MODEL_DIR
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

BASE = sys.argv[1]
EMBEDDING_DIR = sys.argv[2]
MODEL = "gemini-2.5-flash"
RETRIEVAL = json.loads((Path(__file__).parents[1] / "data" / "retrieval.json").read_text())
KEYS = list(RETRIEVAL["passages"])
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # LiteLLM would fetch a price list from the internet


class Person(BaseModel):
    name: str
    age: int


class Address(BaseModel):
    city: str
    country: str


class Resident(BaseModel):  # nested: pydantic writes it with $defs and $ref
    name: str
    address: Address


def get_weather(city: str) -> str:
    """Get the current weather for a city."""
    CALLED.append(city)
    return f"The weather in {city} is sunny, 22 C."


CALLED: list[str] = []
RESULTS: dict[str, Any] = {}


def check(name: str) -> Callable[[Callable[[], Any]], None]:
    def run(fn: Callable[[], Any]) -> None:
        CALLED.clear()
        try:
            RESULTS[name] = {"value": fn(), "called": list(CALLED)}
        except Exception:
            RESULTS[name] = {"error": traceback.format_exc(limit=3)[-1500:]}

    return run


def langchain() -> None:
    from langchain_google_genai import ChatGoogleGenerativeAI

    llm = ChatGoogleGenerativeAI(model=MODEL, google_api_key="test", base_url=BASE, temperature=0, max_tokens=120)

    check("langchain.invoke")(lambda: llm.invoke("Say hello in one short sentence.").content)
    check("langchain.bind_tools")(lambda: llm.bind_tools([get_weather]).invoke(
        "What is the weather in Paris? Use the tool.").tool_calls)
    check("langchain.structured_output")(lambda: llm.with_structured_output(Person).invoke(
        "Alice is 30 years old. Extract the person.").model_dump())


def ranked(documents: list[list[float]], queries: list[list[float]]) -> list[str]:
    """For each question, the key of the passage it is closest to (cosine)."""
    import numpy as np

    d = np.array(documents)
    q = np.array(queries)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return [KEYS[i] for i in (q @ d.T).argmax(axis=1)]


PASSAGES = [RETRIEVAL["passages"][k] for k in KEYS]
QUESTIONS = [RETRIEVAL["questions"][k] for k in KEYS]


def langchain_embeddings() -> None:
    from langchain_google_genai import GoogleGenerativeAIEmbeddings

    embeddings = GoogleGenerativeAIEmbeddings(model="models/gemini-embedding-001", google_api_key="test",
                                              base_url=BASE)
    check("langchain.embeddings")(lambda: ranked(embeddings.embed_documents(PASSAGES),
                                                 [embeddings.embed_query(q) for q in QUESTIONS]))


def pydantic_ai() -> None:
    from pydantic_ai import Agent
    from pydantic_ai.models.google import GoogleModel, GoogleModelSettings
    from pydantic_ai.providers.google import GoogleProvider

    model = GoogleModel(MODEL, provider=GoogleProvider(api_key="test", base_url=BASE))
    settings = GoogleModelSettings(temperature=0, max_tokens=150)
    check("pydantic_ai.output_type")(lambda: Agent(model, output_type=Person, model_settings=settings).run_sync(
        "Alice is 30 years old. Extract the person.").output.model_dump())
    check("pydantic_ai.nested_output_type")(lambda: Agent(model, output_type=Resident, model_settings=settings)
                                            .run_sync("Alice lives in Paris, France.").output.model_dump())
    agent = Agent(model, model_settings=settings, system_prompt="Use the tools to answer.")
    agent.tool_plain(get_weather)
    check("pydantic_ai.tool")(lambda: agent.run_sync("What is the weather in Paris?").output)


def llama_index() -> None:
    from llama_index.core.prompts import PromptTemplate
    from llama_index.core.tools import FunctionTool
    from llama_index.llms.google_genai import GoogleGenAI

    llm = GoogleGenAI(model=MODEL, api_key="test", temperature=0, max_tokens=120, http_options={"base_url": BASE})
    check("llama_index.complete")(lambda: llm.complete("Say hello in one short sentence.").text)
    check("llama_index.structured_predict")(lambda: llm.structured_predict(
        Person, PromptTemplate("Extract the person: {text}"), text="Alice is 30 years old.").model_dump())
    check("llama_index.predict_and_call")(lambda: [
        s.tool_name for s in llm.predict_and_call([FunctionTool.from_defaults(fn=get_weather)],
                                                  "What is the weather in Paris?").sources])


def llama_index_embeddings() -> None:
    from llama_index.embeddings.google_genai import GoogleGenAIEmbedding

    embeddings = GoogleGenAIEmbedding(model_name="text-embedding-004", api_key="test",
                                      http_options={"base_url": BASE})
    check("llama_index.embeddings")(lambda: ranked(embeddings.get_text_embedding_batch(PASSAGES),
                                                   [embeddings.get_query_embedding(q) for q in QUESTIONS]))


def sentence_transformers_agreement() -> None:
    """The lowest cosine between gemserve's vector and sentence-transformers' for the same text."""
    import numpy as np
    from google import genai
    from google.genai import types
    from sentence_transformers import SentenceTransformer

    texts = PASSAGES + QUESTIONS + [" ", "a" * 3000, "Ünïcödé text, emoji 🙂 and CJK 漢字"]  # "": a 400, as Google

    def lowest() -> float:
        client = genai.Client(api_key="test", http_options=types.HttpOptions(base_url=BASE))
        ours = np.array([e.values for e in client.models.embed_content(model="text-embedding-004",
                                                                        contents=texts).embeddings])
        theirs = SentenceTransformer(EMBEDDING_DIR, device="cpu").encode(texts, normalize_embeddings=True)
        return float(min((ours * theirs).sum(axis=1)))

    check("sentence_transformers.agreement")(lowest)


def litellm_checks() -> None:
    import litellm

    # LiteLLM joins api_base and "models/...", so the API version belongs in api_base.
    kw = dict(model=f"gemini/{MODEL}", api_base=f"{BASE}/v1beta", api_key="test", temperature=0, max_tokens=120,
              num_retries=0)
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

    def tool_calls() -> Any:
        message = litellm.completion(messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                                     tools=tools, **kw).choices[0].message
        return [{"name": c.function.name, "arguments": json.loads(c.function.arguments)}
                for c in message.tool_calls or []]

    check("litellm.completion")(lambda: litellm.completion(
        messages=[{"role": "user", "content": "Say hello."}], **kw).choices[0].message.content)
    check("litellm.tools")(tool_calls)
    check("litellm.response_format")(lambda: json.loads(litellm.completion(
        messages=[{"role": "user", "content": "Alice is 30 years old. Extract the person as JSON."}],
        response_format=Person, **kw).choices[0].message.content))
    check("litellm.embedding")(lambda: ranked(
        [d["embedding"] for d in litellm.embedding(model="gemini/text-embedding-004", input=PASSAGES,
                                                   api_base=f"{BASE}/v1beta", api_key="test").data],
        [d["embedding"] for d in litellm.embedding(model="gemini/text-embedding-004", input=QUESTIONS,
                                                   api_base=f"{BASE}/v1beta", api_key="test").data]))


for group in (langchain, langchain_embeddings, pydantic_ai, llama_index, llama_index_embeddings, litellm_checks,
              sentence_transformers_agreement):
    try:
        group()
    except Exception:  # an import or set-up failure fails the group's checks
        RESULTS[group.__name__] = {"error": traceback.format_exc(limit=3)[-1500:]}
print(json.dumps(RESULTS))
