"""Seeded-request benchmark: what a context of its own costs a seeded request, in one process.

A request with a seed runs in a llama.cpp context of its own, unbatched, so that its output does not depend on
what else runs (docs/configuration.md). For each built-in model, one `LlamaCppEngine` (the server's engine,
4096-token context) decodes `--batch` requests at once, without seeds and with seeds (each its own), alternating,
--rounds times; and one request alone, likewise. Each figure is decode tokens per second over all sequences from
the first token to the last, plus the time to the first token; the report gives medians and the ratios
seeded / unseeded.

    python benchmarks/seeded.py [--data-dir DIR] [--rounds 5] [--tokens 64] [--batch 8]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

from gemserve.engine.backends.llamacpp import LlamaCppEngine
from gemserve.engine.types import GenerationRequest, SamplingParams, TokenEvent
from gemserve.models.catalog import DEFAULT_MODEL_ID, INSTRUCT_MODEL_ID, PACKAGED

PROMPT = "Story {}: write a long story about a dragon and a knight who become friends."


async def run(engine: LlamaCppEngine, prompt: list[int], tokens: int, batch: int, seeded: bool,
              ) -> tuple[float, float]:
    """(decode tokens per second over the batch, median seconds to the first token)."""
    started = time.perf_counter()

    async def one(index: int) -> tuple[float, float, int]:
        params = SamplingParams(temperature=0.7, seed=index if seeded else None)
        first = last = 0.0
        count = 0
        async for event in engine.generate(GenerationRequest(tuple(prompt), params, tokens)):
            if isinstance(event, TokenEvent):
                count += 1
                last = time.perf_counter()
                first = first or last
        return first, last, count

    runs = await asyncio.gather(*(one(i) for i in range(batch)))
    decoded = sum(count - 1 for _, _, count in runs)
    rate = decoded / (max(r[1] for r in runs) - min(r[0] for r in runs))
    return rate, statistics.median(r[0] - started for r in runs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="gemserve data dir with the models")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    print("| model | sequences | unseeded (tokens/s) | seeded (tokens/s) | ratio "
          "| first token, unseeded / seeded (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for model_id in (DEFAULT_MODEL_ID, INSTRUCT_MODEL_ID):
        path = args.data_dir / "models" / PACKAGED[model_id]().file_name
        if not path.exists():
            sys.exit(f"{path} not found: start `gemserve serve --data-dir {args.data_dir}` once to assemble it")
        engine = LlamaCppEngine(path, context_size=4096, max_sequences=max(args.batch, 1))
        try:
            for batch in (1, args.batch):
                plain, seeded = [], []
                for i in range(args.rounds):
                    # A prompt of its own each run: no run starts from another's kept cache.
                    prompt = engine.tokenize(PROMPT.format(f"{batch}-{i}a"), add_bos=True, parse_special=False)
                    plain.append(asyncio.run(run(engine, prompt, args.tokens, batch, False)))
                    prompt = engine.tokenize(PROMPT.format(f"{batch}-{i}b"), add_bos=True, parse_special=False)
                    seeded.append(asyncio.run(run(engine, prompt, args.tokens, batch, True)))
                p = statistics.median(r for r, _ in plain)
                s = statistics.median(r for r, _ in seeded)
                pf = statistics.median(f for _, f in plain)
                sf = statistics.median(f for _, f in seeded)
                print(f"| {model_id} | {batch} | {p:.1f} | {s:.1f} | {s / p:.2f} | {pf:.2f} / {sf:.2f} |", flush=True)
        finally:
            engine.close()


if __name__ == "__main__":
    main()
