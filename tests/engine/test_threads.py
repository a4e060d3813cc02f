"""Idle compute threads: a thread that ran OpenMP work lets its worker team go, so that an idle model leaves no
parked workers behind to make libgomp stop spinning for the busy one (engine/threads.py)."""

from __future__ import annotations

import ctypes
import os
import threading
import time

import numpy as np
import pytest

from gemserve.engine.backends.output_head import _kernel
from gemserve.engine.threads import release_idle_threads, releasing

NAME = b"gemserve-omp"  # the test thread's name, which the threads it creates inherit


def threads_now() -> set[str]:
    """The ids of the process's threads named NAME: the test thread and the OpenMP workers it created, not the
    threads other tests leave running or start meanwhile."""
    named = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm", "rb") as comm:
                if comm.read().strip() == NAME:
                    named.add(tid)
        except OSError:  # ended meanwhile
            pass
    return named


def settled(allowed: set[str], timeout: float = 2.0) -> set[str]:
    """`threads_now()` once none beyond `allowed` are left, or as it is after `timeout`: a released worker is
    told to end and ends on its own a moment later (it was still listed once, right after a release, in CI)."""
    deadline = time.monotonic() + timeout
    while (now := threads_now()) - allowed and time.monotonic() < deadline:
        time.sleep(0.01)
    return now


def name_this_thread() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(15, ctypes.c_char_p(NAME), 0, 0, 0) == 0  # PR_SET_NAME


def parallel_work() -> None:
    """A parallel region of two threads (the output-layer kernel's packing, on a tiny matrix)."""
    lib = _kernel()
    rows, k = 64, 64
    source = np.zeros(rows * k // 32 * 34, dtype=np.uint8)
    packed = np.zeros(lib.output_head_packed_bytes(rows, k), dtype=np.uint8)  # type: ignore[union-attr]
    assert lib.output_head_pack(source.ctypes.data, rows, k, packed.ctypes.data, 2) == 0  # type: ignore[union-attr]


@pytest.mark.skipif(_kernel() is None or not os.path.isdir("/proc/self/task"),
                    reason="needs the output-layer kernel (built with OpenMP) and /proc")
def test_a_thread_that_ran_parallel_work_lets_its_workers_go() -> None:
    seen: dict[str, set[str]] = {}
    released: list[bool] = []
    ready, done = threading.Event(), threading.Event()

    def worker() -> None:
        name_this_thread()
        seen["before"] = threads_now()
        parallel_work()
        seen["holding"] = threads_now()  # the team's worker stays parked after the work
        released.append(release_idle_threads())
        seen["after"] = settled(seen["before"])
        releasing(parallel_work)()  # the next job makes a team anew and lets it go too
        seen["after job"] = settled(seen["before"])
        ready.set()
        done.wait(5)

    thread = threading.Thread(target=worker)
    thread.start()
    ready.wait(10)
    done.set()
    thread.join()
    assert released == [True]
    team = seen["holding"] - seen["before"]
    assert len(team) == 1  # two threads in the region: this one and one worker
    assert not team & seen["after"]
    assert not seen["after job"] - seen["after"]  # the second job's worker is gone too
