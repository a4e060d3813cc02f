"""Embedding benchmark: documents per second through gemserve's batchEmbedContents against sentence-transformers
running the same model directory in process, in the same run.

gemserve's side is the whole request as a client sees it (HTTP, JSON both ways, tokenization, the forward pass);
sentence-transformers' side is `SentenceTransformer(dir).encode(texts)` with its defaults. For each batch size
(1, 16 and 100 documents of 40-80 words), the two alternate --rounds times so that background load hits both
alike; the report gives the medians and the ratio gemserve / sentence-transformers.

Runs in .venv-clients (which has sentence-transformers; scripts/clients-venv.sh makes it). Without --url it
starts `gemserve serve` from ./.venv on a free port with --data-dir.

    .venv-clients/bin/python benchmarks/embeddings.py [--url URL] [--data-dir ./data] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from serving import start_server, stop_server

ROOT = Path(__file__).parents[1]
SENTENCE = ("the river carried small stones past the old mill while farmers in the valley watched clouds gather "
            "over distant hills and talked about the harvest the price of grain and the new road to town")
WORDS = SENTENCE.split(" ")


def documents(count: int, seed: int) -> list[str]:
    """Distinct documents of 40-80 words."""
    out = []
    for i in range(count):
        n = 40 + (i * 7 + seed) % 41
        out.append(" ".join(WORDS[(i * 3 + seed + j * (1 + i % 5)) % len(WORDS)] for j in range(n)))
    return out


def model_dir() -> str:
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c",
                          "from gemserve.models.catalog import packaged_minilm; print(packaged_minilm())"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def rate(fn: Callable[[list[str]], object], texts: list[str]) -> float:
    started = time.perf_counter()
    fn(texts)
    return len(texts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None)
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(model_dir(), device="cpu")
    process = None
    url = args.url
    if url is None:
        url, process = start_server(args.data_dir, "--no-tuning-worker")
    client = httpx.Client(base_url=url, timeout=600)

    def gemserve(texts: list[str]) -> object:
        body = {"requests": [{"model": "models/text-embedding-004", "content": {"parts": [{"text": t}]}}
                             for t in texts]}
        response = client.post("/v1beta/models/text-embedding-004:batchEmbedContents", json=body)
        response.raise_for_status()
        return response.json()

    def sentence_transformers(texts: list[str]) -> object:
        return reference.encode(texts)

    try:
        gemserve(documents(4, 0))  # the server's model loads in the background: wait for it, and warm both up
        sentence_transformers(documents(4, 0))
        rows = []
        for size in (1, 16, 100):
            ours, theirs = [], []
            for r in range(args.rounds):
                texts = documents(size, r)
                ours.append(rate(gemserve, texts))
                theirs.append(rate(sentence_transformers, texts))
            rows.append((size, statistics.median(ours), statistics.median(theirs)))
    finally:
        client.close()
        if process is not None:
            stop_server(process)

    print("| batch | gemserve docs/s | sentence-transformers docs/s | ratio |")
    print("|---|---|---|---|")
    for size, ours_median, theirs_median in rows:
        print(f"| {size} | {ours_median:.1f} | {theirs_median:.1f} | {ours_median / theirs_median:.2f} |")
    print(json.dumps({"rounds": args.rounds, "rows": rows}), file=sys.stderr)


if __name__ == "__main__":
    main()
