"""The embedding engine on a tiny BERT built in the test: layout, pooling, batching, truncation, token counts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertModel

from gemserve.engine.embedding import EmbeddingEngine, EmbeddingModelError, SentenceEncoder, read_layout
from tests.engine.tiny_encoder import MAX_SEQ_LENGTH, WORDS, make_encoder_dir

TEXTS = ["the cat sat on the mat", "a dog", "storm sails ship harbour sea wind rain"]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_encoder_dir(tmp_path_factory.mktemp("encoder"))


@pytest.fixture(scope="module")
def encoder(encoder_dir: Path) -> SentenceEncoder:
    return SentenceEncoder(encoder_dir)


def reference(path: Path, texts: list[str], pooling: str) -> np.ndarray:
    """The model run text by text, pooled by hand: what sentence-transformers computes."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path).eval()
    rows = []
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=MAX_SEQ_LENGTH)
            hidden = model(**ids).last_hidden_state[0]  # [tokens, dimensions]
            pooled = hidden[0] if pooling == "cls" else hidden.max(dim=0).values if pooling == "max" \
                else hidden.mean(dim=0)
            rows.append((pooled / pooled.norm()).numpy())
    return np.stack(rows)


def test_layout_is_read_from_the_directory(encoder_dir: Path) -> None:
    layout = read_layout(encoder_dir)
    assert (layout.pooling, layout.max_tokens, layout.dimensions) == ("mean", MAX_SEQ_LENGTH, 32)


def test_unsupported_modules_and_non_models_are_refused(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingModelError, match="Dense"):
        read_layout(make_encoder_dir(tmp_path / "dense", modules=("Transformer", "Pooling", "Dense")))
    with pytest.raises(EmbeddingModelError, match="config.json"):
        read_layout(tmp_path)


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_a_batch_gives_each_text_its_own_pooled_unit_vector(tmp_path: Path, pooling: str) -> None:
    path = make_encoder_dir(tmp_path / pooling, pooling=pooling)
    got = SentenceEncoder(path).encode(TEXTS)  # padded to the longest text in one pass
    assert got.shape == (3, 32) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(got, reference(path, TEXTS, pooling), atol=1e-5)


def test_texts_keep_their_order_across_length_sorted_batches(encoder: SentenceEncoder) -> None:
    texts = [" ".join(["sea"] * (1 + (i * 7) % 12)) + f" {WORDS[i % len(WORDS)]}" for i in range(70)]
    got = encoder.encode(texts)  # three passes of similar lengths
    np.testing.assert_allclose(got, np.stack([encoder.encode([t])[0] for t in texts]), atol=1e-5)


def test_long_texts_are_cut_at_the_models_window(encoder: SentenceEncoder) -> None:
    words = ("cat dog sea ship " * 10).split()
    cut = " ".join(words[: MAX_SEQ_LENGTH - 2])  # [CLS] and [SEP] take two places
    long, short, shorter = encoder.encode([" ".join(words), cut, " ".join(words[: MAX_SEQ_LENGTH - 3])])
    np.testing.assert_allclose(long, short, atol=1e-6)
    assert float(long @ shorter) < 0.99999


def test_token_counts_include_special_tokens_and_are_not_cut(encoder: SentenceEncoder) -> None:
    assert encoder.count_tokens("the cat") == 4
    assert encoder.count_tokens(" ".join(["cat"] * 40)) == 42


def test_the_engine_loads_in_the_background_and_embeds_off_the_loop(encoder_dir: Path) -> None:
    engine = EmbeddingEngine(encoder_dir)
    try:
        assert engine.layout.dimensions == 32  # known before the weights load

        async def run() -> tuple[np.ndarray, int]:
            return await engine.embed(TEXTS), await engine.count_tokens(["the cat", "a dog"])

        vectors, tokens = asyncio.run(run())
        np.testing.assert_allclose(vectors, engine.loaded().encode(TEXTS), atol=1e-6)
        assert tokens == 8
    finally:
        engine.close()


def test_a_model_that_fails_to_load_fails_its_requests(tmp_path: Path) -> None:
    path = make_encoder_dir(tmp_path / "broken")
    (path / "model.safetensors").write_bytes(b"not weights")
    engine = EmbeddingEngine(path)
    try:
        with pytest.raises(Exception, match="(?i)safetensors|header|deserializ|error"):
            asyncio.run(engine.embed(["the cat"]))
    finally:
        engine.close()
