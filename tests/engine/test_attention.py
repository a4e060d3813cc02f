"""gemserve's attention (`_attention.h`) in place of llama.cpp's flash attention: ggml graphs built here, in process.

Each test builds a FLASH_ATTN_EXT node with ggml's own API over small random tensors, computes it with ggml's CPU
backend (which calls the interposed function) and compares with attention computed in numpy, or the same query
rows computed in passes of other sizes, bit for bit."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from gemserve.engine.backends import q5_0

pytestmark = pytest.mark.skipif(q5_0.install() is None, reason="gemserve's kernel library is not in use here")

F32, F16 = 0, 1


class InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@dataclass
class Ggml:
    base: ctypes.CDLL
    cpu: ctypes.CDLL


@pytest.fixture(scope="module")
def ggml() -> Iterator[Ggml]:
    import llama_cpp

    libs = Path(llama_cpp.__file__).parent / "lib"
    base = ctypes.CDLL(str(libs / "libggml-base.so"))  # the libraries llama.cpp loaded: the same handles
    cpu = ctypes.CDLL(str(libs / "libggml-cpu.so"))
    base.ggml_init.restype = ctypes.c_void_p
    base.ggml_init.argtypes = [InitParams]
    base.ggml_free.argtypes = [ctypes.c_void_p]
    base.ggml_new_tensor_4d.restype = ctypes.c_void_p
    base.ggml_new_tensor_4d.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_int64] * 4
    base.ggml_get_data.restype = ctypes.c_void_p
    base.ggml_get_data.argtypes = [ctypes.c_void_p]
    base.ggml_nbytes.restype = ctypes.c_size_t
    base.ggml_nbytes.argtypes = [ctypes.c_void_p]
    base.ggml_flash_attn_ext.restype = ctypes.c_void_p
    base.ggml_flash_attn_ext.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_float] * 3
    base.ggml_new_graph.restype = ctypes.c_void_p
    base.ggml_new_graph.argtypes = [ctypes.c_void_p]
    base.ggml_build_forward_expand.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    cpu.ggml_graph_compute_with_ctx.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    cpu.ggml_cpu_init()
    yield Ggml(base, cpu)
    q5_0.set_attention(True)


def view(ggml: Ggml, tensor: int, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    """The tensor's data as a numpy array of `shape` (ggml's ne reversed)."""
    size = ggml.base.ggml_nbytes(tensor)
    buffer = (ctypes.c_char * size).from_address(ggml.base.ggml_get_data(tensor))
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


@dataclass
class Case:
    """Attention of `q` (heads, rows, d) over `k` and `v` (kv_heads, cells, d), `mask` (rows, cells): 0 or -inf."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    mask: np.ndarray | None
    scale: float = 0.125
    softcap: float = 0.0


def compute(ggml: Ggml, case: Case, threads: int = 2) -> np.ndarray:
    """ggml's FLASH_ATTN_EXT of `case` on its CPU backend: (rows, heads, dv)."""
    heads, rows, dk = case.q.shape
    kv_heads, cells, dv = case.v.shape
    ctx = ggml.base.ggml_init(InitParams(64 << 20, None, False))
    try:
        q = ggml.base.ggml_new_tensor_4d(ctx, F32, dk, rows, heads, 1)
        k = ggml.base.ggml_new_tensor_4d(ctx, F16, dk, cells, kv_heads, 1)
        v = ggml.base.ggml_new_tensor_4d(ctx, F16, dv, cells, kv_heads, 1)
        view(ggml, q, np.float32, case.q.shape)[...] = case.q
        view(ggml, k, np.float16, case.k.shape)[...] = case.k
        view(ggml, v, np.float16, case.v.shape)[...] = case.v
        mask = None
        if case.mask is not None:
            mask = ggml.base.ggml_new_tensor_4d(ctx, F16, cells, rows, 1, 1)
            view(ggml, mask, np.float16, (rows, cells))[...] = case.mask
        out = ggml.base.ggml_flash_attn_ext(ctx, q, k, v, mask, case.scale, 0.0, case.softcap)
        graph = ggml.base.ggml_new_graph(ctx)
        ggml.base.ggml_build_forward_expand(graph, out)
        assert ggml.cpu.ggml_graph_compute_with_ctx(ctx, graph, threads) == 0
        return view(ggml, out, np.float32, (rows, heads, dv)).copy()
    finally:
        ggml.base.ggml_free(ctx)


