"""Tuned model records in process (a store on a temporary database, the real catalog): per-key ids and quota."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gemserve.errors import ApiError
from gemserve.identity import Caller
from gemserve.models.catalog import load_catalog
from gemserve.schema.tuning import TunedModelIn
from gemserve.service import tuned_models
from gemserve.service.tuned_models import TunedModels
from gemserve.store import db as db_module
from gemserve.store.db import Database
from gemserve.store.tuned_models import TunedModelStore

BODY = {"baseModel": "models/gemma-3-270m",
        "tuningTask": {"trainingData": {"examples": {"examples": [{"textInput": "1", "output": "2"}]}}}}


ALICE, BOB, CAROL = Caller("key-alice", 1), Caller("key-bob", 2), Caller("key-carol", 3)


def service_in(data_dir: Path) -> TunedModels:
    return TunedModels(TunedModelStore(Database(data_dir / "gemserve.db")), load_catalog(None, {}), data_dir)


def test_ids_are_per_key_so_a_conflict_reveals_nothing(tmp_path: Path) -> None:
    service = service_in(tmp_path)
    body = TunedModelIn.model_validate(BODY)
    service.create(ALICE, body, "shared-name")
    with pytest.raises(ApiError) as caught:
        service.create(ALICE, body, "shared-name")  # the caller's own id: a conflict, as at Google
    assert caught.value.status == "ALREADY_EXISTS"
    service.create(BOB, TunedModelIn.model_validate({**BODY, "displayName": "bob's"}), "shared-name")  # no 409
    assert service.get(ALICE, "tunedModels/shared-name")["name"] == "tunedModels/shared-name"
    alices = service.list(ALICE, None, None, None)["tunedModels"]
    assert len(alices) == 1 and service.get(BOB, "tunedModels/shared-name")
    with pytest.raises(ApiError):
        service.get(CAROL, "tunedModels/shared-name")
    # Shared with Carol: she reaches Bob's; Alice keeps reaching her own; deleting is per owner.
    assert service.get(ALICE, "tunedModels/shared-name").get("displayName") != "bob's"
    sharing = TunedModelIn.model_validate({"readerProjectNumbers": [CAROL.project_number]})
    service.patch(BOB, "tunedModels/shared-name", sharing, {"readerProjectNumbers"}, None)
    assert service.get(CAROL, "tunedModels/shared-name")["displayName"] == "bob's"
    service.delete(BOB, "tunedModels/shared-name")
    with pytest.raises(ApiError):
        service.get(CAROL, "tunedModels/shared-name")
    assert service.get(ALICE, "tunedModels/shared-name")


def test_records_of_the_shared_id_schema_survive_the_migration(tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / "gemserve.db")
    db_module._create_tuned_models(old)  # the schema as migration 0001 left it, with one model in it
    old.execute("CREATE TABLE schema_migrations (name TEXT PRIMARY KEY, applied TEXT NOT NULL)")
    old.execute("INSERT INTO schema_migrations VALUES ('0001_create_tuned_models', 'then')")
    old.execute("INSERT INTO tuned_models (id, owner, base_model, create_time, update_time, hyperparameters, "
                "operation_id, example_count) VALUES ('kept', 'key-alice', 'models/gemma-3-270m', 't', 't', '{}', "
                "'op', 1)")
    old.commit()
    old.close()
    store = TunedModelStore(Database(tmp_path / "gemserve.db"))
    assert [(r.owner, r.id) for r in store.with_id("kept")] == [("key-alice", "kept")]


def test_a_key_may_keep_only_so_many_tuned_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tuned_models, "MAX_TUNED_MODELS_PER_KEY", 2)
    service = service_in(tmp_path)
    alice, bob = ALICE, BOB
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


def test_readers_listed_by_an_old_number_are_moved_to_the_new_one(tmp_path: Path) -> None:
    service = service_in(tmp_path)
    shared = TunedModelIn.model_validate({**BODY, "readerProjectNumbers": [111, 222]})
    service.create(ALICE, shared, "old-share")
    assert service.renumber_readers({111: 333}) == 1
    assert service.get(ALICE, "tunedModels/old-share")["readerProjectNumbers"] == ["333", "222"]
    assert service.renumber_readers({111: 333}) == 0  # at every start: nothing more to do


def test_a_tuned_model_generates_with_its_own_defaults_else_its_bases() -> None:
    from gemserve.service.requests import tuned_target
    from gemserve.service.tuned_models import Usable
    from tests.service.scripted import ScriptedEngine, served

    base = served(ScriptedEngine())  # temperature 0.0, top_p 1.0, top_k 1
    tuned = Usable("tunedModels/t", "models/scripted", Path("/adapters/t.gguf"), 0.7, None, 40)
    target = tuned_target(base, tuned, "key-alice")
    assert (target.defaults.temperature, target.defaults.top_p, target.defaults.top_k) == (0.7, 1.0, 40)
    assert (target.version, target.adapter, target.scope) == ("tunedModels/t", "/adapters/t.gguf", "key-alice")


def test_an_id_shared_by_two_other_keys_is_ambiguous_not_guessed(tmp_path: Path) -> None:
    service = service_in(tmp_path)
    shared = TunedModelIn.model_validate({**BODY, "readerProjectNumbers": [ALICE.project_number]})
    service.create(BOB, shared, "translator")
    assert service.get(ALICE, "tunedModels/translator")
    service.create(CAROL, shared, "translator")  # another key shares a model of the same id with Alice
    with pytest.raises(ApiError) as caught:
        service.get(ALICE, "tunedModels/translator")
    assert caught.value.status == "FAILED_PRECONDITION"
    assert "shared with you by different owners" in caught.value.message
    service.create(ALICE, TunedModelIn.model_validate(BODY), "translator")  # her own always wins
    assert service.get(ALICE, "tunedModels/translator")["name"] == "tunedModels/translator"
