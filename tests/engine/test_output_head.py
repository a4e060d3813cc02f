"""gemserve's Q8_0 output-layer kernel: its arithmetic on matrices built here, and its logits on the real model
against llama.cpp's own output layer."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from gemserve.engine.backends import output_head
from gemserve.engine.backends.llamacpp_model import LlamaModel, _changes_output_layer

try:
    KERNEL = output_head._kernel()
except (OSError, RuntimeError):
    KERNEL = None
LEVELS = [] if KERNEL is None else list(range(1, KERNEL.output_head_supported() + 1))  # 1 AVX2, 2 AVX-512 VNNI
needs_kernel = pytest.mark.skipif(not LEVELS, reason="the output-layer kernel is not built or this CPU lacks AVX2")


def q8_0_matrix(rng: np.random.Generator, rows: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random Q8_0 rows in llama.cpp's layout, with their int8 values and float scales."""
    q = rng.integers(-127, 128, size=(rows, k), dtype=np.int8)
    scales = (rng.random((rows, k // 32)) * 0.02 + 1e-3).astype(np.float16)
    raw = np.empty((rows, k // 32, 34), np.uint8)
    raw[:, :, :2] = scales.view(np.uint8).reshape(rows, k // 32, 2)
    raw[:, :, 2:] = q.reshape(rows, k // 32, 32).view(np.uint8)
    return raw.reshape(rows, -1), q, scales.astype(np.float64)


def expected(q: np.ndarray, scales: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The product as llama.cpp defines it: activations rounded half to even to 8 bits, multiplier 127 / amax
    and an fp16 scale amax / 127 per 32; exact integer sums."""
    n, k = x.shape
    blocks = x.reshape(n, k // 32, 32)
    amax = np.abs(blocks).max(axis=2)
    multiplier = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax != 0)
    xq = np.round(blocks * multiplier[..., None]).astype(np.float64)
    xd = (amax / np.float32(127)).astype(np.float16).astype(np.float64)
    qb = q.reshape(q.shape[0], k // 32, 32).astype(np.float64)
    dots = np.einsum("rbe,nbe->nrb", qb, xq)
    return np.einsum("nrb,rb,nb->nr", dots, scales, xd)


@needs_kernel
@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("n", [1, 3, 8, 11])
def test_kernel_computes_the_q8_0_product(n: int, level: int) -> None:
    """Both instruction sets (the AVX2 loop runs on VNNI machines too, when asked), exactly."""
    assert KERNEL is not None
    if level not in LEVELS:
        pytest.skip(f"this CPU does not run kernel level {level}")
    rng = np.random.default_rng(n)
    rows, k = 1003, 96  # rows not a multiple of the 8-row groups; tokens past one 8-token pass when n > 8
    raw, q, scales = q8_0_matrix(rng, rows, k)
    packed = np.empty(KERNEL.output_head_packed_bytes(rows, k), np.uint8)
    assert KERNEL.output_head_pack(raw.ctypes.data, rows, k, packed.ctypes.data, 2) == 0
    x = (rng.standard_normal((n, k)) * 3).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block has scale 0
    out = np.full((n, rows), np.nan, np.float32)
    scratch = np.empty(KERNEL.output_head_scratch_bytes(n, k), np.uint8)
    assert KERNEL.output_head_set_level(level) == level
    try:
        assert KERNEL.output_head_matmul(packed.ctypes.data, rows, k, x.ctypes.data, n, out.ctypes.data,
                                         scratch.ctypes.data, 2) == 0
    finally:
        KERNEL.output_head_set_level(-1)
    want = expected(q, scales, x)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.fixture(scope="module")
def models(default_gguf: Path) -> Iterator[tuple[LlamaModel, LlamaModel]]:
    ours = LlamaModel(default_gguf, context_size=1024, sequences=4, threads=2, ubatch=512)
    theirs = LlamaModel(default_gguf, context_size=1024, sequences=4, threads=2, ubatch=512, own_output_layer=False)
    yield ours, theirs
    ours.close()
    theirs.close()


@needs_kernel
def test_real_model_logits_match_llama_cpp_in_one_batch(models: tuple[LlamaModel, LlamaModel]) -> None:
    """Three prompts in one batch, logits at each prompt's last token: the rows must land on the right
    sequences and agree with llama.cpp's output layer up to float rounding."""
    ours, theirs = models
    assert ours.output_layer == "gemserve" and theirs.output_layer == "llama.cpp"
    prompts = [ours.tokenize(t, add_bos=True, parse_special=False)
               for t in ("The capital of Italy is", "def add(a, b):\n    return", "Roses are red, violets")]
    entries = [(i, 0, p, True) for i, p in enumerate(prompts)]
    rows = np.cumsum([len(p) for p in prompts]) - 1
    results = []
    for model in (ours, theirs):
        assert model.decode(entries)
        results.append([np.array(model.logits(int(r))) for r in rows])
        for i in range(len(prompts)):
            model.forget(i)
    for mine, reference in zip(*results, strict=True):
        assert int(np.argmax(mine)) == int(np.argmax(reference))
        assert float(np.max(np.abs(mine - reference))) < 0.02 * float(np.max(np.abs(reference)))
    assert int(np.argmax(results[0][0])) != int(np.argmax(results[0][1]))  # three different rows, not one


@needs_kernel
def test_prompt_chunks_without_logits_still_fill_the_cache(models: tuple[LlamaModel, LlamaModel]) -> None:
    """The graph is stopped before llama.cpp's output layer on every decode, logits wanted or not: the cache
    must still be written, so a prompt fed in two decodes scores as one fed whole."""
    ours, _ = models
    prompt = ours.tokenize("Water boils at a temperature of one hundred degrees", add_bos=True, parse_special=False)
    assert ours.decode([(0, 0, prompt, True)])
    whole = np.array(ours.logits(len(prompt) - 1))
    ours.forget(0)
    assert ours.decode([(0, 0, prompt[:5], False)])
    assert ours.decode([(0, 5, prompt[5:], True)])
    split = np.array(ours.logits(len(prompt) - 6))
    ours.forget(0)
    assert float(np.max(np.abs(whole - split))) < 0.05 * float(np.max(np.abs(whole)))


def test_adapters_that_touch_the_output_matrix_are_noticed(tmp_path: Path) -> None:
    def adapter(name: str, tensors: list[str]) -> Path:
        path = tmp_path / name
        writer = GGUFWriter(path, "gemma3")
        writer.add_string("general.type", "adapter")
        for tensor in tensors:
            writer.add_tensor(tensor, np.zeros((4, 8), np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    assert not _changes_output_layer(adapter("layers.gguf", ["blk.0.attn_q.weight.lora_a",
                                                             "blk.0.attn_q.weight.lora_b"]))
    assert _changes_output_layer(adapter("tied.gguf", ["token_embd.weight.lora_a", "token_embd.weight.lora_b"]))
    assert _changes_output_layer(adapter("head.gguf", ["output.weight.lora_a", "output.weight.lora_b"]))


@needs_kernel
def test_a_disagreeing_output_layer_falls_back_to_llama_cpp(default_gguf: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """When the start-up comparison fails, llama.cpp computes logits from then on, with its callback still
    registered (and pointing at memory that must stay alive)."""
    finish = output_head.OutputHead.finish

    def wrong(self: output_head.OutputHead) -> bool:
        done = finish(self)
        self.logits[:] = 0.0
        return done

    monkeypatch.setattr(output_head.OutputHead, "finish", wrong)
    model = LlamaModel(default_gguf, context_size=512, sequences=1, threads=2, ubatch=512)
    try:
        assert model.output_layer == "llama.cpp"
        gc.collect()
        prompt = model.tokenize("The capital of France is", add_bos=True, parse_special=False)
        assert model.decode([(0, 0, prompt, True)])
        logits = model.logits(len(prompt) - 1)
        assert float(np.max(np.abs(logits))) > 1.0
    finally:
        model.close()


@needs_kernel
def test_logits_computed_later_from_captured_hidden_states_are_the_same_bits(
        models: tuple[LlamaModel, LlamaModel]) -> None:
    """Drafting runs passes without logits and computes them later for several hidden states at once: the same
    bits as each pass computing its own. The shortlist's scores are those tokens' logits, bit for bit; the
    dequantized rows give them approximately."""
    ours, _ = models
    prompt = ours.tokenize("A list of the planets: Mercury, Venus, Earth", add_bos=True, parse_special=False)
    assert ours.decode([(0, 0, prompt[:-3], False)])
    direct, hidden = [], []
    for i, token in enumerate(prompt[-3:]):
        position = len(prompt) - 3 + i
        assert ours.decode([(0, position, [token], True)])
        direct.append(np.array(ours.logits(0)))
        ours.forget(0, position)
        assert ours.decode([(0, position, [token], True)], logits=False)
        hidden.append(np.array(ours.hidden[0]))
    ours.logits_of(np.stack(hidden))
    for i in range(3):
        assert np.array_equal(ours.logits(i), direct[i])
    head = ours.drafts
    assert head is not None
    shortlist = head.shortlist
    assert 16384 <= len(shortlist) < ours.n_vocab // 4
    assert np.array_equal(head.shortlist_scores(hidden[0]), direct[0][shortlist])
    for token in (int(np.argmax(direct[0])), ours.n_vocab - 1):
        approximate = float(head.rows([token])[0] @ hidden[0])
        assert abs(approximate - direct[0][token]) < 0.02 * float(np.max(np.abs(direct[0])))
    ours.forget(0)
