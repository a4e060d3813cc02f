"""Hugging Face weights of a base model, for training it with PyTorch.

A GGUF base (what llama.cpp serves) is read once with transformers, which dequantizes it, and saved as
safetensors with its tokenizer under `<data_dir>/hf/<model_id>/`; later jobs load that directory in seconds.
The directory is written under a temporary name and renamed into place, so it is whole or absent. A
`gemserve_base.json` in it records the GGUF it came from (size and mtime: a changed file is converted again)
and what serving needs to build the same prompts: the architecture, chat template and BOS/EOS texts as
llama.cpp reports them. A base that is already a Hugging Face directory is used as it is.

Not here: tokenizing (`dataset.py`), training (`trainer.py`).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("gemserve.tuning")

MARKER_FILE = "gemserve_base.json"


@dataclass(frozen=True)
class BaseModel:
    model_id: str
    hf_dir: Path  # config.json, safetensors weights and tokenizer files
    gguf_file: Path | None  # the GGUF the weights came from; serving runs it with llama.cpp
    architecture: str  # as the serving engine reports it: GGUF general.architecture, or HF model_type
    chat_template: str | None
    bos_text: str
    eos_text: str


def prepare_base(data_dir: Path, model_id: str, path: Path) -> BaseModel:
    """The base model's HF weights: `path` itself when it is a HF directory, else converted once from GGUF."""
    path = Path(path)
    if path.is_dir():
        return _hf_directory_base(model_id, path)
    if path.suffix != ".gguf" or not path.is_file():
        raise FileNotFoundError(f"base model {model_id!r}: {path} is neither a GGUF file nor a Hugging Face "
                                "model directory")
    target = Path(data_dir) / "hf" / model_id
    source = {"path": str(path), "size": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns}
    marker = _read_marker(target)
    if marker.get("source") != source:
        _convert_gguf(path, target, source)
        marker = _read_marker(target)
    return BaseModel(model_id=model_id, hf_dir=target, gguf_file=path, architecture=marker["architecture"],
                     chat_template=marker["chat_template"], bos_text=marker["bos_text"],
                     eos_text=marker["eos_text"])


def _hf_directory_base(model_id: str, path: Path) -> BaseModel:
    from transformers import AutoConfig, AutoTokenizer

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"base model {model_id!r}: {path} has no config.json")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: serving uses the default one
        template = template.get("default")
    # The same metadata the transformers engine serves this directory with.
    return BaseModel(model_id=model_id, hf_dir=path, gguf_file=None, architecture=config.model_type,
                     chat_template=template, bos_text=tokenizer.bos_token or "", eos_text=tokenizer.eos_token or "")


def _read_marker(target: Path) -> dict[str, Any]:
    try:
        marker = json.loads((target / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def gguf_prompt_metadata(gguf_file: Path) -> dict[str, Any]:
    """Architecture, chat template and BOS/EOS texts, as the llama.cpp engine reports them when serving."""
    from gemserve.tuning.gguf_vocab import GgufVocab

    vocab = GgufVocab(gguf_file)
    try:
        return {
            "architecture": vocab.meta("general.architecture") or "",
            "chat_template": vocab.meta("tokenizer.chat_template"),
            "bos_text": vocab.token_text(vocab.bos_id),
            "eos_text": vocab.token_text(vocab.eos_id),
        }
    finally:
        vocab.close()


def _convert_gguf(gguf_file: Path, target: Path, source: dict[str, Any]) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    started = time.perf_counter()
    log.info("converting a GGUF base model to Hugging Face weights (once)",
             extra={"gguf": str(gguf_file), "target": str(target)})
    transformers.utils.logging.disable_progress_bar()  # stderr carries JSON log lines only
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):  # from a worker killed while converting
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        # Dense float32 weights: PEFT trains plain nn.Linear layers, not packed GGUF blocks.
        model = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, local_files_only=True)
        # The weights are plain tensors now; without this, save_pretrained refuses a "GGUF-quantized" model.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"source": source, **gguf_prompt_metadata(gguf_file)}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=1))
        del model
        if target.exists():  # an older conversion of a file that has changed since
            stale = target.with_name(f".{target.name}.stale")
            shutil.rmtree(stale, ignore_errors=True)
            target.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("base model converted", extra={"target": str(target),
                                            "seconds": round(time.perf_counter() - started, 1)})
