"""The metadata database: one SQLite file under the data directory, with ordered, recorded migrations.

Each migration is a named function applied once, in order, inside a transaction, and recorded in
`schema_migrations`; adding a table or column means appending a function, never editing an applied one.
Connections are opened per call site with WAL journaling, so the HTTP server and the tuning worker can share
the file safely.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

Migration = Callable[[sqlite3.Connection], None]


class DatabaseError(RuntimeError):
    """The database file cannot be opened or set up; the server cannot start with it."""


def _tuned_models_table(db: sqlite3.Connection, key: str) -> None:
    db.execute(
        f"""CREATE TABLE tuned_models (
            id TEXT NOT NULL,
            owner TEXT NOT NULL,
            display_name TEXT NOT NULL DEFAULT '',
            description TEXT NOT NULL DEFAULT '',
            base_model TEXT NOT NULL,
            source_tuned_model TEXT,
            create_time TEXT NOT NULL,
            update_time TEXT NOT NULL,
            temperature REAL,
            top_p REAL,
            top_k INTEGER,
            hyperparameters TEXT NOT NULL,
            reader_project_numbers TEXT NOT NULL DEFAULT '[]',
            operation_id TEXT NOT NULL,
            example_count INTEGER NOT NULL,
            PRIMARY KEY ({key})
        )"""
    )


def _create_tuned_models(db: sqlite3.Connection) -> None:
    _tuned_models_table(db, "id")
    db.execute("CREATE INDEX tuned_models_owner ON tuned_models (owner, create_time)")


def _tuned_model_ids_per_owner(db: sqlite3.Connection) -> None:
    """A tuned model's id is unique among its owner's models, not among everyone's: one namespace for all keys
    told any key, by a 409, which ids other keys had taken."""
    db.execute("ALTER TABLE tuned_models RENAME TO tuned_models_shared_ids")
    db.execute("DROP INDEX tuned_models_owner")
    _tuned_models_table(db, "owner, id")
    db.execute("INSERT INTO tuned_models SELECT * FROM tuned_models_shared_ids")
    db.execute("DROP TABLE tuned_models_shared_ids")
    db.execute("CREATE INDEX tuned_models_owner ON tuned_models (owner, create_time)")
    db.execute("CREATE INDEX tuned_models_id ON tuned_models (id)")


def _create_cached_contents(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE cached_contents (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            model TEXT NOT NULL,
            display_name TEXT NOT NULL DEFAULT '',
            content TEXT NOT NULL,
            token_count INTEGER NOT NULL,
            create_time TEXT NOT NULL,
            update_time TEXT NOT NULL,
            expire_time TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX cached_contents_owner ON cached_contents (owner, create_time)")


def _create_files(db: sqlite3.Connection) -> None:
    """Uploaded files (a record exists only once its bytes are complete) and uploads still under way."""
    db.execute(
        """CREATE TABLE files (
            id TEXT NOT NULL,
            owner TEXT NOT NULL,
            display_name TEXT NOT NULL DEFAULT '',
            mime_type TEXT NOT NULL,
            size_bytes INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            create_time TEXT NOT NULL,
            update_time TEXT NOT NULL,
            expire_time TEXT NOT NULL,
            state TEXT NOT NULL,
            error TEXT,
            rendering TEXT,
            PRIMARY KEY (owner, id)
        )"""
    )
    db.execute("CREATE INDEX files_owner ON files (owner, create_time)")
    db.execute(
        """CREATE TABLE uploads (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            file_id TEXT NOT NULL,
            display_name TEXT NOT NULL DEFAULT '',
            mime_type TEXT NOT NULL,
            size_bytes INTEGER,
            received INTEGER NOT NULL DEFAULT 0,
            expire_time TEXT NOT NULL
        )"""
    )


def _file_blob_names(db: sqlite3.Connection) -> None:
    """Each file's bytes under a name of their own (the upload's id), so that a file deleted or uploaded again
    under the same name never shares a path with another; '' for files stored under their id before."""
    db.execute("ALTER TABLE files ADD COLUMN blob TEXT NOT NULL DEFAULT ''")


MIGRATIONS: list[tuple[str, Migration]] = [
    ("0001_create_tuned_models", _create_tuned_models),
    ("0002_create_cached_contents", _create_cached_contents),
    ("0003_tuned_model_ids_per_owner", _tuned_model_ids_per_owner),
    ("0004_create_files", _create_files),
    ("0005_file_blob_names", _file_blob_names),
]


def insert_row(db: sqlite3.Connection, table: str, row: dict[str, Any], or_ignore: bool = False) -> int:
    """INSERT (OR IGNORE) a row given as {column: value}; the number of rows inserted. `table` and the column
    names come from the code, never from a request."""
    columns = ", ".join(row)
    marks = ", ".join(f":{c}" for c in row)
    verb = "INSERT OR IGNORE" if or_ignore else "INSERT"
    return db.execute(f"{verb} INTO {table} ({columns}) VALUES ({marks})", row).rowcount


class Database:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            plain = sqlite3.connect(path)
            plain.execute("PRAGMA journal_mode=WAL")  # must happen outside a transaction
            plain.close()
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise DatabaseError(f"cannot open the database {path}: {exc} (is the data directory writable, and is "
                                "there free space?)") from exc

    def _migrate(self) -> None:
        with self.connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied TEXT NOT NULL)")
            applied = {row[0] for row in db.execute("SELECT name FROM schema_migrations")}
            for name, migrate in MIGRATIONS:
                if name not in applied:
                    migrate(db)
                    db.execute("INSERT INTO schema_migrations VALUES (?, datetime('now'))", (name,))

    @contextmanager
    def connect(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """A connection whose changes commit together when the block ends, or not at all. A reading one
        (`write=False`) takes no write lock, so reads go on when the disk is full."""
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            yield db
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        finally:
            db.close()
