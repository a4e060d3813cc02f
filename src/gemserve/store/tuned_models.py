"""Tuned model records: what the API knows of a tuned model besides its training job's progress.

Progress (state, steps, snapshots) lives in the job directory the tuning worker writes (`gemserve.tuning.jobs`);
this table holds what the user chose and who may use it. The training examples are not stored here: they go to
the job once, and are never echoed back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from gemserve.store.db import Database, insert_row


@dataclass
class TunedModelRecord:
    id: str
    owner: str
    base_model: str  # "models/..." the tuning started from (for a tuned source: that source's base)
    create_time: str
    update_time: str
    hyperparameters: dict[str, Any]
    operation_id: str
    example_count: int
    display_name: str = ""
    description: str = ""
    source_tuned_model: str | None = None  # "tunedModels/..." when tuned from a tuned model
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    reader_project_numbers: list[int] = field(default_factory=list)

    @property
    def job_id(self) -> str:
        # A new job directory for each creation, so a re-created id never meets an old job's files.
        return f"{self.id}-{self.operation_id}"


_JSON_COLUMNS = ("hyperparameters", "reader_project_numbers")


def _to_row(record: TunedModelRecord) -> dict[str, Any]:
    row = asdict(record)
    for column in _JSON_COLUMNS:
        row[column] = json.dumps(row[column])
    return row


def _from_row(row: Any) -> TunedModelRecord:
    values = dict(row)
    for column in _JSON_COLUMNS:
        values[column] = json.loads(values[column])
    return TunedModelRecord(**values)


class TunedModelStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def insert(self, record: TunedModelRecord) -> bool:
        """False if the owner has a model of that id already."""
        with self._db.connect() as db:
            return insert_row(db, "tuned_models", _to_row(record), or_ignore=True) == 1

    def with_id(self, model_id: str) -> list[TunedModelRecord]:
        """The models of that id: one per owner at most."""
        with self._db.connect(write=False) as db:
            rows = db.execute("SELECT * FROM tuned_models WHERE id = ? ORDER BY create_time, owner",
                              (model_id,)).fetchall()
        return [_from_row(row) for row in rows]

    def all(self) -> list[TunedModelRecord]:
        with self._db.connect(write=False) as db:
            rows = db.execute("SELECT * FROM tuned_models ORDER BY create_time, id").fetchall()
        return [_from_row(row) for row in rows]

    def update(self, record: TunedModelRecord) -> None:
        row = _to_row(record)
        assignments = ", ".join(f"{c} = :{c}" for c in row if c not in ("id", "owner"))
        with self._db.connect() as db:
            db.execute(f"UPDATE tuned_models SET {assignments} WHERE owner = :owner AND id = :id", row)

    def delete(self, owner: str, model_id: str) -> None:
        with self._db.connect() as db:
            db.execute("DELETE FROM tuned_models WHERE owner = ? AND id = ?", (owner, model_id))
