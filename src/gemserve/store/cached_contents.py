"""Cached content records: what a `cachedContents/{id}` holds (its contents, system instruction and tools, as
the request gave them) and when it expires. The computed state of its prompt lives in the engine, not here."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from gemserve.store.db import Database, insert_row


@dataclass
class CachedContentRecord:
    id: str
    owner: str
    model: str  # the served model's id
    content: dict[str, Any]  # contents, systemInstruction, tools, toolConfig: camelCase, as on the wire
    token_count: int
    create_time: str
    update_time: str
    expire_time: str  # RFC 3339, UTC
    display_name: str = ""


def _from_row(row: Any) -> CachedContentRecord:
    values = dict(row)
    values["content"] = json.loads(values["content"])
    return CachedContentRecord(**values)


class CachedContentStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def insert(self, record: CachedContentRecord) -> None:
        row = {**asdict(record), "content": json.dumps(record.content)}
        with self._db.connect() as db:
            insert_row(db, "cached_contents", row)

    def get(self, cache_id: str) -> CachedContentRecord | None:
        with self._db.connect(write=False) as db:
            row = db.execute("SELECT * FROM cached_contents WHERE id = ?", (cache_id,)).fetchone()
        return _from_row(row) if row else None

    def owned_by(self, owner: str) -> list[CachedContentRecord]:
        with self._db.connect(write=False) as db:
            rows = db.execute("SELECT * FROM cached_contents WHERE owner = ? ORDER BY create_time, id",
                              (owner,)).fetchall()
        return [_from_row(row) for row in rows]

    def all(self) -> list[CachedContentRecord]:
        with self._db.connect(write=False) as db:
            rows = db.execute("SELECT * FROM cached_contents ORDER BY create_time, id").fetchall()
        return [_from_row(row) for row in rows]

    def set_expiry(self, cache_id: str, expire_time: str, update_time: str) -> None:
        with self._db.connect() as db:
            db.execute("UPDATE cached_contents SET expire_time = ?, update_time = ? WHERE id = ?",
                       (expire_time, update_time, cache_id))

    def delete(self, cache_id: str) -> None:
        with self._db.connect() as db:
            db.execute("DELETE FROM cached_contents WHERE id = ?", (cache_id,))
