"""Context-caching benchmark: time to first token for a question on a ~4,000-token document, with the document in
a cachedContent against the same kind of document sent inline, in the same run; then again after a restart.

The server is started as `gemserve serve` starts it (all built-in models), on a data directory of its own that
shares the assembled model files. Each inline request carries a document no earlier request began with, so the
engine's reuse of recent prefixes cannot help it: that is a first question on a new document. Time to first
token is measured to the first streamed chunk (`alt=sse`). Rounds alternate cached and inline; medians.

    python benchmarks/caching.py [--data-dir ./data] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from serving import start_server, stop_server

ROOT = Path(__file__).parents[1]
MODEL = "gemini-2.5-flash"
QUESTION = "Which shelf holds the letters of the year 1820? Answer in a few words."


def document(seed: int) -> str:
    """About 4,000 tokens of records; `seed` changes the very first words, so no two documents share a prefix."""
    kinds = ("maps", "coins", "letters", "stamps", "photographs")
    lines = [f"Archive {seed}, inventory list."]
    lines += [f"Shelf {i}: {kinds[(i + seed) % 5]} of the year {1700 + (i * 7 + seed) % 300}." for i in range(330)]
    return "\n".join(lines)


def ttft(url: str, body: dict) -> float:
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1beta/models/{MODEL}:streamGenerateContent?alt=sse", json=body,
                      timeout=900) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data:"):
                return time.perf_counter() - started
    raise SystemExit("no chunk came back")


def cached_body(cache: str) -> dict:
    return {"cachedContent": cache, "contents": [{"role": "user", "parts": [{"text": QUESTION}]}],
            "generationConfig": {"maxOutputTokens": 8, "temperature": 0}}


def inline_body(seed: int) -> dict:
    return {"contents": [{"role": "user", "parts": [{"text": document(seed)}]},
                         {"role": "user", "parts": [{"text": QUESTION}]}],
            "generationConfig": {"maxOutputTokens": 8, "temperature": 0}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        own = Path(scratch)
        (own / "models").symlink_to(args.data_dir.resolve() / "models")
        url, process = start_server(own, "--no-tuning-worker")
        try:
            started = time.perf_counter()
            made = httpx.post(f"{url}/v1beta/cachedContents", timeout=900, json={
                "model": f"models/{MODEL}", "ttl": "3600s",
                "contents": [{"role": "user", "parts": [{"text": document(0)}]}]})
            made.raise_for_status()
            created = time.perf_counter() - started
            cache, tokens = made.json()["name"], made.json()["usageMetadata"]["totalTokenCount"]
            cached, inline = [], []
            for r in range(args.rounds):
                cached.append(ttft(url, cached_body(cache)))
                inline.append(ttft(url, inline_body(r + 1)))
        finally:
            stop_server(process)
        url, process = start_server(own, "--no-tuning-worker")
        try:
            restarted = [ttft(url, cached_body(cache)) for _ in range(args.rounds)]
        finally:
            stop_server(process)

    c, i, a = statistics.median(cached), statistics.median(inline), statistics.median(restarted)
    print(f"cached document: {tokens} tokens; creating the cache took {created:.1f} s")
    print("| request | TTFT (s) | inline / this |")
    print("|---|---|---|")
    print(f"| document inline | {i:.2f} | 1.0 |")
    print(f"| document in a cachedContent | {c:.2f} | {i / c:.1f} |")
    print(f"| the same, right after a restart | {a:.2f} | {i / a:.1f} |")
    print(json.dumps({"tokens": tokens, "create": created, "cached": cached, "inline": inline,
                      "restarted": restarted}), file=sys.stderr)


if __name__ == "__main__":
    main()