def reference(case: Case) -> np.ndarray:
    """The same attention in float64: (rows, heads, dv)."""
    heads, rows, _ = case.q.shape
    kv_heads = case.k.shape[0]
    out = np.zeros((rows, heads, case.v.shape[2]))
    for h in range(heads):
        g = h // (heads // kv_heads)
        s = case.q[h].astype(np.float64) @ case.k[g].astype(np.float64).T * case.scale
        if case.softcap:
            s = case.softcap * np.tanh(s / case.softcap)
        if case.mask is not None:
            s = s + case.mask.astype(np.float64)
        top = s.max(axis=1, keepdims=True)
        w = np.exp(s - np.where(np.isfinite(top), top, 0.0))
        total = w.sum(axis=1, keepdims=True)
        out[:, h] = (w / np.where(total > 0, total, 1.0)) @ case.v[g].astype(np.float64)
    return out


def random_case(rng: np.random.Generator, rows: int, cells: int, heads: int = 4, kv_heads: int = 2, dk: int = 64,
                dv: int = 64, softcap: float = 0.0) -> Case:
    """Causal rows at the end of `cells` positions, every third cell another sequence's (hidden)."""
    mask = np.zeros((rows, cells), dtype=np.float32)
    for r in range(rows):
        mask[r, cells - rows + r + 1:] = -np.inf
    mask[:, 1::3] = -np.inf
    return Case(q=rng.standard_normal((heads, rows, dk), dtype=np.float32) * 2,
                k=rng.standard_normal((kv_heads, cells, dk)).astype(np.float16),
                v=rng.standard_normal((kv_heads, cells, dv)).astype(np.float16), mask=mask, softcap=softcap)


def test_attention_is_computed_here_and_agrees_with_float64(ggml: Ggml) -> None:
    rng = np.random.default_rng(0)
    biased = random_case(rng, 4, 90)  # a mask's finite values are added to the scores
    assert biased.mask is not None
    biased.mask += rng.uniform(-3.0, 0.0, biased.mask.shape).astype(np.float16).astype(np.float32)
    for case in (random_case(rng, 3, 700), random_case(rng, 1, 40, heads=4, kv_heads=1, dk=256, dv=256),
                 random_case(rng, 9, 300, softcap=20.0), random_case(rng, 2, 1000, heads=14, kv_heads=2), biased):
        before = q5_0.attention_rows()
        got = compute(ggml, case)
        assert q5_0.attention_rows() - before == case.q.shape[0] * case.q.shape[1]
        np.testing.assert_allclose(got, reference(case), rtol=0, atol=2e-5)


def test_a_query_row_gets_the_same_bits_in_a_pass_of_any_size_and_on_any_threads(ggml: Ggml) -> None:
    """A token's attention alone, as the last of a pass of 9 (prompt lookup) and as one of 8 sequences' rows;
    over more than 512 cells, where llama.cpp splits a lone row's cells among threads."""
    rng = np.random.default_rng(1)
    wide = random_case(rng, 9, 800, heads=14, kv_heads=2)
    assert wide.mask is not None
    last = Case(q=wide.q[:, 8:], k=wide.k, v=wide.v, mask=wide.mask[8:])
    alone = compute(ggml, last)
    assert np.array_equal(compute(ggml, wide)[8], alone[0])
    assert np.array_equal(compute(ggml, last, threads=1), alone)
    assert np.array_equal(compute(ggml, last, threads=3), alone)
    # cells hidden from it (another sequence's) do not change its sums: more cells, the same bits
    assert last.mask is not None
    rows_more = np.concatenate([last.mask, np.full((1, 160), -np.inf, dtype=np.float32)], axis=1)
    more = Case(q=last.q, k=np.concatenate([last.k, rng.standard_normal((2, 160, 64)).astype(np.float16)], axis=1),
                v=np.concatenate([last.v, rng.standard_normal((2, 160, 64)).astype(np.float16)], axis=1),
                mask=rows_more)
    assert np.array_equal(compute(ggml, more), alone)


def test_rows_that_see_no_cell_attend_to_nothing(ggml: Ggml) -> None:
    rng = np.random.default_rng(2)
    case = random_case(rng, 2, 64)
    assert case.mask is not None
    case.mask[0, :] = -np.inf
    got = compute(ggml, case)
    assert not got[0].any()
    np.testing.assert_allclose(got[1], reference(case)[1], rtol=0, atol=2e-5)


