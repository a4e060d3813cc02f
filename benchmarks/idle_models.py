"""What an idle loaded model costs a busy one: single-stream decode of one built-in model, in process, with the
other built-in model loaded beside it and idle, against the same model loaded alone.

Three set-ups, each in a fresh process (libgomp's state is per process), alternating round after round:
  - alone: only the measured model's engine;
  - beside, released: the other model's engine loaded too and idle, as the server runs them (an idle engine lets
    its OpenMP worker threads go: `gemserve/engine/threads.py`);
  - beside, kept: the same, with that release turned off (what the server did before).
Each process decodes the same prompt greedily, 128 tokens, three times after a warm-up; the figure is the median
tokens/s (tokens - 1 over the time from the first to the last token), with the model's own repetition penalty.

    python benchmarks/idle_models.py [--model qwen2.5-coder-0.5b-instruct] [--data-dir ./data] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = {"qwen2.5-coder-0.5b-instruct": ("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 1.1),
          "gemma-3-270m": ("gemma-3-270m-q4_k_m.gguf", 1.0)}
PROMPT = "The history of the printing press begins in the fifteenth century, when"
SETUPS = ("alone", "beside, released", "beside, kept")


def child(model: str, other: str | None, release: bool, data_dir: Path) -> None:
    """Runs in a process of its own: print the decode rates as JSON."""
    import gemserve.engine.backends.llamacpp as llamacpp

    if not release:
        llamacpp.release_idle_threads = lambda: False  # type: ignore[assignment]
    from gemserve.engine.types import GenerationRequest, SamplingParams, TokenEvent

    models = data_dir / "models"
    idle = llamacpp.LlamaCppEngine(models / MODELS[other][0]) if other else None
    engine = llamacpp.LlamaCppEngine(models / MODELS[model][0])
    prompt = tuple(engine.tokenize(PROMPT, add_bos=True, parse_special=False))
    request = GenerationRequest(prompt, SamplingParams(temperature=0.0, repetition_penalty=MODELS[model][1]), 128)

    async def decode() -> float:
        times = []
        async for event in engine.generate(request):
            if isinstance(event, TokenEvent):
                times.append(time.perf_counter())
        return (len(times) - 1) / (times[-1] - times[0])

    asyncio.run(decode())  # warm-up
    print(json.dumps([asyncio.run(decode()) for _ in range(3)]))
    engine.close()
    if idle is not None:
        idle.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, other, release = args.child
        child(model, None if other == "-" else other, release == "1", args.data_dir)
        return
    other = next(name for name in MODELS if name != args.model)
    rates: dict[str, list[float]] = {setup: [] for setup in SETUPS}
    for round_ in range(args.rounds):
        for setup in SETUPS:
            flags = {"alone": ("-", "1"), "beside, released": (other, "1"), "beside, kept": (other, "0")}[setup]
            done = subprocess.run([sys.executable, __file__, "--data-dir", str(args.data_dir), "--child", args.model,
                                   *flags], capture_output=True, text=True, check=True)
            runs = json.loads(done.stdout.strip().splitlines()[-1])
            rates[setup] += runs
            print(f"round {round_ + 1}, {setup}: {', '.join(f'{r:.1f}' for r in runs)} tokens/s", flush=True)
    alone = statistics.median(rates["alone"])
    print(f"\n{args.model}, single-stream decode, medians of {3 * args.rounds} runs each (tokens/s):")
    for setup in SETUPS:
        median = statistics.median(rates[setup])
        print(f"- {setup}: {median:.1f} ({median / alone:.2f} of alone)")


if __name__ == "__main__":
    main()
