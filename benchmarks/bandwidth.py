"""How close single-stream decode is to the machine's memory bandwidth, for each built-in model, in process.

A forward pass over one token reads every weight matrix of the model once: the transformer layers and the output
matrix (the token embeddings where the model ties them), all far larger than the CPU's caches. So a pass cannot
take less than (bytes of those matrices) / (the rate at which the machine reads memory), and one that takes about
that long leaves nothing to gain for one token a pass: only more tokens a pass (prompt lookup, batching) go
faster.

What one run measures, alternating, --rounds times:
  - the machine's read rate: two threads (the engine's count on two cores) each reduce half of a 1 GiB buffer
    with numpy (a sum of 64-bit floats, which keeps up with memory), GB/s of the fastest of
    5 reads;
  - each model's single-token pass: `LlamaModel` as the engine loads it (gemserve's products, attention and
    output layer), one sequence holding a 200-token context, one new token with logits, median ms of 50 passes;
    the bytes it reads are the GGUF file's tensor sizes (all but the token embeddings, unless the model reads
    its output layer from them).
The figure: the floor, bytes / read rate, as a fraction of the pass measured in the same round (1.0: the pass
runs at the speed of memory), median of the rounds. The read rate of a shared machine moves by a third from one
minute to the next; a round measures both within a few seconds.

    python benchmarks/bandwidth.py [--data-dir ./data] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import gguf
import numpy as np

from gemserve.engine.backends.llamacpp_model import LlamaModel
from gemserve.models.catalog import packaged_gguf

MODELS = ("gemma-3-270m", "qwen2.5-coder-0.5b-instruct")
BUFFER_BYTES = 1 << 30
READS = 5
THREADS = 2
CONTEXT_TOKENS = 200
PASSES = 50


def read_rate(buffer: np.ndarray) -> float:
    """GB/s of the fastest of READS reads of the whole buffer by THREADS threads, each reducing its part."""
    parts = np.array_split(buffer, THREADS)
    best = float("inf")
    for _ in range(READS):
        threads = [threading.Thread(target=np.add.reduce, args=(part,)) for part in parts]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        best = min(best, time.perf_counter() - start)
    return buffer.nbytes / best / 1e9


def bytes_per_token(path: Path) -> int:
    """Bytes of the matrices a single-token pass reads: every tensor but the token embeddings, of which it reads
    one row, unless there is no output matrix, where the output layer multiplies by the embeddings."""
    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    embeddings = tensors.pop("token_embd.weight", 0)
    return sum(tensors.values()) + (0 if "output.weight" in tensors else embeddings)


def pass_ms(model: LlamaModel) -> float:
    """Median ms of PASSES single-token passes of one sequence after a CONTEXT_TOKENS-token context."""
    text = " The printing press was invented in 1440 by Johannes Gutenberg in the city of Mainz, Germany."
    piece = model.tokenize(text, add_bos=False, parse_special=False)
    context = (piece * (CONTEXT_TOKENS // len(piece) + 1))[:CONTEXT_TOKENS]
    model.forget(0)
    model.decode([(0, 0, context, False)])
    times = []
    for _ in range(PASSES):
        model.forget(0, CONTEXT_TOKENS)
        start = time.perf_counter()
        model.decode([(0, CONTEXT_TOKENS, [piece[0]], True)])
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="gemserve data dir with the models")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    buffer = np.ones(BUFFER_BYTES // 8, dtype=np.float64)
    models = {name: packaged_gguf(name, args.data_dir) for name in MODELS}
    loaded = {name: LlamaModel(path, context_size=4096, sequences=1, threads=None, ubatch=512)
              for name, path in models.items()}
    rates: list[float] = []
    passes: dict[str, list[float]] = {name: [] for name in MODELS}
    try:
        for _ in range(args.rounds):
            rates.append(read_rate(buffer))
            for name, model in loaded.items():
                passes[name].append(pass_ms(model))
    finally:
        for model in loaded.values():
            model.close()
    sizes = {name: bytes_per_token(path) for name, path in models.items()}
    print(f"memory read rate, {THREADS} threads, per round: {' '.join(f'{r:.1f}' for r in rates)} GB/s")
    print()
    print("| model | bytes read a token (MB) | single-token pass (ms), per round | floor at that round's read rate "
          "(ms) | floor / pass, median of rounds |")
    print("|---|---:|---|---|---:|")
    for name in MODELS:
        floors = [sizes[name] / (rate * 1e9) * 1000 for rate in rates]
        ratio = statistics.median(f / p for f, p in zip(floors, passes[name], strict=True))
        print(f"| {name} | {sizes[name] / 1e6:.0f} | {' '.join(f'{p:.1f}' for p in passes[name])} "
              f"| {' '.join(f'{f:.1f}' for f in floors)} | {ratio:.2f} |")

if __name__ == "__main__":
    main()