def test_prompts_are_computed_here_and_attention_turned_off_is_left_to_llama_cpp(ggml: Ggml) -> None:
    rng = np.random.default_rng(3)
    before = q5_0.attention_rows()
    case = random_case(rng, 40, 200)  # a prompt's pass
    np.testing.assert_allclose(compute(ggml, case), reference(case), rtol=0, atol=2e-5)
    assert q5_0.attention_rows() == before + 40 * 4
    before = q5_0.attention_rows()
    q5_0.set_attention(False)
    try:
        compute(ggml, random_case(rng, 3, 100))
        assert q5_0.attention_rows() == before
    finally:
        q5_0.set_attention(True)
    compute(ggml, random_case(rng, 3, 100))
    assert q5_0.attention_rows() == before + 3 * 4


def test_the_real_models_logits_are_the_same_bits_whatever_the_pass_holds(default_gguf: Path) -> None:
    """Gemma 3 270M after a prompt of over 512 cells (where llama.cpp would split a lone token's cells among
    threads): the next 9 tokens' logits fed one at a time, 2, 4 and 9 to a pass (prompt lookup) and beside other
    sequences' tokens (batched decoding) are the same bits; with llama.cpp's attention they were not (logits moved by
    up to 1.6)."""
    from gemserve.engine.backends.llamacpp_model import LlamaModel

    model = LlamaModel(default_gguf, context_size=2048, sequences=8, threads=2, ubatch=512)
    try:
        text = 28 * "The printing press was invented around 1440 by Johannes Gutenberg in Mainz. It allowed "
        tokens = model.tokenize(text, add_bos=True, parse_special=False)
        prompt, extra = tokens[:-9], tokens[-9:]
        n = len(prompt)
        assert n > 512
        for start in range(0, n, 256):
            model.decode([(0, start, prompt[start:start + 256], False)])

        def logits(step: int, others: int = 0) -> np.ndarray:
            model.copy(0, 1, n)  # the prompt's cells, shared: the same keys and values for every way of feeding
            rows, fed = [], 0
            while fed < len(extra):
                chunk = extra[fed:fed + step]
                entries = [(1, n + fed + i, [token], True) for i, token in enumerate(chunk)]
                for other in range(2, 2 + others):
                    model.copy(0, other, n)
                    entries.append((other, n, [extra[other]], True))
                assert model.decode(entries)
                rows += [model.logits(i).copy() for i in range(len(chunk))]
                for other in range(2, 2 + others):
                    model.forget(other, n)
                fed += len(chunk)
            model.forget(1)
            return np.array(rows)

        before = q5_0.attention_rows()
        one_at_a_time = logits(1)
        assert q5_0.attention_rows() > before
        for step, others in ((2, 0), (4, 0), (9, 0), (1, 3), (3, 2)):
            assert np.array_equal(logits(step, others), one_at_a_time), (step, others)
    finally:
        model.close()


def test_a_prompt_gives_the_same_bits_whole_in_chunks_in_another_slot_and_beside_a_decoding_token(
        default_gguf: Path) -> None:
    """Prompts are computed here too: the same prompt's last logits whole, in other chunks, in another sequence's
    cells and continued from a copy of its cache; and a decoding token's logits beside another's prompt of 100
    tokens are those it has alone. With llama.cpp's attention for passes of 32 tokens and more, the prompt's
    logits moved by up to 1.3 between two cache slots."""
    from gemserve.engine.backends.llamacpp_model import LlamaModel

    model = LlamaModel(default_gguf, context_size=4096, sequences=4, threads=2, ubatch=512)
    try:
        text = 20 * "The printing press was invented around 1440 by Johannes Gutenberg in Mainz. It allowed "
        tokens = model.tokenize(text, add_bos=True, parse_special=False)[:300]

        def prompt(seq: int, chunks: list[int], start: int = 0) -> np.ndarray:
            at = start
            for size in chunks:
                assert model.decode([(seq, at, tokens[at:at + size], True)])
                at += size
            assert at == len(tokens)
            return model.logits(chunks[-1] - 1).copy()

        whole = prompt(0, [300])
        assert np.array_equal(prompt(1, [100, 150, 49, 1]), whole)
        model.forget(1)
        model.copy(0, 2, 250)  # a kept cache of the first 250 tokens, continued
        assert np.array_equal(prompt(2, [50], start=250), whole)
        model.forget(2)
        # token 300 decoded alone, then beside the first 100 tokens of another sequence's prompt
        assert model.decode([(0, 300, [tokens[1]], True)])
        alone = model.logits(0).copy()
        model.forget(0, 300)
        assert model.decode([(0, 300, [tokens[1]], True), (3, 0, tokens[:100], True)])
        assert np.array_equal(model.logits(0), alone)
    finally:
        model.close()


