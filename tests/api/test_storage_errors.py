"""A data directory that cannot be written: a clear message at start-up, clear 4xx answers at run time."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest

from gemserve.api.errors import storage_error
from gemserve.config import check_data_dir
from gemserve.store.db import Database, DatabaseError


def test_an_unwritable_data_dir_stops_start_up_with_a_message(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="data directory .* is not writable .*--data-dir"):
        check_data_dir(blocker / "data")


def test_a_database_that_cannot_be_opened_is_named(tmp_path: Path) -> None:
    (tmp_path / "gemserve.db").mkdir()  # a directory where the file should be
    with pytest.raises(DatabaseError, match="cannot open the database .*gemserve.db"):
        Database(tmp_path / "gemserve.db")


@pytest.mark.parametrize(("exc", "status", "words"), [
    (OSError(errno.ENOSPC, "No space left on device"), "RESOURCE_EXHAUSTED", "is full"),
    (sqlite3.OperationalError("database or disk is full"), "RESOURCE_EXHAUSTED", "is full"),
    (OSError(errno.EROFS, "Read-only file system"), "FAILED_PRECONDITION", "not writable"),
    (sqlite3.OperationalError("attempt to write a readonly database"), "FAILED_PRECONDITION", "not writable"),
    (OSError(errno.EIO, "I/O error"), "INTERNAL", "internal error"),
])
def test_storage_errors_name_the_data_dir(exc: Exception, status: str, words: str) -> None:
    error = storage_error(exc, Path("/srv/gemserve"))  # type: ignore[arg-type]
    assert error.status == status and words in error.message
    assert (status == "INTERNAL") or "/srv/gemserve" in error.message


def test_reads_take_no_write_lock(tmp_path: Path) -> None:
    db = Database(tmp_path / "gemserve.db")
    with db.connect() as writer:  # holds the write lock
        writer.execute("SELECT 1")
        with db.connect(write=False) as reader:
            assert reader.execute("SELECT count(*) FROM tuned_models").fetchone()[0] == 0
