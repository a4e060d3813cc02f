"""Per-key quota on tuned models, in process: a store on a temporary database, the real catalog."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemserve.errors import ApiError
from gemserve.identity import Caller
from gemserve.models.catalog import load_catalog
from gemserve.schema.tuning import TunedModelIn
from gemserve.service import tuned_models
from gemserve.service.tuned_models import TunedModels
from gemserve.store.db import Database
from gemserve.store.tuned_models import TunedModelStore

BODY = {"baseModel": "models/gemma-3-270m",
        "tuningTask": {"trainingData": {"examples": {"examples": [{"textInput": "1", "output": "2"}]}}}}


def test_a_key_may_keep_only_so_many_tuned_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tuned_models, "MAX_TUNED_MODELS_PER_KEY", 2)
    service = TunedModels(TunedModelStore(Database(tmp_path / "gemserve.db")), load_catalog(None, {}), tmp_path)
    alice, bob = Caller("key-alice", 1), Caller("key-bob", 2)
    body = TunedModelIn.model_validate(BODY)
    service.create(alice, body, "a1")
    service.create(alice, body, "a2")
    with pytest.raises(ApiError) as caught:
        service.create(alice, body, "a3")
    assert caught.value.status == "RESOURCE_EXHAUSTED" and caught.value.code == 429
    assert "at most 2 tuned models" in caught.value.message
    service.create(bob, body, "b1")  # another key's quota is its own
    service.delete(alice, "tunedModels/a1")
    service.create(alice, body, "a3")  # room again
