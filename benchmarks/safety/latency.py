"""Safety latency benchmark: what rating costs a request, through a server started as `gemserve serve` starts it
(all built-in models; the default classifier).

Each round sends the same kind of streamed request (`alt=sse`, 128 output tokens, greedy, a harmless prompt of
its own) three ways, alternating: without safety settings (nothing is rated), with BLOCK_NONE for all five
categories (the prompt and the finished answer are rated, nothing is held back), and with BLOCK_LOW_AND_ABOVE
for all five (the prompt before generation; the answer in windows of 8, then 32 tokens, each held back until rated). The
report gives medians of the time to the first text and to the last chunk, and their ratios to the request
without settings.

    python benchmarks/safety/latency.py [--data-dir ./data] [--rounds 5]
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

sys.path.insert(0, str(Path(__file__).parents[1]))
from serving import start_server, stop_server  # noqa: E402

ROOT = Path(__file__).parents[2]
MODEL = "gemini-2.5-flash"
CATEGORIES = ["HARM_CATEGORY_SEXUALLY_EXPLICIT", "HARM_CATEGORY_HATE_SPEECH", "HARM_CATEGORY_HARASSMENT",
              "HARM_CATEGORY_DANGEROUS_CONTENT", "HARM_CATEGORY_CIVIC_INTEGRITY"]
WAYS = {"no safety settings": None, "BLOCK_NONE (rated)": "BLOCK_NONE",
        "BLOCK_LOW_AND_ABOVE (rated, windows held)": "BLOCK_LOW_AND_ABOVE"}


def body(round_: int, threshold: str | None) -> dict:
    request: dict = {"contents": [{"role": "user", "parts": [{"text": f"Note {round_}. Write a long, friendly guide to "
                                                              "growing tomatoes on a balcony."}]}],
                     "generationConfig": {"maxOutputTokens": 128, "temperature": 0}}
    if threshold is not None:
        request["safetySettings"] = [{"category": c, "threshold": threshold} for c in CATEGORIES]
    return request


def timed(url: str, request: dict) -> tuple[float, float, int, str]:
    """(seconds to the first text, seconds to the last chunk, output tokens, finish reason)."""
    started = time.perf_counter()
    first = 0.0
    tokens, finish = 0, ""
    with httpx.stream("POST", f"{url}/v1beta/models/{MODEL}:streamGenerateContent?alt=sse", json=request,
                      timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[6:])
            candidate = (chunk.get("candidates") or [{}])[0]
            if not first and any(p.get("text") for p in (candidate.get("content") or {}).get("parts", [])):
                first = time.perf_counter() - started
            finish = candidate.get("finishReason") or finish
            tokens = chunk["usageMetadata"].get("candidatesTokenCount") or tokens
    return first, time.perf_counter() - started, tokens, finish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float, int, str]]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory() as scratch:
        own = Path(scratch)
        (own / "models").symlink_to(args.data_dir.resolve() / "models")
        url, process = start_server(own, "--no-tuning-worker")
        try:
            timed(url, body(-1, "BLOCK_NONE"))  # the classifier trains on its first use
            for r in range(args.rounds):
                for k, (way, threshold) in enumerate(WAYS.items()):  # a prompt of its own: no reused prefix
                    results[way].append(timed(url, body(len(WAYS) * r + k, threshold)))
        finally:
            stop_server(process)
    base_first = statistics.median(x[0] for x in results["no safety settings"])
    base_total = statistics.median(x[1] for x in results["no safety settings"])
    print("| request | first text (s) | ratio | whole answer (s) | ratio | tokens |")
    print("|---|---|---|---|---|---|")
    for way, runs in results.items():
        first, total = statistics.median(x[0] for x in runs), statistics.median(x[1] for x in runs)
        print(f"| {way} | {first:.3f} | {first / base_first:.2f} | {total:.2f} | {total / base_total:.2f} | "
              f"{statistics.median(x[2] for x in runs)} |")
    print(json.dumps(results), file=sys.stderr)


if __name__ == "__main__":
    main()