def test_a_sequence_placed_out_of_order_in_the_cache_gets_the_bits_it_gets_in_order(default_gguf: Path,
                                                                                   tmp_path: Path) -> None:
    """llama.cpp fills the holes forgotten sequences leave: here a sequence's next tokens go to cells 0-9, before its
    prompt's (60-159). Its rows are summed in position order all the same (positions noted as llama.cpp writes the
    keys), so its logits are those of the same tokens placed in order; summed in cell order they were not (the
    failure CI saw: a greedy request's log-probabilities 0.06 apart after earlier requests had come and gone). The
    same with the prompt read back from a saved state."""
    from gemserve.engine.backends.llamacpp_model import LlamaModel

    model = LlamaModel(default_gguf, context_size=1024, sequences=4, threads=2, ubatch=512)
    try:
        text = 12 * "The printing press was invented around 1440 by Johannes Gutenberg in Mainz. It allowed "
        tokens = model.tokenize(text, add_bos=True, parse_special=False)
        prompt, extra = tokens[:100], tokens[100:110]

        def decoded_one_at_a_time() -> np.ndarray:
            rows = []
            for i, token in enumerate(extra):
                assert model.decode([(0, 100 + i, [token], True)])
                rows.append(model.logits(0).copy())
            return np.array(rows)

        assert model.decode([(0, 0, prompt, False)])  # cells 0-99, then 100-109: in order
        in_order = decoded_one_at_a_time()
        model.forget(0)

        assert model.decode([(1, 0, tokens[200:260], False)])  # another sequence in cells 0-59
        assert model.decode([(0, 0, prompt, False)])  # the prompt in cells 60-159
        model.forget(1)  # a hole before it, where its next tokens go
        before = q5_0.reordered_rows()
        assert np.array_equal(decoded_one_at_a_time(), in_order)
        assert q5_0.reordered_rows() > before  # they did go there, and were put back in order
        model.forget(0)

        # a prompt read back from a file (its keys written without rotation or set_rows) behind another sequence,
        # which then goes, leaving the hole its next tokens take: the cells read back have their positions too
        assert model.decode([(0, 0, prompt, False)])
        saved = tmp_path / "prompt.cache"
        assert model.save_sequence(0, saved, tuple(prompt))
        model.forget(0)
        assert model.decode([(1, 0, tokens[200:280], False)])  # cells 0-79, the prompt read back into 80-179
        assert model.load_sequence(0, saved, len(prompt)) == tuple(prompt)
        model.forget(1)
        before = q5_0.reordered_rows()
        assert np.array_equal(decoded_one_at_a_time(), in_order)
        assert q5_0.reordered_rows() > before
    finally:
        model.close()


def test_a_prompt_of_any_length_gets_the_same_bits_whole_and_continued_from_its_cache(default_gguf: Path) -> None:
    """A prompt's last logits computed in one pass and with its last token alone after the rest (a kept cache
    continued, as implicit caching does). With llama.cpp's tiled products for passes of 32 tokens and more, whose
    rounding depends on where a token falls in its tiles, they differed for some lengths (Gemma: 100 tokens, by
    0.65; Qwen: 36 and 64)."""
    from gemserve.engine.backends.llamacpp_model import LlamaModel

    model = LlamaModel(default_gguf, context_size=1024, sequences=2, threads=2, ubatch=512)
    try:
        text = 12 * "The printing press was invented around 1440 by Johannes Gutenberg in Mainz. It allowed "
        tokens = model.tokenize(text, add_bos=True, parse_special=False)
        for n in (33, 36, 64, 100, 200):
            assert model.decode([(0, 0, tokens[:n], True)])
            whole = model.logits(n - 1).copy()
            model.forget(0)
            assert model.decode([(0, 0, tokens[:n - 1], False)])
            assert model.decode([(0, n - 1, tokens[n - 1:n], True)])
            assert np.array_equal(model.logits(0), whole), n
            model.forget(0)
    finally:
        model.close()


def test_the_log_line_says_who_computes_attention(ggml: Ggml) -> None:
    assert q5_0.describe().endswith(", its attention")
    q5_0.set_attention(False)
    try:
        assert q5_0.describe().endswith(", llama.cpp's attention")
    finally:
        q5_0.set_attention(True)
