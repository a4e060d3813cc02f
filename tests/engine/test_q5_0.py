"""gemserve's Q5_0, Q6_K and Q4_K kernels: their arithmetic on matrices built here, how they take products over from
llama.cpp (only of registered weights, handing the rest back), and the real model's logits with them and without."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from gemserve.engine.backends import q5_0
from gemserve.engine.backends.llamacpp_model import LlamaModel

KERNEL = q5_0.install()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="the Q5_0 kernel is not built, or this CPU lacks AVX2")

Q5_0_BLOCK = np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)])
Q8_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", 32)])
Q6_K_BLOCK = np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")])
Q4_K_BLOCK = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)])
Q8_K_BLOCK = np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)])
GGML_Q5_0, GGML_Q8_0, GGML_F32, GGML_Q4_K, GGML_Q6_K, GGML_Q8_K = 6, 8, 0, 12, 14, 15


def q5_0_matrix(rng: np.random.Generator, rows: int, k: int, values: np.ndarray | None = None) -> np.ndarray:
    """Rows of k Q5_0 blocks in llama.cpp's layout; `values` (0..31, rows x 32k) or random ones."""
    u = rng.integers(0, 32, (rows, k * 32)) if values is None else values
    u = u.reshape(rows, k, 32).astype(np.uint32)
    blocks = np.zeros((rows, k), Q5_0_BLOCK)
    blocks["d"] = rng.uniform(1e-3, 2e-2, (rows, k))
    blocks["qs"] = (u[..., :16] & 15) | ((u[..., 16:] & 15) << 4)
    blocks["qh"] = ((u >> 4) << np.arange(32, dtype=np.uint32)).sum(axis=-1, dtype=np.uint32)
    return blocks


def q8_0_tokens(rng: np.random.Generator, n: int, k: int, values: np.ndarray | None = None) -> np.ndarray:
    blocks = np.zeros((n, k), Q8_0_BLOCK)
    blocks["d"] = rng.uniform(1e-3, 5e-2, (n, k))
    blocks["qs"] = rng.integers(-127, 128, (n, k, 32)) if values is None else values.reshape(n, k, 32)
    return blocks


def expected(a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(tokens x rows) as Q5_0 defines it: weights (u - 16) * d, exact sums in float64."""
    bits = (a["qh"][..., None] >> np.arange(32, dtype=np.uint32)) & 1
    u = np.concatenate([a["qs"] & 15, a["qs"] >> 4], axis=-1).astype(np.int64) | (bits.astype(np.int64) << 4)
    w = ((u - 16) * a["d"].astype(np.float64)[..., None]).reshape(a.shape[0], -1)
    t = (x["qs"].astype(np.float64) * x["d"].astype(np.float64)[..., None]).reshape(x.shape[0], -1)
    return t @ w.T


def q6_k_matrix(rng: np.random.Generator, rows: int, k: int, values: np.ndarray | None = None,
                scale: int | None = None) -> np.ndarray:
    """Rows of k Q6_K blocks in llama.cpp's layout: 6-bit values (0..63, rows x 256k) `values` or random ones;
    scales `scale` or random."""
    q = rng.integers(0, 64, (rows, k * 256)) if values is None else values
    q = q.reshape(rows, k, 256).astype(np.uint8)
    by_place = q.reshape(rows, k, 2, 4, 32)  # halves of 128, quarters of 32 within them
    low, top = by_place & 15, by_place >> 4
    ql = np.concatenate([low[..., 0, :] | low[..., 2, :] << 4, low[..., 1, :] | low[..., 3, :] << 4], axis=-1)
    qh = top[..., 0, :] | top[..., 1, :] << 2 | top[..., 2, :] << 4 | top[..., 3, :] << 6
    blocks = np.zeros((rows, k), Q6_K_BLOCK)
    blocks["ql"], blocks["qh"] = ql.reshape(rows, k, 128), qh.reshape(rows, k, 64)
    blocks["scales"] = rng.integers(-128, 128, (rows, k, 16)) if scale is None else scale
    blocks["d"] = rng.uniform(1e-4, 1e-3, (rows, k))
    return blocks


def q8_k_tokens(rng: np.random.Generator, n: int, k: int, values: np.ndarray | None = None) -> np.ndarray:
    blocks = np.zeros((n, k), Q8_K_BLOCK)
    blocks["d"] = rng.uniform(1e-3, 5e-2, (n, k))
    blocks["qs"] = rng.integers(-128, 128, (n, k, 256)) if values is None else values.reshape(n, k, 256)
    blocks["bsums"] = blocks["qs"].reshape(n, k, 16, 16).astype(np.int64).sum(axis=-1)
    return blocks


def pack(a: np.ndarray) -> np.ndarray:
    assert KERNEL is not None
    rows, k = a.shape
    size = KERNEL.q5_0_packed_bytes(rows, k)
    raw = np.zeros(size + 32, np.uint8)
    packed = raw[-raw.ctypes.data % 32:][:size]  # 32-byte aligned
    assert KERNEL.q5_0_pack(a.ctypes.data, rows, k, k, packed.ctypes.data)
    return packed


@pytest.fixture(params=["AVX-512 VNNI", "AVX2"])
def instruction_set(request: pytest.FixtureRequest) -> Iterator[str]:
    """The kernel's arithmetic with each instruction set this CPU has (AVX2's also on a CPU with VNNI)."""
    assert KERNEL is not None
    if request.param == "AVX-512 VNNI" and not KERNEL.q5_0_use_vnni(1):
        pytest.skip("this CPU lacks AVX-512 VNNI")
    if request.param == "AVX2":
        KERNEL.q5_0_use_vnni(0)
    yield request.param
    KERNEL.q5_0_use_vnni(1)


def multiply_one(a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """One token's products from the rows themselves (the path without a packed copy)."""
    assert KERNEL is not None
    rows, k = a.shape
    out = np.full(rows, np.nan, np.float32)
    assert KERNEL.q5_0_multiply_one(a.ctypes.data, rows, k, k, x.ctypes.data, out.ctypes.data, 0, 1)
    return out


