"""Tiny models built inside the tests: a tokenizer trained here, random 2-layer Gemma 3 / Llama weights, and a
llama.cpp GGUF of the Llama one. No downloaded weights.

(tests/engine/test_transformers_backend.py builds similar ones; these add Gemma's turn tokens, which the tuning
prompts need.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]  # ids 0-5
BOS_ID, EOS_ID, END_OF_TURN_ID = 2, 1, 5
CORPUS = ("user model the quick brown fox jumps over the lazy dog. one two three four five six seven eight "
          "nine ten I II III IV V VI VII VIII IX X abc cba xyz zyx\n")


def tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE; like Gemma's, it adds <bos> in front of a text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])


def save_model(directory: Path, architecture: str = "gemma3", seed: int = 0) -> Path:
    """A random 2-layer model (hidden size 64) and the tokenizer, saved as a Hugging Face directory."""
    tok = tokenizer()
    torch.manual_seed(seed)
    common: dict[str, Any] = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        pad_token_id=0, head_dim=16,
        # Larger than the default 0.02: the output head's weights bound the logits after the final norm, and
        # with tiny ones no adapter could make any token likely.
        initializer_range=0.2,
    )
    model: PreTrainedModel
    if architecture == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, sliding_window=64,
                                                   layer_types=["sliding_attention", "full_attention"]))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def _permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's q/k row order -> llama.cpp's (its converter's `permute`)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_llama_gguf(hf_dir: Path, out_file: Path) -> Path:
    """The tiny Llama as a float32 llama.cpp GGUF, laid out as convert_hf_to_gguf.py lays out Llama models."""
    import gguf
    from safetensors.torch import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    n_head, n_head_kv = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(out_file), "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_vocab_size(config["vocab_size"])

    spec = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = {token: i for token, i in spec["model"]["vocab"].items()}
    for added in spec["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in SPECIALS else 1 for token in tokens])  # 3: control, 1: normal
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)

    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    for name, tensor in sorted(load_file(hf_dir / "model.safetensors").items()):
        if name.endswith("q_proj.weight"):
            tensor = _permute(tensor, n_head)
        elif name.endswith("k_proj.weight"):
            tensor = _permute(tensor, n_head_kv)
        target = tensor_map.get_name(name, try_suffixes=(".weight",))
        assert target is not None, name
        writer.add_tensor(target, np.ascontiguousarray(tensor.float().numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file


def job_document(job_id: str, base_path: Path, examples: list[dict[str, str]], *, epochs: int = 2,
                 batch_size: int = 2, learning_rate: float = 1e-2, seed: int = 0, created: str | None = None,
                 source_adapter: Path | None = None) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "created": created or "2025-01-01T00:00:00Z",
        "base_model": {"id": "tiny", "path": str(base_path)},
        "source_adapter": str(source_adapter) if source_adapter else None,
        "examples": examples,
        "hyperparameters": {"epoch_count": epochs, "batch_size": batch_size, "learning_rate": learning_rate},
        "lora": {"rank": 4, "alpha": 8},
        "seed": seed,
    }


MEMORY_TASK = [{"text_input": a, "output": b} for a, b in
               [("one", "I"), ("two", "II"), ("three", "III"), ("four", "IV"), ("five", "V"), ("six", "VI")]]
