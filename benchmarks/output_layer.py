"""Output-layer benchmark: one forward pass of the default model at batch sizes 1-16, with gemserve's Q8_0
output layer and with llama.cpp's own, in one process.

Each configuration is a `LlamaModel` (the engine's llama.cpp wrapper, with the model's whole context as the
server has by default) loaded on a thread of its own, as the engine does. A step decodes one new token for each
of `batch` sequences (each already holding a 12-token prompt) and asks for logits at all of them, as continuous
batching does; the figure is the median of 40 steps. The two configurations alternate, --rounds times, so
background load hits both alike; the report gives the median of the rounds and the ratio.

    python benchmarks/output_layer.py [--data-dir DIR] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

from gemserve.engine.backends.llamacpp_model import LlamaModel

GGUF = Path("models") / "gemma-3-270m-q4_k_m.gguf"
BATCHES = (1, 2, 4, 8, 16)
STEPS = 40


def measure(path: Path, own_output_layer: bool) -> dict[int, float]:
    """Median milliseconds per step for each batch size, measured on a fresh thread (one OpenMP pool)."""
    result: dict[int, float] = {}
    failure: list[BaseException] = []

    def run() -> None:
        try:
            measure_here()
        except BaseException as exc:  # re-raised on the calling thread
            failure.append(exc)

    def measure_here() -> None:
        model = LlamaModel(path, context_size=None, sequences=max(BATCHES), threads=None, ubatch=512,
                           own_output_layer=own_output_layer)
        try:
            if model.output_layer != ("gemserve" if own_output_layer else "llama.cpp"):
                raise RuntimeError(f"asked for own_output_layer={own_output_layer}, got {model.output_layer}")
            prompt = model.tokenize("Write a long story about a dragon and a knight.", add_bos=True,
                                    parse_special=False)
            for batch in BATCHES:
                for seq in range(batch):
                    model.forget(seq)
                model.decode([(seq, 0, prompt, True) for seq in range(batch)])
                times = []
                for step in range(STEPS):
                    entries = [(seq, len(prompt) + step, [1000 + seq], True) for seq in range(batch)]
                    start = time.perf_counter()
                    model.decode(entries)
                    times.append(time.perf_counter() - start)
                result[batch] = statistics.median(times) * 1000
        finally:
            model.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="gemserve data dir with the model")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    path = args.data_dir / GGUF
    if not path.exists():
        sys.exit(f"{path} not found: start `gemserve serve --data-dir {args.data_dir}` once to assemble it")
    ours: list[dict[int, float]] = []
    theirs: list[dict[int, float]] = []
    for _ in range(args.rounds):
        ours.append(measure(path, True))
        theirs.append(measure(path, False))
    print("| sequences in the batch | gemserve's output layer (ms/step) | llama.cpp's (ms/step) | ratio "
          "| tokens/s, gemserve's | tokens/s, llama.cpp's |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch in BATCHES:
        mine = statistics.median(r[batch] for r in ours)
        base = statistics.median(r[batch] for r in theirs)
        print(f"| {batch} | {mine:.1f} | {base:.1f} | {mine / base:.2f} | {batch * 1000 / mine:.0f} "
              f"| {batch * 1000 / base:.0f} |")


if __name__ == "__main__":
    main()
