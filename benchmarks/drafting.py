"""What drafted chains gain: decoding with drafts against decoding without them, in process, on one built-in model.

Where prompt lookup has nothing worth feeding, `LlamaCppEngine` may run a chain of passes through the layers alone,
guessing each next token from a shortlist, and compute the output layer once for the chain (`engine/drafting.py`).
This benchmark decodes the model's greedy answers (its chat template, at most 128 tokens) to free prompts and
prompts under a response schema (the grammar the server builds), with one engine that drafts and one that does not
(`drafting=False`; prompt lookup on in both, as the server runs them), alternating, --rounds times, after a warm-up
run on each. Each figure is decode tokens per second after the first token, the median of the rounds; the report
also says whether both engines gave the same tokens, and each answer's share of new prose is in its last column
(the tokens prompt lookup could not have proposed: no earlier occurrence of the 3 tokens before them). Prompts are
the user's text in the model's chat template, without the line the server adds to the system message under a
schema (with it, Gemma 3 270M answers the inventors prompt in 41 tokens, too few to measure decoding by).

    python benchmarks/drafting.py [--model gemma-3-270m] [--data-dir ./data] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from gemserve.engine.backends.llamacpp import LlamaCppEngine
from gemserve.engine.types import GenerationRequest, SamplingParams, TokenEvent
from gemserve.models.catalog import PACKAGED, packaged_gguf
from gemserve.models.chat_format import ChatFormat, Message
from gemserve.service.constraints import Answer, grammar

EXPLANATION = {"type": "object", "properties": {"topic": {"type": "string"}, "explanation": {"type": "string"}},
               "required": ["topic", "explanation"]}
INVENTORS = {"type": "array", "items": {"type": "object", "properties": {
    "name": {"type": "string"}, "country": {"type": "string"}, "invention": {"type": "string"},
    "description": {"type": "string"}}, "required": ["name", "country", "invention", "description"]}}
CASES: dict[str, tuple[str, dict[str, Any] | None]] = {
    "essay (free)": ("Write a long essay on the history of the printing press, from Gutenberg to the present day.",
                     None),
    "story (free)": ("Tell me a story about a dragon who learns to cook.", None),
    "steam engine (schema)": ("Explain how a steam engine works, in detail. Answer as JSON with a topic and an "
                              "explanation.", EXPLANATION),
    "inventors (schema)": ("List five famous inventors as JSON, each with name, country, invention and a long "
                           "description of their life.", INVENTORS),
}
NEW_TOKENS = 128


async def decode(engine: LlamaCppEngine, prompt: list[int], schema: dict[str, Any] | None) -> tuple[list[int], float]:
    constraint = None if schema is None else engine.compile_grammar(grammar(Answer(schema=schema), None, True) or "")
    request = GenerationRequest(tuple(prompt), SamplingParams(temperature=0.0), NEW_TOKENS, constraint=constraint)
    tokens: list[int] = []
    first = 0.0
    async for event in engine.generate(request):
        if isinstance(event, TokenEvent):
            tokens.append(event.token)
            if len(tokens) == 1:
                first = time.perf_counter()
    return tokens, (len(tokens) - 1) / (time.perf_counter() - first)


def new_share(prompt: list[int], answer: list[int]) -> float:
    """The share of `answer`'s tokens whose 3 tokens before had not occurred before (in the prompt or answer)."""
    tokens = prompt + answer
    seen = {tuple(tokens[j - 3 : j]) for j in range(3, len(prompt))}
    new = 0
    for i in range(len(prompt), len(tokens)):
        key = tuple(tokens[i - 3 : i])
        new += key not in seen
        seen.add(key)
    return new / max(1, len(answer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(PACKAGED), default="gemma-3-270m")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    path = packaged_gguf(args.model, args.data_dir)
    engines = {drafting: LlamaCppEngine(path, drafting=drafting) for drafting in (False, True)}
    try:
        meta = engines[True].metadata
        chat = ChatFormat(meta.chat_template, meta.architecture, meta.bos_text, meta.eos_text)
        llm = engines[True]
        print(f"{args.model}, greedy, at most {NEW_TOKENS} tokens, {args.rounds} rounds alternating; drafting costs "
              f"{llm._draft_costs}")
        print("| answer | without drafts (tokens/s) | with drafts (tokens/s) | ratio | tokens | drafted / kept | "
              "same tokens | new prose |")
        print("|---|---:|---:|---:|---:|---|---|---:|")
        for name, (text, schema) in CASES.items():
            prompt = chat.prompt_ids([Message("user", text)],
                                     lambda piece, special: llm.tokenize(piece, add_bos=False, parse_special=special),
                                     None)
            rates: dict[bool, list[float]] = {False: [], True: []}
            outputs: dict[bool, list[int]] = {}
            for engine in engines.values():  # warm-up: the grammar compiles, the prompt's cache is kept
                asyncio.run(decode(engine, prompt, schema))
            counts = (llm.drafted_tokens, llm.draft_accepted)
            for i in range(args.rounds):
                for drafting in ((False, True) if i % 2 == 0 else (True, False)):
                    tokens, rate = asyncio.run(decode(engines[drafting], prompt, schema))
                    outputs.setdefault(drafting, tokens)
                    rates[drafting].append(rate)
            drafted = (llm.drafted_tokens - counts[0]) // args.rounds
            kept = (llm.draft_accepted - counts[1]) // args.rounds
            plain, fast = statistics.median(rates[False]), statistics.median(rates[True])
            print(f"| {name} | {plain:.1f} | {fast:.1f} | {fast / plain:.2f} | {len(outputs[True])} | "
                  f"{drafted} / {kept} | {'yes' if outputs[False] == outputs[True] else 'NO'} | "
                  f"{new_share(prompt, outputs[True]):.2f} |")
    finally:
        for engine in engines.values():
            engine.close()


if __name__ == "__main__":
    main()
