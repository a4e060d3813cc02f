"""Which backend serves a model: a directory transformers, a file llama.cpp."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gemserve.engine import backends
from gemserve.engine.backends import Backend, EngineOptions, load_engine

OPTIONS = EngineOptions(context_size=None, max_sequences=2, threads=1, pin_budget=None)


def test_each_kind_of_model_goes_to_its_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[tuple[str, Path]] = []

    def recorder(name: str) -> Any:
        return lambda path, options: loaded.append((name, path)) or name

    monkeypatch.setattr(backends, "BACKENDS", tuple(Backend(b.name, b.serves, recorder(b.name))
                                                    for b in backends.BACKENDS))
    directory, gguf = tmp_path / "hf-model", tmp_path / "model.gguf"
    directory.mkdir()
    gguf.write_bytes(b"GGUF")
    assert load_engine(directory, OPTIONS) == "transformers"
    assert load_engine(gguf, OPTIONS) == "llama.cpp"
    with pytest.raises(FileNotFoundError, match="no engine backend serves"):
        load_engine(tmp_path / "missing", OPTIONS)
