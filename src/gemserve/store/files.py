"""File records and uploads under way.

A file's bytes live at `files/<owner>/<upload id>` under the data directory, a name no other file ever has (so
a file deleted, or uploaded again under its name, never shares a path with another). Its record (and so the
file) exists only once those bytes are complete: `finish_upload` inserts it and drops the upload in one
transaction. An upload's bytes so far are at `uploads/<upload id>`, and `received` counts what was stored of
them for good.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gemserve.store.db import Database, insert_row


@dataclass
class FileRecord:
    id: str
    owner: str
    mime_type: str
    size_bytes: int
    sha256: str  # hex
    create_time: str
    update_time: str
    expire_time: str
    state: str  # PROCESSING, ACTIVE or FAILED
    display_name: str = ""
    error: dict[str, Any] | None = None  # google.rpc.Status of a FAILED file
    rendering: dict[str, Any] | None = None  # what processing made of it (media/rendering.py), once ACTIVE
    blob: str = ""  # the name of its bytes under files/<owner>/ (the upload's id); '' for the file's id


@dataclass
class UploadRecord:
    id: str  # the upload URL's credential
    owner: str
    file_id: str
    mime_type: str
    expire_time: str
    display_name: str = ""
    size_bytes: int | None = None  # declared at the start, if it was
    received: int = 0


def _file_from_row(row: Any) -> FileRecord:
    values = dict(row)
    for key in ("error", "rendering"):
        if values[key] is not None:
            values[key] = json.loads(values[key])
    return FileRecord(**values)


def _file_row(record: FileRecord) -> dict[str, Any]:
    row = asdict(record)
    for key in ("error", "rendering"):
        if row[key] is not None:
            row[key] = json.dumps(row[key], ensure_ascii=False)
    return row


class FileStore:
    def __init__(self, db: Database, data_dir: Path) -> None:
        self._db = db
        self.files_dir = data_dir / "files"
        self.uploads_dir = data_dir / "uploads"

    def blob(self, record: FileRecord) -> Path:
        return self.files_dir / record.owner / (record.blob or record.id)

    def partial(self, upload_id: str) -> Path:
        return self.uploads_dir / upload_id

    # ---- files --------------------------------------------------------------------------------------------

    def get(self, owner: str, file_id: str) -> FileRecord | None:
        with self._db.connect(write=False) as db:
            row = db.execute("SELECT * FROM files WHERE owner = ? AND id = ?", (owner, file_id)).fetchone()
        return _file_from_row(row) if row else None

    def page(self, owner: str, offset: int, size: int) -> list[FileRecord]:
        """Newest first, as Google lists them."""
        with self._db.connect(write=False) as db:
            rows = db.execute("SELECT * FROM files WHERE owner = ? ORDER BY create_time DESC, id LIMIT ? OFFSET ?",
                              (owner, size, offset)).fetchall()
        return [_file_from_row(row) for row in rows]

    def total_bytes(self, owner: str) -> int:
        with self._db.connect(write=False) as db:
            files = db.execute("SELECT COALESCE(SUM(size_bytes), 0) FROM files WHERE owner = ?", (owner,)).fetchone()
            uploads = db.execute("SELECT COALESCE(SUM(received), 0) FROM uploads WHERE owner = ?",
                                 (owner,)).fetchone()
        return int(files[0]) + int(uploads[0])

    def with_state(self, state: str) -> list[FileRecord]:
        with self._db.connect(write=False) as db:
            rows = db.execute("SELECT * FROM files WHERE state = ? ORDER BY create_time", (state,)).fetchall()
        return [_file_from_row(row) for row in rows]

    def expired(self, now: str) -> list[tuple[str, str]]:
        with self._db.connect(write=False) as db:
            rows = db.execute("SELECT owner, id FROM files WHERE expire_time <= ?", (now,)).fetchall()
        return [(row["owner"], row["id"]) for row in rows]

    def all_blobs(self) -> set[tuple[str, str]]:
        """(owner, name) of every file's bytes."""
        with self._db.connect(write=False) as db:
            rows = db.execute("SELECT owner, CASE blob WHEN '' THEN id ELSE blob END AS name FROM files").fetchall()
        return {(row["owner"], row["name"]) for row in rows}

    def set_processed(self, record: FileRecord, state: str, update_time: str,
                      rendering: dict[str, Any] | None, error: dict[str, Any] | None) -> bool:
        """False when the file is gone (deleted while it was processed, maybe uploaded again under its name: the
        creation time tells the two apart)."""
        with self._db.connect() as db:
            changed = db.execute(
                "UPDATE files SET state = ?, update_time = ?, rendering = ?, error = ? "
                "WHERE owner = ? AND id = ? AND create_time = ?",
                (state, update_time, None if rendering is None else json.dumps(rendering, ensure_ascii=False),
                 None if error is None else json.dumps(error), record.owner, record.id, record.create_time)).rowcount
        return changed > 0

    def delete(self, owner: str, file_id: str) -> FileRecord | None:
        """The record deleted, or None if there was none."""
        with self._db.connect() as db:
            row = db.execute("SELECT * FROM files WHERE owner = ? AND id = ?", (owner, file_id)).fetchone()
            db.execute("DELETE FROM files WHERE owner = ? AND id = ?", (owner, file_id))
        return _file_from_row(row) if row else None

    # ---- uploads ------------------------------------------------------------------------------------------

    def start_upload(self, upload: UploadRecord) -> None:
        with self._db.connect() as db:
            insert_row(db, "uploads", asdict(upload))

    def upload(self, upload_id: str) -> UploadRecord | None:
        with self._db.connect(write=False) as db:
            row = db.execute("SELECT * FROM uploads WHERE id = ?", (upload_id,)).fetchone()
        return UploadRecord(**dict(row)) if row else None

    def uploading(self, owner: str, file_id: str) -> bool:
        with self._db.connect(write=False) as db:
            return db.execute("SELECT 1 FROM uploads WHERE owner = ? AND file_id = ?",
                              (owner, file_id)).fetchone() is not None

    def set_received(self, upload_id: str, received: int) -> None:
        with self._db.connect() as db:
            db.execute("UPDATE uploads SET received = ? WHERE id = ?", (received, upload_id))

    def finish_upload(self, upload_id: str, record: FileRecord) -> bool:
        """The file's record in, the upload out, together. False (nothing changed) when the owner has a file of
        that id by now."""
        with self._db.connect() as db:
            if db.execute("SELECT 1 FROM files WHERE owner = ? AND id = ?", (record.owner, record.id)).fetchone():
                return False
            insert_row(db, "files", _file_row(record))
            db.execute("DELETE FROM uploads WHERE id = ?", (upload_id,))
        return True

    def drop_upload(self, upload_id: str) -> None:
        with self._db.connect() as db:
            db.execute("DELETE FROM uploads WHERE id = ?", (upload_id,))

    def expired_uploads(self, now: str) -> list[str]:
        with self._db.connect(write=False) as db:
            rows = db.execute("SELECT id FROM uploads WHERE expire_time <= ?", (now,)).fetchall()
        return [row["id"] for row in rows]

    def upload_ids(self) -> set[str]:
        with self._db.connect(write=False) as db:
            return {row["id"] for row in db.execute("SELECT id FROM uploads").fetchall()}
