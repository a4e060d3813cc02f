"""Running untrusted Python in a bubblewrap sandbox: the codeExecution tool's boundary.

Each run is a fresh `bwrap` with every namespace unshared (no network at all, not even loopback; its own pids,
so no process of the server is visible or signalable), a cleared environment, the system (`/usr`) and the
sandbox's Python environment mounted read-only, and nothing else of the machine: no data directory, no home
directories, no `/etc`. The working directory is a private tmpfs of bounded size. When the server runs as root,
the sandbox runs as `nobody` besides, so that no file permission or process limit is a root's. Inside,
`runner.py` sets the resource limits (CPU time, address space, processes, file size, open files) before the
code runs; the server enforces the wall-clock deadline and the output size, and kills the whole sandbox when
either is passed or the caller goes away.

Not here: when code runs and what the model sees of it (`service/code_execution.py`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from gemserve.sandbox.seccomp import memory_filter

log = logging.getLogger("gemserve.sandbox")

OK = "OUTCOME_OK"
FAILED = "OUTCOME_FAILED"
DEADLINE_EXCEEDED = "OUTCOME_DEADLINE_EXCEEDED"
NOBODY = 65534
SANDBOX_ENV_NAME = ".venv-sandbox"
PROBE = "import numpy, sympy, pandas, matplotlib; print('ready')"
MAX_FIGURES = 8
MAX_REPORT_BYTES = 16 << 20
RECHECK_SECONDS = 30.0  # after a failed readiness check, the next request checks again once this has passed


@dataclass(frozen=True)
class Limits:
    cpu_seconds: int = 30  # Google's limit for one run
    wall_seconds: float = 40.0  # CPU time can only lag wall time; sleeping code is stopped here
    memory_bytes: int = 2 << 30  # address space: numpy, pandas and matplotlib take ~1 GiB of it when imported
    processes: int = 64  # threads count too
    file_bytes: int = 64 << 20  # any one file written
    open_files: int = 256
    tmpfs_bytes: int = 256 << 20  # the whole working directory
    shm_bytes: int = 64 << 20  # /dev/shm, for multiprocessing's semaphores and shared arrays
    output_bytes: int = 32 << 10  # what the model is shown; the rest is cut with a note
    output_cap_bytes: int = 4 << 20  # the run is stopped when it writes more than this


@dataclass(frozen=True)
class Execution:
    outcome: str  # OK, FAILED or DEADLINE_EXCEEDED
    output: str  # stdout and stderr together; for a failure, ending with the traceback
    figures: tuple[bytes, ...] = ()  # matplotlib figures left open, as PNG


class SandboxUnavailable(Exception):
    """Code cannot run here; the message names what is missing."""


def default_python() -> Path | None:
    """The sandbox environment the set-up makes: `.venv-sandbox` beside the environment gemserve runs in."""
    candidate = Path(sys.prefix).parent / SANDBOX_ENV_NAME / "bin" / "python"
    return candidate if candidate.exists() else None


class Sandbox:
    """Runs code, at most `concurrency` runs at a time. `ready()` checks that a sandbox can be made."""

    def __init__(self, python: Path | None, limits: Limits | None = None, concurrency: int | None = None) -> None:
        self.python = python
        self.limits = limits or Limits()
        slots = concurrency or max(2, os.cpu_count() or 2)
        self._slots = asyncio.Semaphore(slots)
        # Each run's report is read by a thread of this pool, never of the loop's default one: runs last up to
        # the wall deadline, and the server's other work must not wait for a thread meanwhile.
        self._readers = ThreadPoolExecutor(slots + 1, thread_name_prefix="sandbox-report")
        self._checked: asyncio.Task[None] | None = None
        self._checked_at = 0.0
        self._runner = resources.files("gemserve.sandbox").joinpath("runner.py").read_text()
        self._filter = memory_filter()
        self._mounts: list[str] = []

    async def ready(self) -> None:
        """Raises SandboxUnavailable naming what is missing when no sandbox can be made here. A failed check is
        repeated after RECHECK_SECONDS (a set-up finished meanwhile, or a slow first start)."""
        failed = self._checked is not None and self._checked.done() and self._checked.exception() is not None
        if self._checked is None or (failed and time.monotonic() - self._checked_at > RECHECK_SECONDS):
            self._checked = asyncio.create_task(self._check())
            self._checked_at = time.monotonic()
        await asyncio.shield(self._checked)

    async def run(self, code: str) -> Execution:
        await self.ready()
        async with self._slots:
            return await self._run(code)

    async def _check(self) -> None:
        if shutil.which("bwrap") is None:
            raise SandboxUnavailable("bubblewrap (bwrap) is not installed; install the Debian/Ubuntu package "
                                     "`bubblewrap` (or your system's equivalent).")
        if self.python is None or not self.python.exists():
            raise SandboxUnavailable("the sandbox's Python environment is missing: run scripts/setup.sh, which "
                                     "makes .venv-sandbox, or name one with --sandbox-python.")
        self._mounts = await self._python_dirs()
        probe = await self._run(PROBE)
        if probe.outcome != OK or probe.output.strip() != "ready":
            raise SandboxUnavailable("a bubblewrap sandbox could not run Python here (are user namespaces "
                                     f"enabled?): {probe.output.strip()[-500:]}")
        log.info("sandbox ready", extra={"python": str(self.python)})

    async def _python_dirs(self) -> list[str]:
        """The directories the sandbox's Python lives in, outside /usr (which is mounted anyway)."""
        assert self.python is not None
        process = await asyncio.create_subprocess_exec(
            str(self.python), "-I", "-c",
            "import json, sys; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, sys.executable]))",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await process.communicate()
        if process.returncode != 0:
            raise SandboxUnavailable(f"the sandbox's Python {self.python} does not start: {err.decode()[-300:]}")
        prefix, base, exec_prefix, executable = json.loads(out)
        dirs = {prefix, base, exec_prefix, str(Path(executable).resolve().parent.parent),
                str(self.python.parent.parent)}
        kept: list[str] = []
        for path in sorted(dirs, key=len):
            real = os.path.realpath(path)
            if real == "/usr" or real.startswith("/usr/") or any(real.startswith(k + "/") or real == k for k in kept):
                continue
            kept.append(real)
        return kept

    def command(self, report_fd: int, filter_fd: int | None) -> list[str]:
        assert self.python is not None
        limits = self.limits
        rlimits = {"RLIMIT_CPU": limits.cpu_seconds, "RLIMIT_AS": limits.memory_bytes,
                   "RLIMIT_NPROC": limits.processes, "RLIMIT_FSIZE": limits.file_bytes,
                   "RLIMIT_NOFILE": limits.open_files, "RLIMIT_CORE": 0}
        prefix = []
        if os.geteuid() == 0:
            # As root, the sandbox's files would be root's to read and its processes root's (which no process
            # limit binds): it runs as nobody instead, which makes its user namespace unprivileged too.
            prefix = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all"]
        args = [*prefix, "bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
                "--ro-bind", "/usr", "/usr"]
        for name in ("bin", "lib", "lib32", "lib64", "sbin"):
            target = f"/{name}"
            if os.path.islink(target):  # merged /usr: /bin -> usr/bin
                args += ["--symlink", os.readlink(target), target]
            elif os.path.isdir(target):
                args += ["--ro-bind", target, target]
        # Every writable place is a tmpfs of bounded size; the rest is read-only, /dev's own tmpfs included.
        # /tmp comes before the Python's mounts: that Python may live under /tmp, and is then mounted on top.
        args += ["--size", str(limits.tmpfs_bytes), "--tmpfs", "/tmp"]
        if os.path.isdir("/etc/fonts"):  # matplotlib's text rendering reads the font configuration
            args += ["--ro-bind", "/etc/fonts", "/etc/fonts"]
        for path in self._mounts:
            args += ["--ro-bind", path, path]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8",
               "MPLBACKEND": "Agg",
               "MPLCONFIGDIR": "/tmp/.matplotlib", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        for key, value in env.items():
            args += ["--setenv", key, value]
        if filter_fd is not None:
            args += ["--seccomp", str(filter_fd)]
        args += ["--chdir", "/tmp", "--proc", "/proc", "--dev", "/dev",
                 "--size", str(limits.shm_bytes), "--tmpfs", "/dev/shm", "--remount-ro", "/dev", "--remount-ro", "/",
                 self._executable(), "-I", "-u", "-c", self._runner,
                 json.dumps({"limits": rlimits, "report_fd": report_fd})]
        return args

    def _executable(self) -> str:
        """The Python's path as mounted: its directory resolved (.venv-sandbox may be a link to the environment),
        the file itself not (a venv's python is a link out of the venv, and must be started from inside it)."""
        assert self.python is not None
        return os.path.join(os.path.realpath(self.python.parent), self.python.name)

    async def _run(self, code: str) -> Execution:
        """Raises SandboxUnavailable when no sandbox could be started (out of processes or files, say)."""
        passed: list[int] = []
        try:
            read_report, write_report = os.pipe()
            passed.append(write_report)
            filter_fd = None
            if self._filter is not None:
                filter_fd, write_filter = os.pipe()
                passed.append(filter_fd)
                with os.fdopen(write_filter, "wb") as pipe:  # a few dozen bytes: the pipe holds them
                    pipe.write(self._filter)
            process = await asyncio.create_subprocess_exec(
                *self.command(write_report, filter_fd), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, pass_fds=passed,
                start_new_session=True,
                # Not the server's environment, not even for bwrap: the code can read its sandbox's first
                # process's /proc/1/environ, and that process is bwrap.
                env={"PATH": os.defpath})
        except OSError as exc:
            if passed:
                os.close(read_report)
            raise SandboxUnavailable(f"the sandbox could not be started: {exc}") from None
        finally:
            for fd in passed:
                os.close(fd)
        report = asyncio.get_running_loop().run_in_executor(self._readers, _read_report, read_report)
        try:
            assert process.stdin is not None and process.stdout is not None
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                process.stdin.write(code.encode("utf-8", errors="replace"))
                await process.stdin.drain()
                process.stdin.close()
            output = _Output(self.limits)
            try:
                async with asyncio.timeout(self.limits.wall_seconds):
                    while not output.flooded and (chunk := await process.stdout.read(65536)):
                        output.add(chunk)
                    if not output.flooded:
                        await process.wait()
            except TimeoutError:
                output.timed_out = True
        finally:
            _kill(process)  # whatever happened (a cancelled caller too), nothing of the sandbox outlives its run
            await process.communicate()  # what is left in the pipe: the process counts as ended once it is read
        return _execution(output, process.returncode, *await report)


class _Output:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.kept = bytearray()
        self.dropped = 0
        self.timed_out = False
        self.flooded = False

    def add(self, chunk: bytes) -> None:
        room = self.limits.output_bytes - len(self.kept)
        self.kept += chunk[:max(room, 0)]
        self.dropped += max(len(chunk) - max(room, 0), 0)
        # Past the cap, the run is stopped: a loop printing without end would otherwise run to its deadline.
        self.flooded = len(self.kept) + self.dropped > self.limits.output_cap_bytes

    def text(self) -> str:
        text = self.kept.decode("utf-8", errors="replace")
        if self.dropped:
            text += f"\n[output truncated: {self.dropped} more bytes were written]"
        return text


def _execution(output: _Output, status: int | None, ok: bool | None, figures: tuple[bytes, ...]) -> Execution:
    text = output.text()
    if output.timed_out or status in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        note = "the code ran past its time limit and was stopped"
        return Execution(DEADLINE_EXCEEDED, f"{text}\n[{note}]" if text else f"[{note}]")
    if output.flooded:
        return Execution(FAILED, f"{text}\n[the code wrote more than {output.limits.output_cap_bytes} bytes of "
                                 "output and was stopped]")
    if ok is None:  # it ended without reporting: killed from inside, or out of memory before reporting
        return Execution(FAILED, f"{text}\n[the code's process ended abruptly (status {status})]".lstrip("\n"))
    return Execution(OK if ok else FAILED, text, figures)


def _read_report(fd: int) -> tuple[bool | None, tuple[bytes, ...]]:
    """The runner's report: (whether the code ran to its end, figures); (None, ()) when there is none. Read,
    parsed and decoded in a reader thread: it may be megabytes of base64."""
    chunks = []
    size = 0
    with os.fdopen(fd, "rb") as pipe:
        while chunk := pipe.read(65536):
            size += len(chunk)
            if size <= MAX_REPORT_BYTES:
                chunks.append(chunk)
    if size > MAX_REPORT_BYTES:
        return None, ()
    try:
        report = json.loads(b"".join(chunks))
    except ValueError:
        return None, ()
    if not isinstance(report, dict) or not isinstance(report.get("ok"), bool):
        return None, ()
    figures: list[bytes] = []
    for item in report.get("figures") or []:
        if isinstance(item, str) and len(figures) < MAX_FIGURES:
            with contextlib.suppress(binascii.Error, ValueError):
                figures.append(base64.b64decode(item, validate=True))
    return report["ok"], tuple(figures)


def _kill(process: asyncio.subprocess.Process) -> None:
    """bwrap's own process group (start_new_session); its pid namespace dies with its first process."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        process.kill()