def multiply(packed: np.ndarray, rows: int, k: int, x: np.ndarray, threads: int = 1) -> np.ndarray:
    assert KERNEL is not None
    out = np.full((x.shape[0], rows), np.nan, np.float32)
    for ith in range(threads):
        assert KERNEL.q5_0_multiply(packed.ctypes.data, rows, k, x.shape[0], x.ctypes.data, k, out.ctypes.data,
                                    rows, ith, threads)
    return out


@needs_kernel
@pytest.mark.parametrize("n", [1, 2, 5, 9, 33])
def test_packed_products_are_the_q5_0_products(n: int, instruction_set: str) -> None:
    rng = np.random.default_rng(n)
    rows, k = 96, 28  # Qwen2.5 0.5B's rows are 28 blocks wide
    a, x = q5_0_matrix(rng, rows, k), q8_0_tokens(rng, n, k)
    out = multiply(pack(a), rows, k, x, threads=3)  # 12 groups of rows over 3 threads' shares
    want = expected(a, x)
    assert np.abs(out - want).max() <= 1e-5 * np.abs(want).max()


@needs_kernel
def test_rows_further_apart_than_their_width(instruction_set: str) -> None:
    """A matrix whose rows are a view into wider ones (lda > k): the packed and lone-token paths read the right
    blocks."""
    assert KERNEL is not None
    rng = np.random.default_rng(3)
    rows, k, lda = 32, 5, 9
    wide, x = q5_0_matrix(rng, rows, lda), q8_0_tokens(rng, 3, k)
    size = KERNEL.q5_0_packed_bytes(rows, k)
    raw = np.zeros(size + 32, np.uint8)
    packed = raw[-raw.ctypes.data % 32:][:size]
    assert KERNEL.q5_0_pack(wide.ctypes.data, rows, k, lda, packed.ctypes.data)
    want = expected(np.ascontiguousarray(wide[:, :k]), x)
    out = multiply(packed, rows, k, x)
    assert np.abs(out - want).max() <= 1e-5 * np.abs(want).max()
    alone = np.zeros(rows, np.float32)
    assert KERNEL.q5_0_multiply_one(wide.ctypes.data, rows, k, lda, x[:1].ctypes.data, alone.ctypes.data, 0, 1)
    assert np.array_equal(alone, out[0])


