"""Constrained-decoding benchmark: decode speed under a JSON schema against free decoding, in one process.

For each built-in model, one `LlamaCppEngine` (the server's engine, default settings apart from a 4096-token
context) decodes the same prompt twice per round: freely, and under a JSON schema whose one string property must
be long (so that the constrained runs produce exactly `--tokens` tokens; a free run may end sooner). Each figure
is decode tokens per second after the first token (the prefill is the same for both and left out). The two
alternate, --rounds times, so that background load hits both alike; the report gives the medians and the ratio
constrained / free, one sequence at a time and `--batch` sequences together.

    python benchmarks/constrained.py [--data-dir DIR] [--rounds 5] [--tokens 128] [--batch 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from gemserve.engine.backends.llamacpp import LlamaCppEngine
from gemserve.engine.types import GenerationRequest, SamplingParams, TokenEvent
from gemserve.models.catalog import DEFAULT_MODEL_ID, INSTRUCT_MODEL_ID, PACKAGED

SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 4000}}, "required": ["story"]}
GRAMMAR = "start: %json " + json.dumps({**SCHEMA, "x-guidance": {"whitespace_flexible": True,
                                                                   "whitespace_pattern": "(\\n {0,40}| )?"}})
PROMPT = "Write a long story about a dragon and a knight, as JSON with one field, story."


async def decode_rate(engine: LlamaCppEngine, prompt: list[int], tokens: int, batch: int, constrained: bool,
                      ) -> float:
    """Decode tokens per second over `batch` sequences, from each one's first token to its last."""

    async def one() -> tuple[float, float, int]:
        constraint = engine.compile_grammar(GRAMMAR) if constrained else None
        # No seed: a seeded request runs in a context of its own, unbatched (see docs/configuration.md).
        request = GenerationRequest(tuple(prompt), SamplingParams(temperature=0.7), tokens, constraint=constraint)
        first = last = 0.0
        count = 0
        async for event in engine.generate(request):
            if isinstance(event, TokenEvent):
                count += 1
                last = time.perf_counter()
                first = first or last
        if count < 2:
            raise RuntimeError(f"only {count} tokens: nothing to time")
        return first, last, count

    runs = await asyncio.gather(*(one() for _ in range(batch)))
    return sum(count - 1 for _, _, count in runs) / (max(r[1] for r in runs) - min(r[0] for r in runs))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="gemserve data dir with the models")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)
    print("| model | sequences | free (tokens/s) | JSON schema (tokens/s) | ratio |")
    print("|---|---:|---:|---:|---:|")
    for model_id in (DEFAULT_MODEL_ID, INSTRUCT_MODEL_ID):
        path = args.data_dir / "models" / PACKAGED[model_id]().file_name
        if not path.exists():
            sys.exit(f"{path} not found: start `gemserve serve --data-dir {args.data_dir}` once to assemble it")
        engine = LlamaCppEngine(path, context_size=4096, max_sequences=max(args.batch, 1))
        try:
            engine.compile_grammar(GRAMMAR)  # the vocabulary is prepared once, before timing
            prompt = engine.tokenize(PROMPT, add_bos=True, parse_special=False)
            for batch in (1, args.batch):
                free, bound = [], []
                for _ in range(args.rounds):
                    free.append(asyncio.run(decode_rate(engine, prompt, args.tokens, batch, False)))
                    bound.append(asyncio.run(decode_rate(engine, prompt, args.tokens, batch, True)))
                f, b = statistics.median(free), statistics.median(bound)
                print(f"| {model_id} | {batch} | {f:.1f} | {b:.1f} | {b / f:.2f} |", flush=True)
        finally:
            engine.close()


if __name__ == "__main__":
    main()
