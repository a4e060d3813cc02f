"""The models this server has loaded: each catalog entry with its engine and chat format.

Every configured model is loaded at start-up, so the first request pays no loading time and a broken model
file stops the server at once instead of failing a user's request later. Embedding models load in the
background (torch takes seconds to import): the first embedding request waits for them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from gemserve.engine.embedding import EmbeddingEngine
from gemserve.engine.types import Engine
from gemserve.errors import ApiError, not_found
from gemserve.models.catalog import Catalog, ModelSpec, model_path
from gemserve.models.chat_format import ChatFormat

log = logging.getLogger("gemserve.models")

EngineFactory = Callable[[Path, ModelSpec], Engine]
EmbedderFactory = Callable[[Path, ModelSpec], EmbeddingEngine]


@dataclass
class ServedModel:
    spec: ModelSpec
    engine: Engine
    chat: ChatFormat

    @property
    def input_token_limit(self) -> int:
        return self.engine.metadata.context_length

    @property
    def output_token_limit(self) -> int:
        return min(self.spec.output_token_limit, self.engine.metadata.context_length)

    @cached_property
    def special_call_tags(self) -> bool:
        """Whether `<tool_call>` and `</tool_call>` are tokens of their own in this model's vocabulary."""
        return all(len(self.engine.tokenize(tag, add_bos=False, parse_special=True)) == 1
                   for tag in ("<tool_call>", "</tool_call>"))


@dataclass
class ServedEmbedder:
    spec: ModelSpec
    engine: EmbeddingEngine


def _default_embedder(path: Path, spec: ModelSpec) -> EmbeddingEngine:
    return EmbeddingEngine(path)


class ModelRegistry:
    def __init__(self, catalog: Catalog, data_dir: Path, engine_factory: EngineFactory,
                 embedder_factory: EmbedderFactory = _default_embedder) -> None:
        self.catalog = catalog
        self._data_dir = data_dir
        self._factory = engine_factory
        self._embedder_factory = embedder_factory
        self._served: dict[str, ServedModel] = {}
        self._embedders: dict[str, ServedEmbedder] = {}

    def load_all(self) -> None:
        """Generation models one after another, then what loads in the background: their grammar vocabularies and
        the embedding models. An engine times its passes as it loads (engine/lookup.py), on a machine that nothing
        else of gemserve's keeps busy meanwhile."""
        specs = sorted(self.catalog.models.values(), key=lambda spec: spec.kind == "embed")
        for spec in specs:
            started = time.perf_counter()
            path = model_path(spec, self._data_dir)
            if spec.kind == "embed":
                self._embedders[spec.id] = ServedEmbedder(spec, self._embedder_factory(path, spec))
                log.info("embedding model loading in the background", extra={"model": spec.id, "path": str(path)})
                continue
            engine = self._factory(path, spec)
            meta = engine.metadata
            chat = ChatFormat(meta.chat_template, meta.architecture, meta.bos_text, meta.eos_text)
            self._served[spec.id] = ServedModel(spec, engine, chat)
            log.info("model loaded", extra={"model": spec.id, "path": str(path),
                                            "seconds": round(time.perf_counter() - started, 2)})
        for served in self._served.values():
            served.engine.prepare_grammar()

    def get(self, name: str, method: str = "generateContent", api_version: str = "v1beta") -> ServedModel:
        """The generation model `name` names; a 404 in Google's words for anything else."""
        spec = self.catalog.resolve(name)
        if spec is None or spec.id not in self._served:
            raise _not_served(name, method, api_version)
        return self._served[spec.id]

    def get_embedder(self, name: str, method: str = "embedContent", api_version: str = "v1beta") -> ServedEmbedder:
        spec = self.catalog.resolve(name)
        if spec is None or spec.id not in self._embedders:
            raise _not_served(name, method, api_version)
        return self._embedders[spec.id]

    def get_any(self, name: str, api_version: str = "v1beta") -> ServedModel | ServedEmbedder:
        spec = self.catalog.resolve(name)
        if spec is not None and spec.id in self._embedders:
            return self._embedders[spec.id]
        return self.get(name, "getModel", api_version)

    def served(self) -> list[ServedModel]:
        return list(self._served.values())

    def embedders(self) -> list[ServedEmbedder]:
        return list(self._embedders.values())

    def everything(self) -> list[ServedModel | ServedEmbedder]:
        return [*self._served.values(), *self._embedders.values()]

    def close(self) -> None:
        for model in self._served.values():
            model.engine.close()
        for embedder in self._embedders.values():
            embedder.engine.close()
        self._served.clear()
        self._embedders.clear()


def _not_served(name: str, method: str, api_version: str) -> ApiError:
    shown = name if name.startswith("models/") else f"models/{name}"
    return not_found(f"{shown} is not found for API version {api_version}, or is not supported for {method}. "
                     "Call ListModels to see the list of available models and their supported methods.")
