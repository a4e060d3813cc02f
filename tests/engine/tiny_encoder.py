"""A tiny sentence-transformers directory built in the test: a random two-layer BERT with a word vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "rug", "sea", "ship", "sails", "storm", "harbour", "bread",
         "oven", "bakes", "flour", "river", "stone", "tree", "leaf", "wind", "rain", "sun", "moon", "star", "cloud"]
MAX_SEQ_LENGTH = 16


def make_encoder_dir(path: Path, pooling: str = "mean", modules: tuple[str, ...] = ("Transformer", "Pooling",
                     "Normalize")) -> Path:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    paths = {"Transformer": "", "Pooling": "1_Pooling", "Normalize": "2_Normalize", "Dense": "2_Dense"}
    (path / "modules.json").write_text(json.dumps([
        {"idx": i, "name": str(i), "path": paths[kind], "type": f"sentence_transformers.models.{kind}"}
        for i, kind in enumerate(modules)]))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": pooling == "max"}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": MAX_SEQ_LENGTH}))
    return path
