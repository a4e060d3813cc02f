"""What feeding grammar-forced tokens ahead gains: constrained decoding with proposals against one token a pass.

Under a JSON schema or function declarations, the grammar often leaves one way to go on (a key name where the keys
come in a fixed order, the rest of a function's name): `LlamaCppEngine` feeds those tokens in the same forward
pass as the next one and keeps them where decoding one at a time would have chosen them (prompt lookup's
proposals otherwise). This benchmark decodes, in process, the instruct model's greedy answers under two
grammars the server builds (a function call with mode ANY, and a list of objects under a response schema), with
one engine that proposes and one that does not (`lookup=False`), alternating, --rounds times, after a warm-up
run on each (so that every measured run starts from the prompt's kept cache). Each figure is decode tokens per
second after the first token; the report also says whether both engines gave the same tokens.

    python benchmarks/forced_tokens.py [--data-dir ./data] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from gemserve.engine.backends.llamacpp import LlamaCppEngine
from gemserve.engine.types import GenerationRequest, SamplingParams, TokenEvent
from gemserve.models.catalog import INSTRUCT_MODEL_ID, packaged_gguf
from gemserve.service.constraints import Answer, grammar
from gemserve.service.tools import Function, ToolPlan

ARGUMENTS = {"type": "object", "properties": {
    "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer"}}, "required": ["city", "unit", "days"]}
FUNCTIONS = (Function("get_weather_forecast", "The forecast for a city.", ARGUMENTS),
             Function("get_current_weather_report", "The weather now in a city.", ARGUMENTS))
EVENTS = {"type": "array", "items": {"type": "object", "properties": {
    "year": {"type": "integer"}, "place": {"type": "string"}, "people": {"type": "array", "items": {"type": "string"}},
    "description": {"type": "string"}}, "required": ["description", "people", "place", "year"]}}
CASES = {
    "function call (mode ANY)": (
        grammar(Answer(), ToolPlan(FUNCTIONS, "ANY", tuple(f.name for f in FUNCTIONS)), True),
        "<|im_start|>system\nYou may call get_weather_forecast(city, unit, days) and "
        "get_current_weather_report(city, unit, days).<|im_end|>\n<|im_start|>user\nWhat will the weather be in "
        "Paris over the next three days, in celsius?<|im_end|>\n<|im_start|>assistant\n"),
    "JSON under a response schema": (
        grammar(Answer(schema=EVENTS), None, True),
        "<|im_start|>user\nDescribe the history of the printing press as a list of five events, each with its "
        "year, place, the people involved and a short description. Answer in JSON.<|im_end|>\n"
        "<|im_start|>assistant\n"),
}
NEW_TOKENS = 128


async def decode(engine: LlamaCppEngine, grammar_text: str, prompt: str) -> tuple[list[int], float]:
    request = GenerationRequest(tuple(engine.tokenize(prompt, add_bos=False, parse_special=True)),
                                SamplingParams(temperature=0.0), NEW_TOKENS,
                                constraint=engine.compile_grammar(grammar_text))
    tokens: list[int] = []
    first = 0.0
    async for event in engine.generate(request):
        if isinstance(event, TokenEvent):
            tokens.append(event.token)
            if len(tokens) == 1:
                first = time.perf_counter()
    return tokens, (len(tokens) - 1) / (time.perf_counter() - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    path = packaged_gguf(INSTRUCT_MODEL_ID, args.data_dir)
    engines = {proposing: LlamaCppEngine(path, lookup=proposing) for proposing in (False, True)}
    try:
        print(f"{INSTRUCT_MODEL_ID}, greedy, at most {NEW_TOKENS} tokens, {args.rounds} rounds alternating")
        print("| answer | one token a pass (tokens/s) | with proposals (tokens/s) | ratio | tokens | "
              "forced / proposed / kept | same tokens |")
        print("|---|---:|---:|---:|---:|---|---|")
        for name, (grammar_text, prompt) in CASES.items():
            rates: dict[bool, list[float]] = {False: [], True: []}
            outputs: dict[bool, list[int]] = {}
            counts = (engines[True].forced_tokens, engines[True].proposed_tokens, engines[True].accepted_tokens)
            for engine in engines.values():  # warm-up: the grammar compiles, the prompt's cache is kept
                asyncio.run(decode(engine, grammar_text, prompt))
            for _ in range(args.rounds):
                for proposing, engine in engines.items():
                    tokens, rate = asyncio.run(decode(engine, grammar_text, prompt))
                    outputs.setdefault(proposing, tokens)
                    rates[proposing].append(rate)
            after = (engines[True].forced_tokens, engines[True].proposed_tokens, engines[True].accepted_tokens)
            per_run = " / ".join(str((b - a) // (args.rounds + 1)) for a, b in zip(counts, after, strict=True))
            plain, fast = statistics.median(rates[False]), statistics.median(rates[True])
            print(f"| {name} | {plain:.1f} | {fast:.1f} | {fast / plain:.2f} | {len(outputs[True])} | {per_run} | "
                  f"{'yes' if outputs[False] == outputs[True] else 'NO'} |")
    finally:
        for engine in engines.values():
            engine.close()


if __name__ == "__main__":
    main()
