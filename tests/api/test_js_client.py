"""JavaScript clients, unmodified apart from their base URL, against a real server: the official @google/genai,
and the Vercel AI SDK (@ai-sdk/google).

tests/api/js/genai_smoke.mjs and aisdk_smoke.mjs make the calls and print what came back as one JSON object; these
tests install the pinned packages with `npm ci` (once: node_modules is reused while it holds the locked versions)
and check the answers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Server

JS_DIR = Path(__file__).parent / "js"
SCRIPT = JS_DIR / "genai_smoke.mjs"
MAX_OUTPUT_TOKENS = 8  # as in genai_smoke.mjs


def locked_versions() -> dict[str, str]:
    """The locked version of each direct dependency."""
    lock = json.loads((JS_DIR / "package-lock.json").read_text())
    wanted = json.loads((JS_DIR / "package.json").read_text())["dependencies"]
    return {name: str(lock["packages"][f"node_modules/{name}"]["version"]) for name in wanted}


def installed_versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in locked_versions():
        manifest = JS_DIR / "node_modules" / name / "package.json"
        found[name] = str(json.loads(manifest.read_text()).get("version")) if manifest.is_file() else None
    return found


@pytest.fixture(scope="module")
def node() -> str:
    """The node executable, with the locked packages installed into tests/api/js/node_modules."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed on PATH to run the @google/genai client")
    if installed_versions() != locked_versions():
        # A failure here (the npm registry unreachable, say) fails the test: it is not a reason to skip.
        result = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, f"npm ci failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        assert installed_versions() == locked_versions()
    return node


