"""Starting and stopping a real server for the benchmarks: `gemserve serve` from ./.venv (whatever environment the
benchmark itself runs in), open mode, on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).parents[1]


def start_server(data_dir: Path, *flags: str) -> tuple[str, subprocess.Popen[bytes]]:
    """The server's base URL once it answers, and its process."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "GEMSERVE_API_KEYS": ""}
    process = subprocess.Popen([str(ROOT / ".venv" / "bin" / "python"), "-m", "gemserve.cli", "serve", "--host",
                                "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir), "--log-level",
                                "warning", *flags], env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/v1beta/models", timeout=1)
            return url, process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not start")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
