"""Q5_0 products: gemserve's kernel (`engine/backends/_q5_0.c`) against llama.cpp's own, same process, alternating.

Two parts:
- `kernel`: one thread multiplies random Q5_0 matrices shaped like Qwen2.5-Coder-0.5B's (per layer: 896 x 896
  attention output, 4864 x 896 gate and up; 24 layers, 160 MB, more than the caches hold) by batches of n
  tokens, with the kernel (its packed copy, with AVX-512 VNNI where the CPU has it and with AVX2) and with
  llama.cpp's `llamafile_sgemm` (tinyBLAS, what llama.cpp runs for n >= 2; for one token, which tinyBLAS
  declines, the kernel's path without the copy, which reads llama.cpp's rows, stands beside it).
- `q6_k`: one thread multiplies Qwen's 12 Q6_K matrices (random, 43 MB) by n tokens with the kernel, AVX-512
  VNNI and AVX2.
- `passes`: a model's forward passes as the engine runs them, with the kernel, with it for all but Q4_K or Q6_K
  (those left to llama.cpp) and without it (`q5_0_set_enabled`, `k_quant_set_enabled` for Q6_K and Q4_K),
  alternating: a pass over 1..9 tokens of one sequence (prompt lookup and grammar-forced tokens feed such passes),
  and a pass over one token of each of 8 sequences (8 streams).
- `prompts`: a prompt of --tokens tokens (chunks of 512 and the rest) as llama.cpp computes prompts (its tiled products
  and attention from 32 tokens on), with gemserve's attention for every pass, and with that and no tiled products
  (`q5_0_attention_set_max_rows`, `q5_0_set_tiled_from`), alternating; and whether the prompt's last logits are
  the same bits when its cells sit in another cache slot, or when it is computed in other chunks.

    .venv/bin/python benchmarks/q5_0.py kernel
    .venv/bin/python benchmarks/q5_0.py q6_k
    .venv/bin/python benchmarks/q5_0.py passes --model data/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
    .venv/bin/python benchmarks/q5_0.py prompts --model data/models/gemma-3-270m-q4_k_m.gguf
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gemserve.engine.backends import q5_0
from gemserve.engine.backends.llamacpp_model import LlamaModel

Q5_0_BLOCK = np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)])
Q8_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", 32)])
I64, PTR = ctypes.c_int64, ctypes.c_void_p


class Params(ctypes.Structure):
    _fields_ = [("ith", ctypes.c_int), ("nth", ctypes.c_int)]


def best(run: Callable[[], object], rounds: int) -> float:
    run()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def kernel(rounds: int) -> None:
    lib = q5_0.install()
    if lib is None:
        raise SystemExit(f"the kernel is not in use: {q5_0.describe()}")
    import llama_cpp

    llama_cpp.llama_backend_init()  # ggml's fp16 table, which llama.cpp's products read
    cpu = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so.0"), mode=ctypes.RTLD_GLOBAL)
    sgemm = cpu.llamafile_sgemm
    sgemm.restype = ctypes.c_bool
    sgemm.argtypes = [PTR, I64, I64, I64, PTR, I64, PTR, I64, PTR, I64, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    rng = np.random.default_rng(0)
    k = 28
    shapes = [896, 4864, 4864] * 24
    matrices = []
    for rows in shapes:
        a = np.zeros((rows, k), Q5_0_BLOCK)
        a["d"] = rng.uniform(1e-3, 2e-2, a.shape)
        a["qh"] = rng.integers(0, 2**32, a.shape, dtype=np.uint64).astype(np.uint32)
        a["qs"] = rng.integers(0, 256, (rows, k, 16))
        size = lib.q5_0_packed_bytes(rows, k)
        raw = np.zeros(size + 32, np.uint8)
        packed = raw[-raw.ctypes.data % 32:][:size]
        lib.q5_0_pack(a.ctypes.data, rows, k, k, packed.ctypes.data)
        matrices.append((a, packed))
    print(f"{sum(a.nbytes for a, _ in matrices) / 1e6:.0f} MB of Q5_0, {sum(p.nbytes for _, p in matrices) / 1e6:.0f}"
          " MB packed; one thread; best of rounds, ms")
    vnni = bool(lib.q5_0_use_vnni(1))
    print(f"| tokens | gemserve's kernel{' (AVX-512 VNNI)' if vnni else ''} | the same, AVX2 | llama.cpp (tinyBLAS) "
          "| llama.cpp / kernel |")
    print("|---:|---:|---:|---:|---:|")
    params = Params(0, 1)
    unpacked_ms = 0.0
    for n in (1, 2, 4, 8, 9, 64):
        x = np.zeros((n, k), Q8_0_BLOCK)
        x["d"] = rng.uniform(1e-3, 5e-2, x.shape)
        x["qs"] = rng.integers(-127, 128, (n, k, 32))
        outs = [np.zeros((n, a.shape[0]), np.float32) for a, _ in matrices]

        def ours(n: int, x: np.ndarray, outs: list[np.ndarray]) -> None:
            for (a, packed), out in zip(matrices, outs, strict=True):
                lib.q5_0_multiply(packed.ctypes.data, a.shape[0], k, n, x.ctypes.data, k, out.ctypes.data,
                                  a.shape[0], 0, 1)

        def tinyblas(n: int, x: np.ndarray, outs: list[np.ndarray]) -> None:
            for (a, _), out in zip(matrices, outs, strict=True):
                sgemm(ctypes.byref(params), a.shape[0], n, k, a.ctypes.data, k, x.ctypes.data, k, out.ctypes.data,
                      a.shape[0], 6, 8, 0)

        def unpacked(n: int, x: np.ndarray, outs: list[np.ndarray]) -> None:
            for (a, _), out in zip(matrices, outs, strict=True):
                lib.q5_0_multiply_one(a.ctypes.data, a.shape[0], k, k, x.ctypes.data, out.ctypes.data, 0, 1)

        times: dict[str, list[float]] = {}
        for _ in range(2):  # alternating
            for name, run in (("vnni", ours), ("avx2", ours), ("theirs", unpacked if n == 1 else tinyblas)):
                lib.q5_0_use_vnni(int(name != "avx2"))  # the path without a copy as it runs here
                times.setdefault(name, []).append(best(functools.partial(run, n, x, outs), rounds))
            lib.q5_0_use_vnni(1)
        mine, avx2, theirs = min(times["vnni"]), min(times["avx2"]), min(times["theirs"])
        if n == 1:
            print(f"| 1 | {mine:.1f} | {avx2:.1f} | declines one token | |", flush=True)
            unpacked_ms = theirs
        else:
            print(f"| {n} | {mine:.1f} | {avx2:.1f} | {theirs:.1f} | {theirs / mine:.2f} |", flush=True)
    print(f"\nOne token through the kernel's path without its copy (llama.cpp's rows, where memory for the copy ran "
          f"out): {unpacked_ms:.1f} ms.")


Q6_K_BLOCK = np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")])
Q8_K_BLOCK = np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)])
Q4_K, Q6_K = q5_0.K_QUANT_TYPES["Q4_K"], q5_0.K_QUANT_TYPES["Q6_K"]


def q6_k(rounds: int) -> None:
    """The Q6_K kernel alone, one thread: Qwen's 12 Q6_K matrices (ffn_down, 896 x 4864), from their packed
    copies (more than the caches hold), by n tokens; llama.cpp's own is timed within whole passes (`passes`),
    since it multiplies one row by one token a call."""
    lib = q5_0.install()
    if lib is None:
        raise SystemExit(f"the kernel is not in use: {q5_0.describe()}")
    rng = np.random.default_rng(0)
    rows, k = 896, 19
    matrices = []
    for _ in range(12):
        a = np.zeros((rows, k), Q6_K_BLOCK)
        a["ql"] = rng.integers(0, 256, (rows, k, 128))
        a["qh"] = rng.integers(0, 256, (rows, k, 64))
        a["scales"] = rng.integers(-128, 128, (rows, k, 16))
        a["d"] = rng.uniform(1e-4, 1e-3, a.shape)
        packed = np.zeros(lib.k_quant_packed_bytes(Q6_K, rows, k), np.uint8)
        lib.k_quant_pack(Q6_K, a.ctypes.data, rows, k, k, packed.ctypes.data)
        matrices.append((a, packed))
    megabytes = sum(p.nbytes for _, p in matrices) / 1e6
    print(f"{megabytes:.0f} MB packed; one thread; best of rounds, ms (GB/s of the copy read)")
    print("| tokens | AVX-512 VNNI | AVX2 |")
    print("|---:|---:|---:|")
    for n in (1, 2, 4, 8, 9, 16):
        x = np.zeros((n, k), Q8_K_BLOCK)
        x["d"] = rng.uniform(1e-3, 5e-2, x.shape)
        x["qs"] = rng.integers(-128, 128, (n, k, 256))
        x["bsums"] = x["qs"].reshape(n, k, 16, 16).astype(np.int64).sum(axis=-1)
        out = np.zeros((n, rows), np.float32)

        def run(x: np.ndarray = x, out: np.ndarray = out, n: int = n) -> None:
            for a, packed in matrices:
                lib.k_quant_multiply(Q6_K, packed.ctypes.data, a.ctypes.data, k, rows, k, n, x.ctypes.data, k,
                                     out.ctypes.data, rows, 0, 1)

        times = {}
        for vnni in (1, 0):
            if lib.q5_0_use_vnni(vnni) == vnni:
                times[vnni] = best(run, rounds)
        lib.q5_0_use_vnni(1)
        cells = [f"{times[v]:.2f} ({megabytes / times[v]:.1f})" if v in times else "no VNNI" for v in (1, 0)]
        print(f"| {n} | " + " | ".join(cells) + " |", flush=True)


def passes(model_path: Path, rounds: int) -> None:
    if q5_0.install() is None:
        raise SystemExit(f"the kernel is not in use: {q5_0.describe()}")
    model = LlamaModel(model_path, context_size=4096, sequences=9, threads=None, ubatch=512)
    prompt = model.tokenize("Write a long essay on the history of the printing press, from Gutenberg to the "
                            "present day.", add_bos=True, parse_special=False)
    filler = prompt[1:] * 4

    def one_sequence(size: int) -> Callable[[], None]:
        def run() -> None:
            model.forget(0, len(prompt))
            model.decode([(0, len(prompt), filler[:size], True)])
        return run

    def eight_streams() -> None:
        for seq in range(1, 9):
            model.forget(seq, len(prompt))
        model.decode([(seq, len(prompt), [filler[seq]], True) for seq in range(1, 9)])

    model.decode([(0, 0, prompt, False)])
    for seq in range(1, 9):
        model.decode([(seq, 0, prompt, False)])
    cases = [(f"{size} tokens of one sequence", one_sequence(size)) for size in range(1, 10)]
    cases.append(("1 token of each of 8 sequences", eight_streams))
    lib = q5_0.install()
    assert lib is not None
    # (all, Q6_K, Q4_K)
    modes = {"kernel": (1, 1, 1), "kernel, Q4_K llama.cpp's": (1, 1, 0), "kernel, Q6_K llama.cpp's": (1, 0, 1),
             "llama.cpp": (0, 1, 1)}
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for name, run in cases:
            for mode, (everything, q6_k, q4_k) in modes.items():
                lib.q5_0_set_enabled(everything)
                lib.k_quant_set_enabled(Q6_K, q6_k)
                lib.k_quant_set_enabled(Q4_K, q4_k)
                results.setdefault((name, mode), []).append(best(run, 3))
    lib.q5_0_set_enabled(1)
    lib.k_quant_set_enabled(Q6_K, 1)
    lib.k_quant_set_enabled(Q4_K, 1)
    single = {mode: statistics.median(results[(cases[0][0], mode)]) for mode in modes}
    print(f"{model_path.name}: medians of {rounds} alternating rounds (best of 3 each), ms, and in single-token passes")
    print("| pass | " + " | ".join(modes) + " | " + " | ".join(f"{mode}, single-token passes" for mode in modes) + " |")
    print("|---|" + "---:|" * (2 * len(modes)))
    for name, _ in cases:
        ms = {mode: statistics.median(results[(name, mode)]) for mode in modes}
        print(f"| {name} | " + " | ".join(f"{ms[mode]:.1f}" for mode in modes) + " | "
              + " | ".join(f"{ms[mode] / single[mode]:.2f}" for mode in modes) + " |")
    model.close()


SHORT_PROMPTS = (33, 36, 40, 64, 100, 200)


def prompts(model_path: Path, rounds: int, length: int) -> None:
    lib = q5_0.install()
    if lib is None:
        raise SystemExit(f"the kernel is not in use: {q5_0.describe()}")
    model = LlamaModel(model_path, context_size=8192, sequences=4, threads=None, ubatch=512)
    text = (length // 10) * "The printing press was invented around 1440 by Johannes Gutenberg in Mainz. It allowed "
    tokens = model.tokenize(text, add_bos=True, parse_special=False)[:length]
    everything = 1 << 40
    modes = {"llama.cpp's paths for prompts": (32, 32), "gemserve's attention": (everything, 32),
             "gemserve's attention, no tiled products": (everything, everything)}

    def prompt(seq: int, chunks: list[int]) -> np.ndarray:
        model.forget(seq)
        at = 0
        for size in chunks:
            if not model.decode([(seq, at, tokens[at:at + size], True)]):
                raise SystemExit("no room in the cache for the prompt")
            at += size
        return np.array(model.logits(chunks[-1] - 1))

    whole = [min(512, len(tokens) - at) for at in range(0, len(tokens), 512)]
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    same: dict[str, str] = {}
    for r in range(rounds):
        for mode in (list(modes) if r % 2 == 0 else list(modes)[::-1]):
            rows, tiled = modes[mode]
            lib.q5_0_attention_set_max_rows(rows)
            lib.q5_0_set_tiled_from(tiled)
            times[mode].append(best(lambda: prompt(3, whole), 1))
            if r == 0:  # the same prompt in slot 0, then in slot 1 (other cells), then in other chunks; and
                # shorter prompts whole against their last token alone (a kept cache continued)
                first = prompt(0, whole)
                checks = [(first, prompt(1, whole)), (first, prompt(1, [100, 412, len(tokens) - 513, 1]))]
                gaps = [float(np.abs(prompt(2, [n]) - prompt(2, [n - 1, 1])).max()) for n in SHORT_PROMPTS]
                same[mode] = " / ".join("same" if np.array_equal(a, b) else
                                        f"differ by up to {np.abs(a - b).max():.3f}" for a, b in checks)
                same[mode] += " / " + ("same" if max(gaps) == 0 else f"differ by up to {max(gaps):.3f}")
    lib.q5_0_attention_set_max_rows(everything)  # the defaults back
    lib.q5_0_set_tiled_from(everything)
    base = statistics.median(times[next(iter(modes))])
    print(f"{model_path.name}: {len(tokens)}-token prompt, medians of {rounds} alternating rounds")
    print("| prompts through | ms | ratio | last logits: other cache slot / other chunks / prompts of "
          + ", ".join(map(str, SHORT_PROMPTS)) + " tokens continued |")
    print("|---|---:|---:|---|")
    for mode in modes:
        ms = statistics.median(times[mode])
        print(f"| {mode} | {ms:.0f} | {ms / base:.2f} | {same[mode]} |")
    model.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["kernel", "q6_k", "passes", "prompts"])
    parser.add_argument("--model", type=Path, default=Path("data/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=1000, help="the prompt's length (prompts)")
    args = parser.parse_args()
    if args.part == "kernel":
        kernel(args.rounds)
    elif args.part == "q6_k":
        q6_k(args.rounds)
    elif args.part == "prompts":
        prompts(args.model, args.rounds, args.tokens)
    else:
        passes(args.model, args.rounds)


if __name__ == "__main__":
    main()
