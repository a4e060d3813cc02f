"""A trained adapter on disk, in the two forms serving loads: PEFT (transformers) and GGUF (llama.cpp).

`export_adapter` writes `<job_dir>/adapter.tmp/` and renames it to `<job_dir>/adapter/`, so `adapter/` is
whole or absent. It holds PEFT's `adapter_config.json` + `adapter_model.safetensors`, and `adapter.gguf` in the
layout llama.cpp's convert_lora_to_gguf.py writes:

    general.architecture = the base's GGUF architecture (e.g. "gemma3")
    general.type = "adapter", adapter.type = "lora", adapter.lora.alpha = alpha (float32)
    <base tensor>.lora_a: numpy (rank, n_in)   = ggml [n_in, rank]   (PEFT's lora_A.weight)
    <base tensor>.lora_b: numpy (n_out, rank)  = ggml [rank, n_out]  (PEFT's lora_B.weight)

with base tensor names from gguf-py's tensor map (model.layers.0.self_attn.q_proj -> blk.0.attn_q.weight).
llama.cpp scales the product by alpha / rank, as PEFT does. For architectures whose converter permutes the
query and key rows for llama.cpp's RoPE layout (Llama), lora_b's rows get the same permutation.

Not here: the training (`trainer.py`), serving adapters (the engines).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from safetensors.torch import load_file

from gemserve.tuning.base_weights import BaseModel
from gemserve.tuning.jobs import ADAPTER_DIR, GGUF_ADAPTER_FILE


class ExportError(ValueError):
    """The adapter cannot be written in llama.cpp's format for this base model."""


@dataclass(frozen=True)
class GgufLayout:
    architecture: str  # GGUF general.architecture
    permute_qk: bool  # llama.cpp's converter permutes q_proj/k_proj rows for this architecture


# HF model_type -> GGUF layout, for bases given as Hugging Face directories.
_HF_LAYOUTS = {
    "llama": GgufLayout("llama", True),
    "mistral": GgufLayout("llama", True),
    "gemma": GgufLayout("gemma", False),
    "gemma2": GgufLayout("gemma2", False),
    "gemma3": GgufLayout("gemma3", False),
    "gemma3_text": GgufLayout("gemma3", False),
    "qwen2": GgufLayout("qwen2", False),
    "qwen3": GgufLayout("qwen3", False),
}
# GGUF architectures whose attention and MLP projections map one to one onto HF's linear layers.
_GGUF_LAYOUTS = {layout.architecture: layout for layout in _HF_LAYOUTS.values()}


def gguf_layout(base: BaseModel) -> GgufLayout | None:
    """How to write a llama.cpp adapter for `base`; None for a HF directory of another architecture.

    A GGUF base of an architecture not listed raises ExportError: it is served by llama.cpp only, so an adapter
    that cannot be written for it would be useless. Call this before training."""
    if base.gguf_file is None:
        return _HF_LAYOUTS.get(base.architecture)
    layout = _GGUF_LAYOUTS.get(base.architecture)
    if layout is None:
        raise ExportError(f"tuning {base.architecture!r} GGUF models is not supported; supported architectures: "
                          f"{', '.join(sorted(_GGUF_LAYOUTS))}")
    return layout


def export_adapter(model: PeftModel, base: BaseModel, job_dir: Path) -> Path:
    """Write the adapter in both forms into `<job_dir>/adapter/`, atomically; returns that directory."""
    final = job_dir / ADAPTER_DIR
    tmp = job_dir / f"{ADAPTER_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left over from an export that was interrupted
    model.peft_config["default"].base_model_name_or_path = base.model_id  # not this machine's path
    # No embedding layers are tuned; saying so also keeps PEFT from asking the model hub about the base.
    model.save_pretrained(str(tmp), save_embedding_layers=False)
    (tmp / "README.md").unlink(missing_ok=True)  # PEFT's model card template, nothing of ours
    layout = gguf_layout(base)
    if layout is not None:
        write_gguf_adapter(tmp, tmp / GGUF_ADAPTER_FILE, base.hf_dir, layout)
    _fsync_tree(tmp)
    if final.exists():  # an earlier export whose job was not yet marked succeeded when its worker died
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def write_gguf_adapter(peft_dir: Path, out_file: Path, base_hf_dir: Path, layout: GgufLayout) -> None:
    """Convert the PEFT adapter in `peft_dir` to llama.cpp's LoRA GGUF, as convert_lora_to_gguf.py would."""
    import gguf

    config = json.loads((peft_dir / "adapter_config.json").read_text())
    base_config = json.loads((base_hf_dir / "config.json").read_text())
    text_config = base_config.get("text_config", base_config)
    n_blocks = int(text_config["num_hidden_layers"])
    n_head = int(text_config["num_attention_heads"])
    n_head_kv = int(text_config.get("num_key_value_heads") or n_head)
    arch = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}[layout.architecture]
    tensor_map = gguf.get_tensor_name_map(arch, n_blocks)

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(peft_dir / "adapter_model.safetensors").items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if key.endswith(marker):
                module = key.removeprefix("base_model.model.").removesuffix(marker)
                pairs.setdefault(module, {})[part] = tensor
                break
        else:
            raise ExportError(f"the adapter holds {key}, which is not a LoRA matrix; only LoRA matrices export")

    writer = gguf.GGUFWriter(str(out_file), layout.architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
    for module, pair in sorted(pairs.items()):
        name = tensor_map.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None or "lora_A" not in pair or "lora_B" not in pair:
            raise ExportError(f"no llama.cpp tensor for the adapted layer {module}")
        lora_a = pair["lora_A"].float()  # (rank, n_in)
        lora_b = pair["lora_B"].float()  # (n_out, rank)
        if layout.permute_qk and module.endswith(("q_proj", "k_proj")):
            lora_b = _permute_rows(lora_b, n_head if module.endswith("q_proj") else n_head_kv)
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(lora_a.numpy(), dtype=np.float32))
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(lora_b.numpy(), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter reorders each head's rows from HF's halves layout to interleaved pairs (for its
    RoPE); `weight` is (n_out, k), n_out = n_head * head_dim."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])  # (head, half, head_dim / 2, k)
            .swapaxes(1, 2)
            .reshape(weight.shape))


def _fsync_tree(directory: Path) -> None:
    """Flush the files to disk before the rename that publishes them."""
    for path in directory.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
