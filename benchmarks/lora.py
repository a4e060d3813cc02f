"""LoRA serving benchmark: single-stream decode with a tuned model's adapter against the base model, on one
gemserve server, and the server's peak memory with the default model and one adapter loaded.

One run: start `gemserve serve` on a free port of 127.0.0.1 (its own data dir, sharing the assembled model and
converted weights with --data-dir), tune a tiny job through the API (two examples, one step: the adapter is
close to zero, so the tuned model continues text like the base and decodes the full 128 tokens; its cost per
token is the same as any rank-8 adapter's), then alternate greedy 128-token streamed decodes of the base model
and the tuned model and report tokens/s for each (median of --runs) and their ratio. Rates are
(candidatesTokenCount - 1) / (time from the first to the last streamed chunk). Peak RSS is VmHWM of the server.

    python benchmarks/lora.py [--data-dir DIR] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from serving import start_server, stop_server

PROMPT = "The history of the printing press begins in the fifteenth century, when"
NEW_TOKENS = 128
TIMEOUT_S = 900


def tune(url: str) -> str:
    body = {"baseModel": "models/gemma-3-270m", "displayName": "bench adapter",
            "tuningTask": {"trainingData": {"examples": {"examples": [{"textInput": "a", "output": "b"},
                                                                       {"textInput": "c", "output": "d"}]}},
                           "hyperparameters": {"epochCount": 1, "batchSize": 2}}}
    op = httpx.post(f"{url}/tunedModels", json=body, timeout=60).json()
    deadline = time.monotonic() + TIMEOUT_S
    while not op.get("done") and time.monotonic() < deadline:
        time.sleep(1)
        op = httpx.get(f"{url}/{op['name']}", timeout=60).json()
    if "response" not in op:
        raise SystemExit(f"tuning did not succeed: {op}")
    return str(op["response"]["name"])


def decode_rate(url: str, model: str) -> tuple[float, int]:
    body = {"contents": [{"parts": [{"text": PROMPT}]}],
            "generationConfig": {"temperature": 0, "maxOutputTokens": NEW_TOKENS}}
    first = last = 0.0
    tokens = 0
    with httpx.stream("POST", f"{url}/{model}:streamGenerateContent?alt=sse", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            now = time.perf_counter()
            first = first or now
            last = now
            tokens = json.loads(line[6:])["usageMetadata"]["candidatesTokenCount"]
    return (tokens - 1) / (last - first), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="a data dir whose models/ and hf/ "
                        "(assembled model, converted weights) are shared")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    shared = args.data_dir.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        own = Path(tmp)
        for sub in ("models", "hf"):
            (shared / sub).mkdir(parents=True, exist_ok=True)
            (own / sub).symlink_to(shared / sub)
        base_url, process = start_server(own)
        url = f"{base_url}/v1beta"
        try:
            started = time.perf_counter()
            tuned = tune(url)
            print(f"tuned {tuned} in {time.perf_counter() - started:.0f} s")
            decode_rate(url, "models/gemma-3-270m")  # warm both paths (prefix cache, adapter load)
            decode_rate(url, tuned)
            base_rates, tuned_rates = [], []
            for _ in range(args.runs):
                base_rates.append(decode_rate(url, "models/gemma-3-270m"))
                tuned_rates.append(decode_rate(url, tuned))
            status = Path(f"/proc/{process.pid}/status").read_text()
            peak = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))
        finally:
            stop_server(process)
    base = statistics.median(r for r, _ in base_rates)
    with_adapter = statistics.median(r for r, _ in tuned_rates)
    print(f"tokens per run: base {[n for _, n in base_rates]}, adapter {[n for _, n in tuned_rates]}")
    print("| measure | value |\n|---|---:|")
    print(f"| decode without adapter (tokens/s) | {base:.1f} |")
    print(f"| decode with adapter (tokens/s) | {with_adapter:.1f} |")
    print(f"| ratio with / without | {with_adapter / base:.2f} |")
    print(f"| server peak RSS, default model + one adapter (MiB) | {int(peak) / 1024:.0f} |")


if __name__ == "__main__":
    main()
