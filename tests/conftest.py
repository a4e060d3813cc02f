"""Shared fixtures: the packaged model file, and real servers started on 127.0.0.1 for integration tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gemserve.models.catalog import packaged_default_gguf

API_KEY = "test-key-1"
OTHER_KEY = "test-key-2"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gemserve-data")


@pytest.fixture(scope="session")
def default_gguf(data_dir: Path) -> Path:
    return packaged_default_gguf(data_dir)


# Tests that use these fixtures start real servers or read real weights: they are the slow part of the suite.
SLOW_FIXTURES = {"server", "keyed_server", "registry_server", "default_gguf"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    data_dir: Path


def own_data_dir(tmp_path_factory: pytest.TempPathFactory, shared: Path, name: str) -> Path:
    """A data dir of its own that shares the assembled model and converted weights with `shared`."""
    own = tmp_path_factory.mktemp(name)
    for sub in ("models", "hf"):
        (shared / sub).mkdir(exist_ok=True)
        (own / sub).symlink_to(shared / sub)
    return own


def start_server(data_dir: Path, log: Path, api_keys: str = "", extra: tuple[str, ...] = ()) -> Server:
    port = free_port()
    env = {**os.environ, "GEMSERVE_API_KEYS": api_keys}
    cmd = [sys.executable, "-m", "gemserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--data-dir", str(data_dir), "--context-size", "8192", *extra]
    process = subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()}")
        try:
            httpx.get(f"{url}/v1beta/models", headers={"x-goog-api-key": API_KEY}, timeout=1)
            return Server(url, process, log, data_dir)
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"server did not start:\n{log.read_text()}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def server(data_dir: Path, default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The server in open local mode, with gemini-2.0-flash as an alias of the default model."""
    log = tmp_path_factory.mktemp("logs") / "open.log"
    srv = start_server(data_dir, log, extra=("--alias", "gemini-2.0-flash=gemma-3-270m", "--no-tuning-worker"))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def keyed_server(data_dir: Path, default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The server with API keys required."""
    log = tmp_path_factory.mktemp("logs") / "keyed.log"
    srv = start_server(data_dir, log, api_keys=f"{API_KEY},{OTHER_KEY}",
                       extra=("--max-sequences", "2", "--no-tuning-worker"))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def registry_server(data_dir: Path, default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Keys required, no tuning worker: tuned models stay CREATING, for tests of the records and access rules."""
    log = tmp_path_factory.mktemp("logs") / "registry.log"
    own_data = own_data_dir(tmp_path_factory, data_dir, "registry-data")
    srv = start_server(own_data, log, api_keys=f"{API_KEY},{OTHER_KEY}", extra=("--no-tuning-worker",))
    yield srv
    stop_server(srv)
