"""Adapter export: PEFT files and a GGUF that llama.cpp loads and computes the same logits with.

The tiny Llama is written as a float32 GGUF here, so llama.cpp and torch agree to rounding (llama.cpp's KV cache
is float16). Llama's converter permutes query/key rows, so this also checks that lora_b gets the same permutation.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
import torch

from gemserve.tuning.base_weights import BaseModel, prepare_base
from gemserve.tuning.dataset import Encoded
from gemserve.tuning.export import ExportError, export_adapter, gguf_layout
from gemserve.tuning.jobs import adapter_paths
from gemserve.tuning.trainer import LoraSettings, LoraTrainer, TrainSettings
from tests.tuning import tiny

TOKENS = [tiny.BOS_ID, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]


def trained_with_random_adapter(base: BaseModel) -> LoraTrainer:
    """A trainer whose LoRA matrices are all random, so that every adapted layer changes the output."""
    settings = TrainSettings(epoch_count=1, batch_size=1, learning_rate=1e-3, seed=0, lora=LoraSettings(4, 8))
    trainer = LoraTrainer(base.hf_dir, [Encoded([1, 2, 3], [-100, 2, 3])], settings, pad_id=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return trainer


def llama_cpp_logits(model_file: Path, adapter: Path | None) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(model_file), lora_path=str(adapter) if adapter else None, n_ctx=64,
                          n_threads=1, logits_all=True, verbose=False)
    llm.eval(TOKENS)
    logits = np.array(llm.scores[:len(TOKENS)])
    llm.close()
    return logits


@pytest.fixture(scope="module")
def llama_base(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> BaseModel:
    directory = tmp_path_factory.mktemp("gguf")
    model_file = tiny.write_llama_gguf(tiny_llama, directory / "tiny-llama.gguf")
    hf = prepare_base(directory, "tiny-llama", tiny_llama)
    return BaseModel(**{**hf.__dict__, "gguf_file": model_file})  # the GGUF, with its HF weights beside it


def test_gguf_adapter_gives_llama_cpp_the_peft_logits(llama_base: BaseModel, tmp_path: Path) -> None:
    trainer = trained_with_random_adapter(llama_base)
    trainer.model.eval()
    with torch.no_grad():
        tuned = trainer.model(torch.tensor([TOKENS])).logits[0].numpy()
        with trainer.model.disable_adapter():
            plain = trainer.model(torch.tensor([TOKENS])).logits[0].numpy()
    export_adapter(trainer.model, llama_base, tmp_path)
    paths = adapter_paths(tmp_path)
    assert paths is not None and paths[1] is not None
    assert llama_base.gguf_file is not None

    base_logits = llama_cpp_logits(llama_base.gguf_file, None)
    tuned_logits = llama_cpp_logits(llama_base.gguf_file, paths[1])
    np.testing.assert_allclose(base_logits, plain, atol=2e-2)  # the test's own GGUF base is right
    assert np.abs(tuned - plain).max() > 0.5  # the adapter matters...
    np.testing.assert_allclose(tuned_logits, tuned, atol=2e-2)  # ...and llama.cpp applies it as PEFT does


def test_gguf_adapter_metadata_and_shapes(llama_base: BaseModel, tmp_path: Path) -> None:
    trainer = trained_with_random_adapter(llama_base)
    adapter = export_adapter(trainer.model, llama_base, tmp_path)
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter.gguf", "adapter_config.json",
                                                         "adapter_model.safetensors"]
    assert not (tmp_path / "adapter.tmp").exists()
    reader = gguf.GGUFReader(adapter / "adapter.gguf")
    fields = {name: reader.get_field(name).contents() for name in  # type: ignore[union-attr]
              ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha")}
    assert fields == {"general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora",
                      "adapter.lora.alpha": 8.0}
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}  # ggml order: (n_in, ...) first
    assert len(shapes) == 2 * 7 * 2
    assert shapes["blk.0.attn_q.weight.lora_a"] == (64, 4)  # [n_embd_in, rank]
    assert shapes["blk.0.attn_q.weight.lora_b"] == (4, 64)  # [rank, n_embd_out]
    assert shapes["blk.1.attn_k.weight.lora_b"] == (4, 32)  # two KV heads of 16
    assert shapes["blk.1.ffn_down.weight.lora_a"] == (128, 4)


def test_unsupported_gguf_architecture_is_refused_before_training(llama_base: BaseModel) -> None:
    base = BaseModel(**{**llama_base.__dict__, "architecture": "rwkv7"})
    with pytest.raises(ExportError, match="tuning 'rwkv7' GGUF models is not supported"):
        gguf_layout(base)


def test_hf_directory_of_another_architecture_exports_peft_only(llama_base: BaseModel, tmp_path: Path) -> None:
    trainer = trained_with_random_adapter(llama_base)
    base = BaseModel(**{**llama_base.__dict__, "gguf_file": None, "architecture": "some_new_arch"})
    export_adapter(trainer.model, base, tmp_path)
    paths = adapter_paths(tmp_path)
    assert paths is not None and paths[1] is None
    assert (paths[0] / "adapter_model.safetensors").is_file()
