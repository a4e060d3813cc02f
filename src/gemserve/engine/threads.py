"""Compute threads that cost nothing while their model is idle.

llama.cpp (built with OpenMP), gemserve's output-layer kernel and torch share the process's libgomp. Each thread
that starts parallel work gets a team of worker threads that stays after the work is done, and libgomp counts
every such worker: once they outnumber the cores, it stops spinning at barriers and puts waiting threads to
sleep almost at once (100 spins instead of 300,000). llama.cpp meets hundreds of barriers per token, so a
second loaded model - idle, its workers merely parked - made the busy one's decode 15-25% slower on two cores.

`release_idle_threads()` ends the calling thread's team (OpenMP 5's `omp_pause_resource_all`); the next parallel
work starts a new one, which costs microseconds. Every thread that runs such parallel work calls it when its
queue is empty: the llama.cpp and transformers engine threads before they wait for requests, the embedding and
media threads after each job (torch's image classifier; Whisper's CTranslate2 and OCR's onnxruntime bring thread
pools of their own, which do not count). So only busy models hold workers, and one busy model alone gets the
full spinning budget.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("gemserve.engine")

_OMP_PAUSE_SOFT = 1
T = TypeVar("T")


@functools.cache
def _pause() -> Callable[[int], int] | None:
    try:  # the libgomp already loaded by llama.cpp or torch (same soname: the same instance)
        function = ctypes.CDLL("libgomp.so.1").omp_pause_resource_all
    except (OSError, AttributeError):
        log.info("libgomp without omp_pause_resource_all: idle models keep their worker threads")
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


def release_idle_threads() -> bool:
    """End the calling thread's OpenMP worker team; False where that cannot be done."""
    pause = _pause()
    return pause is not None and pause(_OMP_PAUSE_SOFT) == 0


def releasing(work: Callable[[], T]) -> Callable[[], T]:
    """`work`, then the calling thread's team released: for jobs run on a pool's thread."""
    def run() -> T:
        try:
            return work()
        finally:
            release_idle_threads()

    return run
