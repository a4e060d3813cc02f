"""Malformed requests: every one gets a 4xx google.rpc.Status naming the problem; none gets a 5xx."""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx
import pytest

from tests.conftest import API_KEY, Server

GOOD = {"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 2}}
GEN = "/v1beta/models/gemma-3-270m:generateContent"


def with_config(**config: Any) -> dict[str, Any]:
    return {"contents": GOOD["contents"], "generationConfig": {"maxOutputTokens": 2, **config}}


# (id, method, path, body (dict, raw str or None), status, words the message must contain)
CASES: list[tuple[str, str, str, Any, int, str]] = [
    ("broken json", "POST", GEN, '{"contents": [', 400, "Invalid JSON payload"),
    ("body not an object", "POST", GEN, "[1, 2]", 400, "Expected an object"),
    ("not utf-8", "POST", GEN, b"\xff\xfe{}", 400, "UTF-8"),
    ("no contents", "POST", GEN, {}, 400, "contents is not specified"),
    ("empty contents", "POST", GEN, {"contents": []}, 400, "contents is not specified"),
    ("empty parts", "POST", GEN, {"contents": [{"parts": []}]}, 400, "parts must not be empty"),
    ("part without data", "POST", GEN, {"contents": [{"parts": [{}]}]}, 400, "contents[0].parts[0]"),
    ("bad role", "POST", GEN, {"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}, 400,
     "valid role: user, model"),
    ("unknown top-level field", "POST", GEN, {**GOOD, "contnets": []}, 400, 'Unknown name "contnets"'),
    ("unknown config field", "POST", GEN, with_config(temprature=1), 400,
     'Unknown name "temprature" at \'generation_config\''),
    ("unknown part field", "POST", GEN, {"contents": [{"parts": [{"txt": "x"}]}]}, 400, 'Unknown name "txt"'),
    ("text not a string", "POST", GEN, {"contents": [{"parts": [{"text": 5}]}]}, 400, "contents[0].parts[0].text"),
    ("contents a string", "POST", GEN, {"contents": "hello"}, 400, "contents"),
    ("temperature too high", "POST", GEN, with_config(temperature=2.5), 400, "temperature"),
    ("temperature negative", "POST", GEN, with_config(temperature=-0.1), 400, "temperature"),
    ("temperature a word", "POST", GEN, with_config(temperature="hot"), 400, "generation_config.temperature"),
    ("top_p above one", "POST", GEN, with_config(topP=1.5), 400, "top_p"),
    ("top_k zero", "POST", GEN, with_config(topK=0), 400, "top_k"),
    ("max output tokens negative", "POST", GEN, with_config(maxOutputTokens=-1), 400, "max_output_tokens"),
    ("max output tokens too many", "POST", GEN, with_config(maxOutputTokens=100000), 400, "max_output_tokens"),
    ("six stop sequences", "POST", GEN, with_config(stopSequences=list("abcdef")), 400, "at most 5"),
    ("empty stop sequence", "POST", GEN, with_config(stopSequences=[""]), 400, "stop_sequences[0]"),
    ("candidate count zero", "POST", GEN, with_config(candidateCount=0), 400, "candidate_count"),
    ("candidate count nine", "POST", GEN, with_config(candidateCount=9), 400, "candidate_count"),
    ("logprobs without responseLogprobs", "POST", GEN, with_config(logprobs=3), 400, "response_logprobs"),
    ("logprobs too many", "POST", GEN, with_config(responseLogprobs=True, logprobs=21), 400, "logprobs"),
    ("presence penalty out of range", "POST", GEN, with_config(presencePenalty=3.0), 400, "presence_penalty"),
    ("frequency penalty out of range", "POST", GEN, with_config(frequencyPenalty=-2.5), 400, "frequency_penalty"),
    ("seed beyond int32", "POST", GEN, with_config(seed=2**40), 400, "seed"),
    ("unsupported response mime type", "POST", GEN, with_config(responseMimeType="application/xml"), 400,
     "response_mime_type"),
    ("schema with text/plain", "POST", GEN, with_config(responseSchema={"type": "STRING"}), 400,
     "response_mime_type"),
    ("bad safety category", "POST", GEN, {**GOOD, "safetySettings": [{"category": "HARM_CATEGORY_TOXICITY",
                                                                      "threshold": "BLOCK_NONE"}]}, 400, "category"),
    ("unknown safety enum", "POST", GEN, {**GOOD, "safetySettings": [{"category": "NOPE", "threshold": 1}]}, 400,
     "safety_settings[0].category"),
    ("duplicate safety category", "POST", GEN, {**GOOD, "safetySettings": [
        {"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"},
        {"category": "HARM_CATEGORY_HARASSMENT", "threshold": "OFF"}]}, 400, "more than once"),
    ("image part that is no image", "POST", GEN,
     {"contents": [{"parts": [{"inlineData": {"mimeType": "image/png", "data": "AA=="}}]}]}, 400,
     "contents[0].parts[0].inline_data.mime_type"),
    ("bad function name", "POST", GEN, {**GOOD, "tools": [{"functionDeclarations": [{"name": "f g"}]}]}, 400,
     "function_declarations[0].name"),
    ("search tool", "POST", GEN, {**GOOD, "tools": [{"googleSearch": {}}]}, 400, "google_search"),
    ("unknown cached content", "POST", GEN, {**GOOD, "cachedContent": "cachedContents/x"}, 403,
     "CachedContent not found"),
    ("field in both spellings", "POST", GEN, {**GOOD, "generation_config": {}}, 400, "Duplicate field"),
    ("prompt longer than the window", "POST", GEN, {"contents": [{"parts": [{"text": "word " * 9000}]}]}, 400,
     "exceeds the maximum number of tokens"),
    ("unknown model", "POST", "/v1beta/models/nope:generateContent", GOOD, 404, "models/nope is not found"),
    ("unknown model get", "GET", "/v1beta/models/nope", None, 404, "models/nope is not found"),
    ("unknown method", "POST", "/v1beta/models/gemma-3-270m:explode", GOOD, 404, "not found"),
    ("unknown api version", "GET", "/v2/models", None, 404, "not found"),
    ("unknown route", "GET", "/v1beta/nothing-here", None, 404, "not found"),
    ("bad page token", "GET", "/v1beta/models?pageToken=zzz", None, 400, "page_token"),
    ("count tokens without contents", "POST", "/v1beta/models/gemma-3-270m:countTokens", {}, 400, "contents"),
    ("empty text", "POST", GEN, {"contents": [{"parts": [{"text": ""}]}]}, 400, "empty text parameter"),
    ("deeply nested", "POST", GEN, "[" * 5000 + "]" * 5000, 400, "Nesting deeper"),
    ("lone surrogate", "POST", GEN, '{"contents": [{"parts": [{"text": "\\ud800"}]}]}', 400, "unpaired surrogate"),
    ("candidates beyond the context", "POST", GEN, {"contents": [{"parts": [{"text": "word " * 1100}]}],
                                                    "generationConfig": {"candidateCount": 8}}, 400,
     "do not fit the model's context"),
    ("count tokens with tools", "POST", "/v1beta/models/gemma-3-270m:countTokens",
     {"generateContentRequest": {**GOOD, "tools": [{"googleSearch": {}}]}}, 400, "tools"),
    ("body over the size limit", "POST", GEN, b" " * (32 * 1024 * 1024 + 1), 400, "payload size exceeds"),
    ("unknown query parameter", "GET", "/v1beta/models?foo=1", None, 400, "Cannot bind query parameter"),
    ("unknown alt", "POST", GEN + "?alt=weird", GOOD, 400, "Invalid value at 'alt'"),
    ("integer of 5000 digits", "POST", GEN, '{"generationConfig": {"maxOutputTokens": ' + "9" * 5000 + "}}", 400,
     "more than 40 digits"),
    ("stream with bad config", "POST", "/v1beta/models/gemma-3-270m:streamGenerateContent?alt=sse",
     with_config(topP=7), 400, "top_p"),
]


def send(server: Server, method: str, path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else (json.dumps(body) if body is not None else None)
    return httpx.request(method, server.url + path, content=content, timeout=60,
                         headers={"Content-Type": "application/json", **(headers or {})})


def assert_status(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status
    assert error["status"] in {400: ("INVALID_ARGUMENT", "FAILED_PRECONDITION"), 404: ("NOT_FOUND",),
                               403: ("PERMISSION_DENIED",)}[status]
    assert words.lower() in error["message"].lower(), error["message"]


@pytest.mark.parametrize(("name", "method", "path", "body", "status", "words"), CASES, ids=[c[0] for c in CASES])
def test_malformed_request(server: Server, name: str, method: str, path: str, body: Any, status: int,
                           words: str) -> None:
    assert_status(send(server, method, path, body), status, words)


def test_field_violation_detail_names_the_field(server: Server) -> None:
    error = send(server, "POST", GEN, with_config(topP=2)).json()["error"]
    assert error["details"][0]["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    assert error["details"][0]["fieldViolations"][0]["field"] == "generation_config.top_p"


def test_server_still_serves_after_the_table(server: Server) -> None:
    assert send(server, "POST", GEN, GOOD).status_code == 200


def test_extreme_but_valid_sampling_values_are_served(server: Server) -> None:
    greedy = send(server, "POST", GEN, with_config(temperature=0, maxOutputTokens=6)).json()
    tiny = send(server, "POST", GEN, with_config(temperature=1e-320, maxOutputTokens=6))
    assert tiny.status_code == 200, tiny.text  # a temperature that underflows is greedy, not a dead engine
    assert tiny.json()["candidates"][0]["content"] == greedy["candidates"][0]["content"]
    negative_seed = [send(server, "POST", GEN, with_config(seed=-1, temperature=1.5, maxOutputTokens=6))
                     for _ in range(2)]
    assert [r.status_code for r in negative_seed] == [200, 200]
    assert negative_seed[0].json()["candidates"] == negative_seed[1].json()["candidates"]
    assert send(server, "POST", GEN, GOOD).status_code == 200


def test_missing_key_is_permission_denied(keyed_server: Server) -> None:
    assert_status(send(keyed_server, "GET", "/v1beta/models", None), 403, "unregistered callers")


def test_wrong_key_is_invalid_argument_with_reason(keyed_server: Server) -> None:
    response = send(keyed_server, "POST", GEN, GOOD, {"x-goog-api-key": "wrong"})
    assert_status(response, 400, "API key not valid")
    assert response.json()["error"]["details"][0]["reason"] == "API_KEY_INVALID"


def test_key_in_header_or_query_is_accepted(keyed_server: Server) -> None:
    assert send(keyed_server, "POST", GEN, GOOD, {"x-goog-api-key": API_KEY}).status_code == 200
    assert send(keyed_server, "POST", f"{GEN}?key={API_KEY}", GOOD).status_code == 200


def test_keys_never_reach_the_log(keyed_server: Server) -> None:
    send(keyed_server, "POST", f"{GEN}?key={API_KEY}", GOOD)
    send(keyed_server, "POST", GEN, {"contents": [{"parts": [{"text": "secret user text"}]}]},
         {"x-goog-api-key": "wrong-key-value"})
    log = keyed_server.log.read_text()
    assert '"path": "/v1beta/models/gemma-3-270m:generateContent"' in log
    for secret in (API_KEY, "wrong-key-value", "secret user text"):
        assert secret not in log


def test_control_token_text_in_a_message_stays_text(server: Server) -> None:
    def count(text: str) -> int:
        response = send(server, "POST", "/v1beta/models/gemma-3-270m:countTokens",
                        {"contents": [{"parts": [{"text": text}]}]})
        return int(response.json()["totalTokens"])

    # "<end_of_turn>" written by a user is several ordinary tokens, not the one control token that ends a turn.
    assert count("hello<end_of_turn>") - count("hello") > 1


@pytest.mark.parametrize(("headers", "words"), [
    ({"Host": "attacker.example"}, "refused in open local mode"),  # DNS rebinding
    ({"Host": "attacker.example:8080"}, "refused in open local mode"),
    ({"Origin": "https://attacker.example"}, "cross-site requests"),
])
def test_open_mode_refuses_other_sites(server: Server, headers: dict[str, str], words: str) -> None:
    assert_status(send(server, "POST", GEN, GOOD, headers), 403, words)
    assert_status(send(server, "GET", "/v1beta/models", None, headers), 403, words)


def test_open_mode_serves_local_pages_and_addresses(server: Server) -> None:
    for headers in ({"Origin": "http://localhost:3000"}, {"Host": "localhost"}, {"Host": "[::1]:8080"}):
        assert send(server, "GET", "/v1beta/models", None, headers).status_code == 200, headers


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_bodies_must_be_json(server: Server, content_type: str) -> None:
    """A web page can send these cross-site without the browser asking the server first."""
    assert_status(send(server, "POST", GEN, GOOD, {"Content-Type": content_type}), 400, "send the request body as JSON")


@pytest.mark.parametrize("raw", [b"GARBAGE\r\n\r\n", b"GET /v1beta/models HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"],
                         ids=["request line", "header"])
def test_requests_that_are_not_http_get_a_status_body(server: Server, raw: bytes) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(raw)
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"application/json" in head
    error = json.loads(body)["error"]
    assert error["code"] == 400 and error["status"] == "INVALID_ARGUMENT" and "Invalid HTTP request" in error["message"]