def test_llama_cpp_imported_before_gemserve_keeps_its_own_products() -> None:
    """The kernel can only stand in for llama.cpp's function if it is loaded first; otherwise gemserve says so
    and llama.cpp serves untouched."""
    code = ("import llama_cpp\n"
            "from gemserve.engine.backends import q5_0\n"
            "assert q5_0.load() is None and q5_0.install() is None\n"
            "print(q5_0.describe())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("llama.cpp (")


@needs_kernel
def test_extreme_values_do_not_overflow_the_16_bit_sums(instruction_set: str) -> None:
    """AVX2 sums 4 byte products of a row in 16 bits: at most 8 * 31 * 128, within range. Every path: tokens in
    registers (3), each block unpacked once for all (5, AVX2), and one token from the rows themselves."""
    rng = np.random.default_rng(0)
    rows, k = 16, 4
    for weight, token in ((31, 127), (31, -128), (0, -128), (0, 127)):
        a = q5_0_matrix(rng, rows, k, values=np.full((rows, k * 32), weight))
        x = q8_0_tokens(rng, 5, k, values=np.full((5, k * 32), token))
        want = expected(a, x)
        for out, wanted in ((multiply(pack(a), rows, k, x[:3]), want[:3]), (multiply(pack(a), rows, k, x), want),
                            (multiply_one(a, x[:1]), want[0])):
            assert np.abs(out - wanted).max() <= 1e-5 * np.abs(wanted).max(), (weight, token)


@needs_kernel
@pytest.mark.parametrize("k", [28, 70])  # 70: the lone-token path goes over its rows in chunks of 32 blocks
def test_a_tokens_result_does_not_depend_on_the_rest_of_the_batch(k: int, instruction_set: str) -> None:
    """Bit for bit: in a batch or alone, from the packed copy or (a lone token's path) from llama.cpp's rows."""
    assert KERNEL is not None
    rng = np.random.default_rng(1)
    rows = 64
    a, x = q5_0_matrix(rng, rows, k), q8_0_tokens(rng, 7, k)
    packed = pack(a)
    together = multiply(packed, rows, k, x)
    assert np.abs(together - expected(a, x)).max() <= 1e-5 * np.abs(together).max()
    for j in range(7):
        alone = multiply(packed, rows, k, x[j:j + 1])
        unpacked = np.full(rows, np.nan, np.float32)
        for ith in range(3):
            assert KERNEL.q5_0_multiply_one(a.ctypes.data, rows, k, k, x[j:j + 1].ctypes.data, unpacked.ctypes.data,
                                            ith, 3)
        assert np.array_equal(alone[0], together[j])
        assert np.array_equal(unpacked, together[j])


@needs_kernel
def test_avx512_vnni_and_avx2_give_the_same_bits() -> None:
    """Where the CPU has AVX-512 VNNI the kernel uses it; AVX2 computes the same integer sums and float steps."""
    assert KERNEL is not None
    if not KERNEL.q5_0_use_vnni(1):
        pytest.skip("this CPU lacks AVX-512 VNNI")
    rng = np.random.default_rng(5)
    rows, k = 48, 70
    a, x = q5_0_matrix(rng, rows, k), q8_0_tokens(rng, 6, k)
    packed = pack(a)
    results = {}
    try:
        for vnni in (1, 0):
            assert KERNEL.q5_0_use_vnni(vnni) == vnni
            alone = np.full(rows, np.nan, np.float32)
            assert KERNEL.q5_0_multiply_one(a.ctypes.data, rows, k, k, x[:1].ctypes.data, alone.ctypes.data, 0, 1)
            results[vnni] = (multiply(packed, rows, k, x, threads=2), alone)
    finally:
        KERNEL.q5_0_use_vnni(1)
    assert np.abs(results[1][0] - expected(a, x)).max() <= 1e-5 * np.abs(results[1][0]).max()
    for with_vnni, without in zip(results[1], results[0], strict=True):
        assert np.array_equal(with_vnni, without)


@needs_kernel
def test_extreme_q6_k_values_do_not_overflow(instruction_set: str) -> None:
    """AVX2 sums byte products in pairs in 16 bits (2 * 63 * 128 at most); scales at both ends, 6-bit values at
    both ends, tokens at -128 and 127."""
    rng = np.random.default_rng(0)
    rows, k = 16, 3
    for value, scale, token in ((63, 127, -128), (63, -128, -128), (0, -128, 127), (0, 127, -128), (63, 127, 127)):
        a = q6_k_matrix(rng, rows, k, values=np.full((rows, k * 256), value), scale=scale)
        x = q8_k_tokens(rng, 5, k, values=np.full((5, k * 256), token))
        want = expected_k_quant(a, x)
        for out in (multiply_k_quant(a, x), multiply_k_quant(a, x[:1]), multiply_k_quant(a, x, packed=False)):
            assert np.abs(out - want[:out.shape[0]]).max() <= 1e-5 * np.abs(want).max(), (value, scale, token)


def q4_k_matrix(rng: np.random.Generator, rows: int, k: int, values: np.ndarray | None = None,
                scale: int | None = None, low: int | None = None) -> np.ndarray:
    """Rows of k Q4_K blocks in llama.cpp's layout: 4-bit values `values` or random ones; 6-bit scales `scale`
    and mins `low` (each 0..63) or random."""
    q = rng.integers(0, 16, (rows, k * 256)) if values is None else values
    q = q.reshape(rows, k, 4, 2, 32).astype(np.uint8)  # 64 columns per 32 bytes: low nibbles, then high
    sc = rng.integers(0, 64, (rows, k, 8)) if scale is None else np.full((rows, k, 8), scale)
    mn = rng.integers(0, 64, (rows, k, 8)) if low is None else np.full((rows, k, 8), low)
    packed = np.zeros((rows, k, 12), np.uint8)  # llama.cpp's 12 bytes of 6-bit scales and mins
    packed[..., 0:4] = sc[..., :4] | (sc[..., 4:] >> 4) << 6
    packed[..., 4:8] = mn[..., :4] | (mn[..., 4:] >> 4) << 6
    packed[..., 8:12] = (sc[..., 4:] & 15) | (mn[..., 4:] & 15) << 4
    blocks = np.zeros((rows, k), Q4_K_BLOCK)
    blocks["qs"] = (q[..., 0, :] | q[..., 1, :] << 4).reshape(rows, k, 128)
    blocks["scales"] = packed
    blocks["d"] = rng.uniform(1e-4, 1e-3, (rows, k))
    blocks["dmin"] = rng.uniform(1e-4, 1e-3, (rows, k))
    return blocks


@needs_kernel
def test_extreme_q4_k_values_do_not_overflow(instruction_set: str) -> None:
    """AVX2 sums byte products in pairs in 16 bits (2 * 15 * 128 at most); scales and mins at both ends, 4-bit
    values at both ends, tokens at -128 and 127."""
    rng = np.random.default_rng(0)
    rows, k = 16, 3
    for value, scale, low, token in ((15, 63, 63, -128), (15, 63, 0, 127), (0, 0, 63, -128), (15, 63, 63, 127),
                                     (0, 63, 63, 127)):
        a = q4_k_matrix(rng, rows, k, values=np.full((rows, k * 256), value), scale=scale, low=low)
        x = q8_k_tokens(rng, 5, k, values=np.full((5, k * 256), token))
        want = expected_k_quant(a, x)
        for out in (multiply_k_quant(a, x), multiply_k_quant(a, x[:1]), multiply_k_quant(a, x, packed=False)):
            assert np.abs(out - want[:out.shape[0]]).max() <= 1e-5 * np.abs(want).max(), (value, scale, low, token)


def k_quant_matrix(kind: str, rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    """Random rows of k blocks of a K-quant, "Q6_K" or "Q4_K"."""
    return q6_k_matrix(rng, rows, k) if kind == "Q6_K" else q4_k_matrix(rng, rows, k)


def k_quant_type(a: np.ndarray) -> int:
    return GGML_Q6_K if a.dtype == Q6_K_BLOCK else GGML_Q4_K


def expected_k_quant(a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(tokens x rows) with the weights as gguf's reference dequantizes them, exact sums in float64."""
    w = dequantize(np.ascontiguousarray(a).view(np.uint8).reshape(a.shape[0], -1),
                   GGMLQuantizationType(k_quant_type(a)))
    t = (x["qs"].astype(np.float64) * x["d"].astype(np.float64)[..., None]).reshape(x.shape[0], -1)
    return t @ w.astype(np.float64).T


def multiply_k_quant(a: np.ndarray, x: np.ndarray, packed: bool = True, threads: int = 1, k: int | None = None,
                     ) -> np.ndarray:
    """Products of the first k blocks of `a`'s rows (all by default) from a packed copy, or (packed False) from
    its rows, a block packed at a time."""
    assert KERNEL is not None
    kind = k_quant_type(a)
    rows, lda = a.shape
    k = lda if k is None else k
    copy = np.zeros(KERNEL.k_quant_packed_bytes(kind, rows, k), np.uint8)
    assert KERNEL.k_quant_pack(kind, a.ctypes.data, rows, k, lda, copy.ctypes.data)
    out = np.full((x.shape[0], rows), np.nan, np.float32)
    for ith in range(threads):
        assert KERNEL.k_quant_multiply(kind, copy.ctypes.data if packed else None, a.ctypes.data, lda, rows, k,
                                       x.shape[0], x.ctypes.data, k, out.ctypes.data, rows, ith, threads)
    return out


@needs_kernel
@pytest.mark.parametrize("kind", ["Q6_K", "Q4_K"])
@pytest.mark.parametrize("n", [1, 2, 3, 6, 7, 9, 17])
def test_packed_k_quant_products_are_the_products_whatever_the_batch(kind: str, n: int, instruction_set: str,
                                                                     ) -> None:
    """Q6_K (ffn_down of half the layers) and Q4_K (attention output, the other ffn_down): against gguf's own
    dequantization; a token's result is bit for bit the same alone as in a batch, and from the rows without a
    copy (each block packed in turn) as from the copy."""
    rng = np.random.default_rng(n)
    rows, k = 48, 19  # Qwen2.5 0.5B's ffn_down rows are 19 blocks wide
    a = k_quant_matrix(kind, rng, rows, k)
    x = q8_k_tokens(rng, n, k)
    together = multiply_k_quant(a, x, threads=4)  # 6 groups of rows over 4 threads' shares
    want = expected_k_quant(a, x)
    assert np.abs(together - want).max() <= 1e-5 * np.abs(want).max()
    assert np.array_equal(multiply_k_quant(a, x, packed=False, threads=2), together)
    for j in range(n):
        assert np.array_equal(multiply_k_quant(a, x[j:j + 1])[0], together[j])


@needs_kernel
@pytest.mark.parametrize("kind", ["Q6_K", "Q4_K"])
def test_k_quant_rows_further_apart_than_their_width(kind: str, instruction_set: str) -> None:
    """A view into wider rows (lda > k): the copy and the path without one read the right blocks."""
    rng = np.random.default_rng(8)
    rows, k, lda = 16, 3, 5
    wide = k_quant_matrix(kind, rng, rows, lda)
    x = q8_k_tokens(rng, 2, k)
    want = expected_k_quant(np.ascontiguousarray(wide[:, :k]), x)
    out = multiply_k_quant(wide, x, k=k)
    assert np.abs(out - want).max() <= 1e-5 * np.abs(want).max()
    assert np.array_equal(multiply_k_quant(wide, x, packed=False, k=k), out)


@needs_kernel
@pytest.mark.parametrize("kind", ["Q6_K", "Q4_K"])
def test_k_quants_with_avx512_vnni_and_avx2_give_the_same_bits(kind: str) -> None:
    assert KERNEL is not None
    if not KERNEL.q5_0_use_vnni(1):
        pytest.skip("this CPU lacks AVX-512 VNNI")
    rng = np.random.default_rng(6)
    a = k_quant_matrix(kind, rng, 32, 5)
    x = q8_k_tokens(rng, 11, 5)
    results = {}
    try:
        for vnni in (1, 0):
            assert KERNEL.q5_0_use_vnni(vnni) == vnni
            results[vnni] = multiply_k_quant(a, x, threads=2)
    finally:
        KERNEL.q5_0_use_vnni(1)
    assert np.array_equal(results[1], results[0])


class _Params(ctypes.Structure):
    _fields_ = [("ith", ctypes.c_int), ("nth", ctypes.c_int)]


def _sgemm(function: ctypes._CFuncPtr, a: np.ndarray, x: np.ndarray, threads: int = 2,
           types: tuple[int, int] = (GGML_Q5_0, GGML_Q8_0)) -> tuple[np.ndarray, bool]:
    """llama.cpp's call for a product of matrix `a` and tokens `x` (of `types`), by each of `threads` threads."""
    rows, k = a.shape
    out = np.zeros((x.shape[0], rows), np.float32)
    done = True
    for ith in range(threads):
        params = _Params(ith, threads)
        done &= bool(function(ctypes.byref(params), rows, x.shape[0], k, a.ctypes.data, k, x.ctypes.data, k,
                              out.ctypes.data, rows, *types, GGML_F32))
    return out, done


def _signature(function: ctypes._CFuncPtr) -> ctypes._CFuncPtr:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    function.restype = ctypes.c_bool
    function.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, i64, ptr, i64, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return function


@needs_kernel
def test_only_registered_weights_are_packed_and_the_rest_goes_back_to_llama_cpp(default_gguf: Path) -> None:
    """The function llama.cpp calls: a matrix outside every registered range gets llama.cpp's own result (bit for
    bit), one inside gets the kernel's, packed once, the same for a token alone as in a batch, and releasing the
    range frees the copy."""
    assert KERNEL is not None
    LlamaModel(default_gguf, context_size=256, sequences=1, threads=2, ubatch=64).close()  # llama.cpp initialized
    ours = _signature(KERNEL.llamafile_sgemm)
    import llama_cpp

    theirs = _signature(ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so.0"),
                                    mode=ctypes.RTLD_GLOBAL).llamafile_sgemm)
    rng = np.random.default_rng(2)
    rows, k = 64, 28
    a, x = q5_0_matrix(rng, rows, k), q8_0_tokens(rng, 4, k)
    matrices = KERNEL.q5_0_packed_matrices()
    handed_back, done = _sgemm(ours, a, x)
    llama_cpps, their_done = _sgemm(theirs, a, x)
    assert done and their_done
    assert np.array_equal(handed_back, llama_cpps)
    assert KERNEL.q5_0_packed_matrices() == matrices

    start = a.ctypes.data
    assert KERNEL.q5_0_add_range(start, start + a.nbytes)
    try:
        products = q5_0.products()
        kernels, done = _sgemm(ours, a, x)
        assert done
        assert q5_0.products() - products == rows * 4
        assert KERNEL.q5_0_packed_matrices() == matrices + 1
        assert np.array_equal(kernels, multiply(pack(a), rows, k, x))
        assert np.abs(kernels - llama_cpps).max() <= 1e-5 * np.abs(llama_cpps).max()
        one_token, done = _sgemm(ours, a, x[:1])  # llama.cpp's own declines one token; the kernel does not
        assert done
        assert np.array_equal(one_token[0], kernels[0])
        assert q5_0.products() - products == rows * 5
    finally:
        assert KERNEL.q5_0_release_range(start, start + a.nbytes) == 1
    assert KERNEL.q5_0_packed_matrices() == matrices


@needs_kernel
@pytest.mark.parametrize("kind", ["Q6_K", "Q4_K"])
def test_registered_k_quant_weights_are_multiplied_here_and_others_left_to_llama_cpp(default_gguf: Path,
                                                                                    kind: str) -> None:
    """llama.cpp asks its `llamafile_sgemm` for Q6_K and Q4_K products with tokens in Q8_K, which its own declines
    (it then multiplies token by token): the kernel declines too outside registered weights, and takes those
    inside."""
    assert KERNEL is not None
    LlamaModel(default_gguf, context_size=256, sequences=1, threads=2, ubatch=64).close()  # llama.cpp initialized
    ours = _signature(KERNEL.llamafile_sgemm)
    rng = np.random.default_rng(7)
    rows, k = 32, 19
    a = k_quant_matrix(kind, rng, rows, k)
    x = q8_k_tokens(rng, 3, k)

    def sgemm(tokens: np.ndarray) -> tuple[np.ndarray, bool]:
        return _sgemm(ours, a, tokens, types=(k_quant_type(a), GGML_Q8_K))

    matrices = KERNEL.q5_0_packed_matrices()
    assert not sgemm(x)[1]
    start = a.ctypes.data
    assert KERNEL.q5_0_add_range(start, start + a.nbytes)
    try:
        products = q5_0.k_quant_products(kind)
        out, done = sgemm(x)
        assert done and q5_0.k_quant_products(kind) - products == rows * 3
        assert KERNEL.q5_0_packed_matrices() == matrices + 1
        assert np.array_equal(out, multiply_k_quant(a, x))
        one, done = sgemm(x[:1])
        assert done and np.array_equal(one[0], out[0])
    finally:
        assert KERNEL.q5_0_release_range(start, start + a.nbytes) == 1
    assert KERNEL.q5_0_packed_matrices() == matrices


def _resident_kib(start: int) -> int:
    """Rss of this process's mapping that begins at `start`, from /proc/self/smaps."""
    found = False
    with open("/proc/self/smaps", encoding="utf-8") as smaps:
        for line in smaps:
            if not found and line.split("-", 1)[0] == f"{start:x}":
                found = True
            elif found and line.startswith("Rss:"):
                return int(line.split()[1])
    raise AssertionError("mapping not found")


@contextmanager
def _registered_file(path: Path, blocks: np.ndarray) -> Iterator[np.ndarray]:
    """`blocks` written to `path` and mapped from it read-only and shared, the mapping registered as a model's
    weights while the test uses it; on leaving, the range is released (freeing the one packed copy in it)."""
    assert KERNEL is not None
    blocks.tofile(path)
    a = np.memmap(path, dtype=blocks.dtype, mode="r", shape=blocks.shape)
    start = a.ctypes.data
    assert KERNEL.q5_0_add_file_range(start, start + a.nbytes)
    try:
        yield a
    finally:
        assert KERNEL.q5_0_release_range(start, start + a.nbytes) == 1


@needs_kernel
def test_a_packed_matrix_lets_go_of_its_pages_in_a_file_mapping(tmp_path: Path) -> None:
    """Once a matrix in a read-only mapping of a file is packed whole, its pages there are no longer resident
    (they come back from the file if read); the products stay the same, from the copy and from llama.cpp's path."""
    assert KERNEL is not None
    ours = _signature(KERNEL.llamafile_sgemm)
    rng = np.random.default_rng(4)
    matrix = q5_0_matrix(rng, 512, 28)
    x = q8_0_tokens(rng, 3, 28)
    with _registered_file(tmp_path / "weights", matrix) as a:
        start = a.ctypes.data
        want = expected(a, x)  # reads every page
        assert _resident_kib(start) * 1024 >= a.nbytes - 4096
        products, done = _sgemm(ours, a, x)
        assert done
        assert _resident_kib(start) == 0
        assert np.abs(products - want).max() <= 1e-5 * np.abs(want).max()
        again, done = _sgemm(ours, a, x)
        assert done and np.array_equal(again, products)
        assert np.array_equal(expected(a, x), want)  # the file's bytes, read again


@needs_kernel
@pytest.mark.parametrize("kind", ["Q6_K", "Q4_K"])
def test_a_packed_k_quant_matrix_lets_go_of_its_pages_in_a_file_mapping(kind: str, tmp_path: Path) -> None:
    """Like Q5_0's, a K-quant matrix's pages are let go once packed (prompts take the kernel too, not llama.cpp's
    tiled path); the products stay the same, and the file's bytes come back when read."""
    assert KERNEL is not None
    ours = _signature(KERNEL.llamafile_sgemm)
    rng = np.random.default_rng(9)
    matrix = k_quant_matrix(kind, rng, 64, 19)
    x = q8_k_tokens(rng, 2, 19)
    types = (k_quant_type(matrix), GGML_Q8_K)
    with _registered_file(tmp_path / "weights", matrix) as a:
        want = expected_k_quant(a, x)  # reads every page
        assert _resident_kib(a.ctypes.data) * 1024 >= a.nbytes - 4096
        out, done = _sgemm(ours, a, x, types=types)
        assert done
        assert _resident_kib(a.ctypes.data) <= 4  # whole pages only: the file's last one is partly another's
        assert np.abs(out - want).max() <= 1e-5 * np.abs(want).max()
        again, done = _sgemm(ours, a, x, types=types)
        assert done and np.array_equal(again, out)
        assert np.array_equal(expected_k_quant(a, x), want)  # the file's bytes, read again


@needs_kernel
def test_the_real_model_gives_the_same_logits_with_the_kernel_as_without(default_gguf: Path) -> None:
    """Gemma 3 270M keeps some matrices in Q5_0, Q6_K and Q4_K: a prompt's pass goes through the kernel, its
    log-probabilities agree with those from llama.cpp's own products as closely as llama.cpp's own batched and
    one-token passes agree
    (mean 0.13 there: each product's activations are rounded to 8 bits again, so float rounding carries), and
    closing the model frees the packed copies."""
    assert KERNEL is not None
    matrices = KERNEL.q5_0_packed_matrices()
    model = LlamaModel(default_gguf, context_size=512, sequences=1, threads=2, ubatch=64)
    try:
        prompt = model.tokenize("The history of printing began in China, long before Gutenberg built",
                                add_bos=True, parse_special=False)
        logits = {}
        for on in (True, False):
            q5_0.set_enabled(on)
            products, q6_k, q4_k = q5_0.products(), q5_0.k_quant_products("Q6_K"), q5_0.k_quant_products("Q4_K")
            model.forget(0)
            assert model.decode([(0, 0, prompt, True)])
            logits[on] = np.array(model.logits(len(prompt) - 1), np.float64)
            assert (q5_0.products() > products) == on
            assert (q5_0.k_quant_products("Q6_K") > q6_k) == on  # its ffn_down matrices in Q6_K
            assert (q5_0.k_quant_products("Q4_K") > q4_k) == on  # attention output and the other ffn_down in Q4_K
        assert KERNEL.q5_0_packed_matrices() > matrices
    finally:
        q5_0.set_enabled(True)
        model.close()
    assert KERNEL.q5_0_packed_matrices() == matrices
    assert np.argmax(logits[True]) == np.argmax(logits[False])
    gap = np.abs(log_softmax(logits[True]) - log_softmax(logits[False]))
    assert 0 < gap.mean() < 0.3  # measured 0.15
    assert gap.max() < 1.5  # measured 0.86; llama.cpp's batched against one-token passes: 0.76


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


@needs_kernel
def test_llama_cpps_tiled_path_is_declined() -> None:
    """The stand-in for llama.cpp's tiled K-quant path says no at any size (llama.cpp then runs its plain path,
    which sends Q6_K and Q4_K to the kernel); it reads nothing of the tensor but its token count."""
    assert KERNEL is not None

    class TensorHead(ctypes.Structure):
        _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4)]

    tiled = KERNEL.ggml_compute_forward_mul_mat_tiled
    tiled.restype = ctypes.c_bool
    tiled.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    for tokens in (8, 16, 31, 32, 512):
        head = TensorHead(0, None, (896, tokens, 1, 1))
        assert not tiled(None, ctypes.byref(head))


@needs_kernel
def test_the_real_models_passes_decline_llama_cpps_tiled_path_prompts_too(default_gguf: Path) -> None:
    """With the real model (its Q6_K matrices would take llama.cpp's tiled path from 8 tokens on): a pass over a
    40-token prompt chunk and one over 8 tokens decline it, and the kernel multiplies their Q6_K matrices (the tiled
    path rounds a token by where it falls in its tiles: a prompt computed whole and continued from a kept cache
    answered differently)."""
    assert KERNEL is not None
    model = LlamaModel(default_gguf, context_size=512, sequences=1, threads=2, ubatch=64)
    try:
        prompt = model.tokenize("The history of printing began in China, long before Gutenberg built his press in "
                                "Mainz. Woodblocks carried whole pages; movable type of clay, then of metal, came "
                                "later, and paper made from rags made books cheaper than parchment ever was.",
                                add_bos=True, parse_special=False)
        assert len(prompt) >= 48
        handed_over = KERNEL.q5_0_tiled_calls(1)
        for start, end in ((0, 40), (40, 48)):
            declined, q6_k = KERNEL.q5_0_tiled_calls(0), q5_0.k_quant_products("Q6_K")
            model.decode([(0, start, prompt[start:end], end == 48)])
            assert KERNEL.q5_0_tiled_calls(0) > declined
            assert q5_0.k_quant_products("Q6_K") > q6_k
        assert KERNEL.q5_0_tiled_calls(1) == handed_over
    finally:
        model.close()
