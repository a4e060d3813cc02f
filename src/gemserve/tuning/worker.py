"""The tuning worker process: `python -m gemserve.tuning.worker --data-dir D`.

It runs forever, one job at a time: the oldest job (by `created`) that has not finished - a QUEUED one, or a
RUNNING one whose worker died, which resumes from its checkpoint. It looks for new jobs every second. SIGTERM
or SIGINT stops it cleanly: a job in progress is checkpointed after its current step and stays RUNNING for the
next worker. An exclusive lock on `<data_dir>/tuning/worker.lock` (flock, released by the kernel when the
process dies) keeps a second worker waiting until the first is gone. Logs are JSON lines on stderr.

Not here: what running a job means (`runner.py`), the job files (`jobs.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import signal
import threading
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import IO

from gemserve.tuning import jobs

log = logging.getLogger("gemserve.tuning")

POLL_SECONDS = 1.0


def pending_jobs(data_dir: Path, served: Mapping[str, int] | None = None) -> list[Path]:
    """Directories of jobs not yet finished, in the order they are to run: a job that was running first (it
    resumes), then the owners' jobs in turn, so that one key's many jobs do not keep another key's waiting. An
    owner's turn counts the jobs it has had (`served`, by owner) and its jobs waiting before; within a turn,
    oldest first (by `created`, then id)."""
    root = jobs.jobs_root(data_dir)
    if not root.is_dir():
        return []
    found: list[tuple[bool, str, str, str, Path]] = []
    for directory in root.iterdir():
        job_file = directory / jobs.JOB_FILE
        state = jobs.read_progress(directory)["state"]
        if not job_file.is_file() or state in jobs.FINISHED_STATES:
            continue
        try:
            raw = json.loads(job_file.read_text())
            created, owner = str(raw.get("created", "")), str(raw.get("owner", ""))
        except (OSError, ValueError, AttributeError):
            created, owner = "", ""  # unreadable: taken first, and failed at once with the reason
        found.append((state != jobs.RUNNING, created, directory.name, owner, directory))
    turns: dict[str, int] = dict(served or {})
    ordered = []
    for not_running, created, name, owner, directory in sorted(found):
        turn = turns.get(owner, 0)
        turns[owner] = turn + 1
        ordered.append((not_running, turn, created, name, directory))
    return [directory for *_, directory in sorted(ordered)]


def job_owner(directory: Path) -> str:
    try:
        return str(json.loads((directory / jobs.JOB_FILE).read_text()).get("owner", ""))
    except (OSError, ValueError, AttributeError):
        return ""


@contextmanager
def worker_lock(data_dir: Path, stop: threading.Event) -> Iterator[bool]:
    """Hold the worker lock while inside; waits for it, and yields False if told to stop while waiting."""
    path = data_dir / "tuning" / "worker.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle: IO[str] = path.open("a")
    try:
        announced = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not announced:
                    log.info("another tuning worker holds the lock; waiting for it", extra={"lock": str(path)})
                    announced = True
                if stop.wait(POLL_SECONDS):
                    yield False
                    return
        yield True
    finally:
        handle.close()  # closing releases the lock


def serve(data_dir: Path, stop: threading.Event, *, once: bool = False, checkpoint_every: int | None = None) -> None:
    """Run jobs until `stop` is set (or, with `once`, until no job is left)."""
    from gemserve.tuning.runner import CHECKPOINT_EVERY, RunOptions, run_job

    options = RunOptions(checkpoint_every=checkpoint_every or CHECKPOINT_EVERY, should_stop=stop.is_set)
    with worker_lock(data_dir, stop) as locked:
        if not locked:
            return
        log.info("tuning worker ready", extra={"data_dir": str(data_dir), "pid": os.getpid()})
        served: Counter[str] = Counter()  # jobs run per owner: the turns of pending_jobs
        while not stop.is_set():
            waiting = pending_jobs(data_dir, served)
            if not waiting:
                if once:
                    break
                stop.wait(POLL_SECONDS)
                continue
            served[job_owner(waiting[0])] += 1
            state = run_job(data_dir, waiting[0], options)
            log.info("tuning job left", extra={"job_id": waiting[0].name, "state": state})
    log.info("tuning worker stopped")


PARENT_POLL_SECONDS = 1.0
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent_pid: int, stop: threading.Event) -> None:
    """Stop (checkpointing, as on SIGTERM) once the server that started this worker is gone, however it died: a
    worker left behind would hold the lock and keep the restarted server's worker waiting forever. Linux sends
    SIGTERM at the parent's death (PR_SET_PDEATHSIG); a watcher thread also notices re-parenting, elsewhere too."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    def watch() -> None:
        while not stop.wait(PARENT_POLL_SECONDS):
            if os.getppid() != parent_pid:
                log.warning("the server that started this worker is gone; stopping", extra={"parent": parent_pid})
                stop.set()

    if os.getppid() != parent_pid:  # it died before the signal was asked for
        stop.set()
    threading.Thread(target=watch, name="gemserve-parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gemserve.tuning.worker", description="Run LoRA tuning jobs.")
    parser.add_argument("--data-dir", default="./data", help="the server's data directory")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    parser.add_argument("--once", action="store_true", help="exit when no job is left instead of waiting")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="stop when this process (the server that started the worker) is gone")
    args = parser.parse_args(argv)
    # Before tqdm is imported: progress bars (transformers' GGUF conversion has one) would break the JSON lines.
    os.environ.setdefault("TQDM_DISABLE", "1")
    # Everything the worker loads is on this machine; no library should try the model hub (and time out).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from gemserve.logs import setup_logging

    setup_logging(args.log_level)
    logging.captureWarnings(True)  # library warnings become JSON log lines too
    # PEFT asks transformers 5 a deprecated question on every model it wraps; nothing for an operator to do.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    stop = threading.Event()

    def request_stop(signum: int, _: FrameType | None) -> None:
        log.info("stopping after the current step", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    if args.parent_pid is not None:
        die_with_parent(args.parent_pid, stop)

    import torch
    import transformers

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    transformers.utils.logging.disable_progress_bar()  # stderr carries JSON log lines only
    transformers.utils.logging.set_verbosity_error()
    serve(Path(args.data_dir).expanduser().resolve(), stop, once=args.once, checkpoint_every=args.checkpoint_every)


if __name__ == "__main__":
    main()