def run_smoke(node: str, server: Server, api_version: str | None) -> dict[str, Any]:
    # The client also reads GOOGLE_*/GEMINI_* variables (base URL, Vertex AI mode, API version, keys): leave them out.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GEMINI_"))}
    env.update(GEMSERVE_URL=server.url, GEMSERVE_API_KEY="anything")
    if api_version is not None:
        env["GEMSERVE_API_VERSION"] = api_version
    result = subprocess.run([node, str(SCRIPT)], cwd=JS_DIR, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"genai_smoke.mjs failed ({result.returncode}):\n{result.stderr}\n{result.stdout}"
    return dict(json.loads(result.stdout))


def check_answer(answer: dict[str, Any]) -> None:
    assert isinstance(answer["text"], str) and answer["text"]
    assert answer["finishReason"] in ("MAX_TOKENS", "STOP")
    assert answer["index"] == 0 and answer["role"] == "model"
    usage = answer["usage"]
    assert usage["promptTokenCount"] > 0 and 0 < usage["candidatesTokenCount"] <= MAX_OUTPUT_TOKENS
    assert usage["totalTokenCount"] == usage["promptTokenCount"] + usage["candidatesTokenCount"]
    assert answer["modelVersion"] == "gemma-3-270m"
    assert answer["responseId"]


# None: the client's own default, which is v1 for @google/genai 3.x.
@pytest.mark.parametrize("api_version", [None, "v1beta"], ids=["default-version", "v1beta"])
def test_google_genai_js_client(node: str, server: Server, api_version: str | None) -> None:
    out = run_smoke(node, server, api_version)
    version = api_version or "v1"
    assert out["apiVersion"] == version and out["requestUrl"] == f"{server.url}/{version}"

    whole = out["generate"]
    check_answer(whole)

    stream = out["stream"]
    assert stream["text"] == whole["text"]
    assert stream["finishReason"] == whole["finishReason"]
    assert stream["finishReasons"][:-1] == [None] * (stream["chunks"] - 1)
    # The stream repeats the prompt, so it may start from the kept prefix and report it (implicit caching).
    def counts(usage: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in usage.items() if k != "cachedContentTokenCount"}

    assert counts(stream["usage"]) == counts(whole["usage"])
    assert stream["modelVersion"] == "gemma-3-270m"
    if whole["usage"]["candidatesTokenCount"] > 1:
        assert stream["chunks"] > 1

    assert out["countTokens"]["totalTokens"] == whole["usage"]["promptTokenCount"]

    model = out["get"]
    assert model["name"] == "models/gemma-3-270m"
    assert model["inputTokenLimit"] == 8192 and model["outputTokenLimit"] == 8192  # --context-size 8192
    assert "generateContent" in model["supportedActions"]
    assert model["temperature"] == 1.0 and model["topP"] == 0.95 and model["topK"] == 64
    assert "models/gemma-3-270m" in out["list"]
    assert all(name.startswith("models/") for name in out["list"])

    chat = out["chat"]
    first, second = chat["first"], chat["second"]
    check_answer(first)
    check_answer(second)
    assert chat["historyRoles"] == ["user", "model", "user", "model"]
    # The second turn's prompt holds the first exchange (question and answer) as well as the new question.
    first_usage, second_usage = first["usage"], second["usage"]
    assert second_usage["promptTokenCount"] > first_usage["promptTokenCount"] + first_usage["candidatesTokenCount"]


def test_vercel_ai_sdk(node: str, server: Server) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GEMINI_"))}
    env["GEMSERVE_URL"] = server.url
    result = subprocess.run([node, str(JS_DIR / "aisdk_smoke.mjs")], cwd=JS_DIR, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"aisdk_smoke.mjs failed ({result.returncode}):\n{result.stderr}\n{result.stdout}"
    out = json.loads(result.stdout)
    assert out["plain"]["text"] and out["plain"]["finishReason"] in ("stop", "length")
    # The tool ran, and the loop went on to a text answer.
    assert out["tool"]["cities"] and out["tool"]["steps"] >= 2 and out["tool"]["text"]
    assert isinstance(out["object"]["name"], str) and isinstance(out["object"]["age"], int)
    assert out["stream"]["parts"] > 1 and out["stream"]["text"] and out["stream"]["finishReason"] in ("stop", "length")


def test_google_genai_js_code_execution(node: str, server: Server) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GEMINI_"))}
    env.update(GEMSERVE_URL=server.url, GEMSERVE_API_KEY="anything")
    result = subprocess.run([node, str(JS_DIR / "genai_code_execution.mjs")], cwd=JS_DIR, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"genai_code_execution.mjs failed:\n{result.stderr}\n{result.stdout}"
    out = json.loads(result.stdout)
    kinds = out["kinds"]
    assert "executableCode" in kinds and kinds[kinds.index("executableCode") + 1] == "codeExecutionResult", kinds
    code = next(p["executableCode"] for p in out["parts"] if "executableCode" in p)
    assert code["language"] == "PYTHON" and out["executableCode"] == code["code"]  # the client's accessor
    result_part = next(p["codeExecutionResult"] for p in out["parts"] if "codeExecutionResult" in p)
    assert result_part["outcome"] in ("OUTCOME_OK", "OUTCOME_FAILED", "OUTCOME_DEADLINE_EXCEEDED")
    assert out["finishReason"] in ("STOP", "MAX_TOKENS")


def test_google_genai_js_safety_settings(node: str, server: Server) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GEMINI_"))}
    env.update(GEMSERVE_URL=server.url, GEMSERVE_API_KEY="anything")
    result = subprocess.run([node, str(JS_DIR / "genai_safety.mjs")], cwd=JS_DIR, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"genai_safety.mjs failed ({result.returncode}):\n{result.stderr}\n{result.stdout}"
    out = json.loads(result.stdout)
    blocked = out["blocked"]
    assert blocked["blockReason"] == "SAFETY" and blocked["candidates"] == 0 and blocked["text"] is None
    dangerous = [r for r in blocked["ratings"] if r["category"] == "HARM_CATEGORY_DANGEROUS_CONTENT"]
    assert dangerous and dangerous[0]["blocked"] is True and dangerous[0]["probability"] != "NEGLIGIBLE"
    assert out["streamed"] == [{"blockReason": "SAFETY", "candidates": 0}]
    fine = out["fine"]
    assert fine["text"] and fine["finishReason"] in ("STOP", "MAX_TOKENS")
    assert len(fine["ratings"]) == 5 and not any(r.get("blocked") for r in fine["ratings"])
    assert len(fine["promptRatings"]) == 5
