"""Keeping the tuning worker running beside the HTTP server.

Training runs in its own process (`python -m gemserve.tuning.worker`), so the API stays responsive and a crash
in training cannot take the server down. The supervisor starts it, restarts it if it dies (a killed worker's
job resumes from its checkpoint in the new one), and stops it with the server. Its pid is written to
`<data_dir>/tuning/worker.pid` for operators and tests. The worker stops by itself when the server is gone,
however the server died (`gemserve.tuning.worker.die_with_parent`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("gemserve.tuning")

RESTART_DELAY_SECONDS = 1.0
MAX_RESTART_DELAY_SECONDS = 60.0
QUICK_EXIT_SECONDS = 60.0  # a worker that exits sooner than this after starting is restarted after a longer wait


class WorkerSupervisor:
    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._process: subprocess.Popen[bytes] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pid_file(self) -> Path:
        return self._data_dir / "tuning" / "worker.pid"

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        delay = RESTART_DELAY_SECONDS
        while not self._stopping:
            started = time.monotonic()
            self._spawn()
            assert self._process is not None
            code = await asyncio.to_thread(self._process.wait)
            if self._stopping:
                break
            # A worker that keeps dying at once (a full disk, a broken install) is restarted ever more slowly.
            quick = time.monotonic() - started < QUICK_EXIT_SECONDS
            delay = min(delay * 2, MAX_RESTART_DELAY_SECONDS) if quick else RESTART_DELAY_SECONDS
            log.warning("tuning worker exited; restarting", extra={"exit_code": code, "in_seconds": delay})
            await asyncio.sleep(delay)

    def _spawn(self) -> None:
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        # The worker logs JSON lines to stderr like the server; they go to the server's stderr.
        self._process = subprocess.Popen([sys.executable, "-m", "gemserve.tuning.worker",
                                          "--data-dir", str(self._data_dir), "--parent-pid", str(os.getpid())])
        self.pid_file.write_text(str(self._process.pid))
        log.info("tuning worker started", extra={"pid": self._process.pid})

    async def stop(self) -> None:
        self._stopping = True
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()  # the worker checkpoints and exits on SIGTERM
            try:
                await asyncio.wait_for(asyncio.to_thread(process.wait), timeout=30)
            except TimeoutError:
                process.kill()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.pid_file.unlink(missing_ok=True)
