"""Owner ids and project numbers of API keys."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

from gemserve.identity import Identities, create_secret, owner_of, read_secret, unsalted_project_number


def test_project_numbers_depend_on_the_servers_secret(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    one, other = Identities(create_secret(first)), Identities(create_secret(second))
    number = one.project_number("my-key")
    assert 0 <= number < 10**12
    assert number == Identities(create_secret(first)).project_number("my-key")  # kept: the same file
    assert number != other.project_number("my-key") and number != unsalted_project_number("my-key")
    assert one.caller_for_key("my-key").owner == owner_of("my-key") == other.caller_for_key("my-key").owner


def test_the_secret_is_the_owners_alone_and_written_whole(tmp_path: Path) -> None:
    secret = create_secret(tmp_path)
    assert read_secret(tmp_path) == secret and len(secret) == 32
    assert stat.S_IMODE((tmp_path / "secret.key").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret.key"]  # no partial file left


def test_processes_starting_together_agree_on_one_secret(tmp_path: Path) -> None:
    barrier = threading.Barrier(8)
    secrets: list[bytes] = []

    def start() -> None:
        barrier.wait()
        secrets.append(create_secret(tmp_path))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(secrets)) == 1 and secrets[0] == read_secret(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["secret.key"]
