"""The engine backends, and which one serves a model: a registry of the kinds of model each loads.

A Hugging Face directory runs on transformers (pure PyTorch), a GGUF file on llama.cpp. Each backend's module is
imported only when a model needs it: torch alone takes seconds to import. A new backend is one more entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gemserve.engine.types import Engine


@dataclass(frozen=True)
class EngineOptions:
    context_size: int | None  # KV cache tokens; None: the model's window
    max_sequences: int
    threads: int | None
    pin_budget: int | None  # llama.cpp: cache tokens cachedContents may keep


@dataclass(frozen=True)
class Backend:
    name: str
    serves: Callable[[Path], bool]
    load: Callable[[Path, EngineOptions], Engine]


def _transformers(path: Path, options: EngineOptions) -> Engine:
    from gemserve.engine.backends.transformers import TransformersEngine

    return TransformersEngine(path, context_size=options.context_size, max_sequences=options.max_sequences,
                              threads=options.threads)


def _llamacpp(path: Path, options: EngineOptions) -> Engine:
    from gemserve.engine.backends.llamacpp import LlamaCppEngine

    return LlamaCppEngine(path, context_size=options.context_size, max_sequences=options.max_sequences,
                          pin_budget=options.pin_budget, threads=options.threads)


BACKENDS = (
    Backend("transformers", Path.is_dir, _transformers),
    Backend("llama.cpp", Path.is_file, _llamacpp),
)


def load_engine(path: Path, options: EngineOptions) -> Engine:
    for backend in BACKENDS:
        if backend.serves(path):
            return backend.load(path, options)
    raise FileNotFoundError(f"no engine backend serves {path}: it is neither a model directory nor a file")
