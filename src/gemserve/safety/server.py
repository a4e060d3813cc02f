"""The server's safety classifier, made once the models are loaded (docs/safety.md).

By default: the embedding head on the server's embedding model (with the profanity model as one of its inputs). With
`--safety-judge MODEL`: that served generative model as judge (a ShieldGemma GGUF, configured like any other
model), with the profanity model for HARASSMENT.
"""

from __future__ import annotations

import logging
from pathlib import Path

from gemserve.errors import ApiError
from gemserve.models.catalog import CatalogError
from gemserve.models.registry import ModelRegistry
from gemserve.safety.classifiers import (
    PROFANITY,
    Classifier,
    Combined,
    EmbeddingClassifier,
    JudgeClassifier,
)

log = logging.getLogger("gemserve.safety")


class Safety:
    def __init__(self, registry: ModelRegistry, judge: str | None = None, cache_dir: Path | None = None) -> None:
        self.registry = registry
        self.judge = judge
        self.cache_dir = cache_dir  # where the trained head is kept between starts
        self._classifier: Classifier | None = None

    def start(self) -> None:
        """Makes the classifier (call with the models loaded, on the event loop); the embedding head starts
        training in the background. A judge that is not a served generative model stops the server."""
        if self.judge is not None:
            spec = self.registry.catalog.resolve(self.judge)
            served = {m.spec.id: m for m in self.registry.served()}
            if spec is None or spec.id not in served:
                raise CatalogError(f"--safety-judge {self.judge}: no generative model of that name is served")
            self._classifier = Combined(JudgeClassifier(served[spec.id]), PROFANITY)
            log.info("safety classifier", extra={"judge": spec.id})
            return
        embedders = {e.spec.id: e for e in self.registry.embedders()}
        chosen = embedders.get(self.registry.catalog.embedding_model or "") or next(iter(embedders.values()), None)
        if chosen is None:
            log.warning("no embedding model is served: safety settings that rate content will be refused")
            return
        embedding = EmbeddingClassifier(chosen.engine, cache_dir=self.cache_dir)
        embedding.prepare()
        self._classifier = embedding
        log.info("safety classifier", extra={"embedding_model": chosen.spec.id})

    def classifier(self) -> Classifier:
        if self._classifier is None:
            raise ApiError("FAILED_PRECONDITION", "safety_settings: this server has no safety classifier (it serves "
                           "no embedding model and no --safety-judge); see docs/safety.md.")
        return self._classifier
