"""gemserve's Q5_0, Q6_K and Q4_K matrix products, and its attention for every forward pass, inside
llama.cpp (`_q5_0.c` and `_attention.h` say how and why).

`load()` puts the kernel where llama.cpp's CPU backend will find it: llama-cpp-python loads its libraries with
RTLD_NOW, which binds every function they call as they load, so the kernel must be in the process's global scope
before `llama_cpp` is imported. `gemserve/__init__.py` calls it first thing, so importing any part of gemserve does.
`install()` then hands the kernel llama.cpp's own function, for the products it leaves to llama.cpp. The same
library declines llama.cpp's tiled path for products of other quantized types (slower than llama.cpp's plain one
for a few tokens, and rounding a prompt's tokens by where they fall in its tiles), which is where the Q6_K and
Q4_K products come to the kernel (`_q5_0.c`).
`ModelWeights` registers the memory a model's file is mapped at while the model is loaded, and frees the kernel's
packed copies when it is gone; pages of Q5_0 matrices in a shared read-only mapping are let go once packed.
Without the built kernel, without AVX2, where `llama_cpp` was imported first, or where the model's file is not
mapped (no /proc), the products stay llama.cpp's.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("gemserve.engine")

_I64, _PTR, _UPTR = ctypes.c_int64, ctypes.c_void_p, ctypes.c_size_t
K_QUANT_TYPES = {"Q4_K": 12, "Q6_K": 14}  # ggml_type of the K-quants the kernel multiplies (k_quant_* in _q5_0.c)

# Model loads that register weights run one at a time: a model's weights are the mappings of its file that
# appeared while it loaded, which another load of the same file at the same time would blur.
_loading = threading.Lock()


@functools.cache
def load() -> ctypes.CDLL | None:
    """The kernel's library, loaded into the global scope; None where llama.cpp cannot be made to call it."""
    if os.environ.get("GEMSERVE_Q5_0_KERNEL", "1") == "0" or "llama_cpp" in sys.modules:
        return None
    spec = importlib.util.find_spec("gemserve.engine.backends._q5_0")
    if spec is None or spec.origin is None:
        return None
    try:
        # Asked first privately: once in the global scope, its llamafile_sgemm stands in for llama.cpp's.
        if not ctypes.CDLL(spec.origin).q5_0_supported():
            return None
        return ctypes.CDLL(spec.origin, mode=os.RTLD_GLOBAL)
    except (OSError, AttributeError) as exc:  # a broken or stale build: llama.cpp keeps its own products
        log.warning("Q5_0 kernel not loaded (%s); run scripts/setup.sh", exc)
        return None


@functools.cache
def install() -> ctypes.CDLL | None:
    """The kernel, given llama.cpp's own `llamafile_sgemm` for the products it hands back; None where it is
    not in use."""
    lib = load()
    if lib is None:
        return None
    import llama_cpp  # noqa: F401 - loads llama.cpp's libraries, in which the kernel finds llama.cpp's own function

    try:
        lib.q5_0_original_found.restype = ctypes.c_int
        lib.q5_0_set_enabled.argtypes = [ctypes.c_int]
        lib.q5_0_set_tiled_from.argtypes = [_I64]
        lib.q5_0_tiled_calls.restype = _I64
        lib.q5_0_tiled_calls.argtypes = [ctypes.c_int]
        lib.q5_0_products.restype = _I64
        lib.q5_0_packed_matrices.restype = _I64
        lib.q5_0_add_range.argtypes = [_UPTR, _UPTR]
        lib.q5_0_add_file_range.argtypes = [_UPTR, _UPTR]
        lib.q5_0_release_range.restype = _I64
        lib.q5_0_release_range.argtypes = [_UPTR, _UPTR]
        lib.q5_0_packed_bytes.restype = _I64
        lib.q5_0_packed_bytes.argtypes = [_I64, _I64]
        lib.q5_0_pack.argtypes = [_PTR, _I64, _I64, _I64, _PTR]
        lib.q5_0_multiply.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _I64, _PTR, _I64, ctypes.c_int, ctypes.c_int]
        lib.q5_0_multiply_one.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _PTR, ctypes.c_int, ctypes.c_int]
        lib.q5_0_use_vnni.argtypes = [ctypes.c_int]
        lib.k_quant_set_enabled.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.k_quant_products.restype = _I64
        lib.k_quant_products.argtypes = [ctypes.c_int]
        lib.k_quant_packed_bytes.restype = _I64
        lib.k_quant_packed_bytes.argtypes = [ctypes.c_int, _I64, _I64]
        lib.k_quant_pack.argtypes = [ctypes.c_int, _PTR, _I64, _I64, _I64, _PTR]
        lib.k_quant_multiply.argtypes = [ctypes.c_int, _PTR, _PTR, _I64, _I64, _I64, _I64, _PTR, _I64, _PTR, _I64,
                                         ctypes.c_int, ctypes.c_int]
        lib.q5_0_attention_set_max_rows.argtypes = [_I64]
        lib.q5_0_attention_check.restype = ctypes.c_int
        lib.q5_0_attention_set_enabled.argtypes = [ctypes.c_int]
        lib.q5_0_attention_rows.restype = _I64
        lib.q5_0_attention_in_use.restype = ctypes.c_int
        lib.q5_0_attention_reordered_rows.restype = _I64
        lib.q5_0_positions_loading.argtypes = [ctypes.c_int]
    except AttributeError as exc:  # a build older than this code: llama.cpp keeps its own products
        log.warning("Q5_0 kernel not used (%s); run scripts/setup.sh", exc)
        return None
    if not lib.q5_0_original_found():
        log.warning("Q5_0 kernel not used: llama.cpp's own llamafile_sgemm was not found")
        return None
    if not lib.q5_0_attention_check():
        log.warning("gemserve's attention not used: llama.cpp's tensor layout is not the one it knows; greedy "
                    "output may change with the size of a pass")
    return lib


def set_enabled(on: bool) -> None:
    """Turns the kernel on or off for the whole process, both types (benchmarks and tests compare both); only
    between passes."""
    lib = install()
    if lib is not None:
        lib.q5_0_set_enabled(int(on))


def set_attention(on: bool) -> None:
    """Turns gemserve's attention (`_attention.h`) on or off for the whole process; only between passes, and only
    on where its check at install passed."""
    lib = install()
    if lib is not None:
        lib.q5_0_attention_set_enabled(int(on))


def attention_rows() -> int:
    """Query rows (a head of a token) whose attention gemserve computed so far in this process."""
    lib = install()
    return int(lib.q5_0_attention_rows()) if lib is not None else 0


def reordered_rows() -> int:
    """Query rows whose cells gemserve's attention summed in position order, which was not their cells' order in
    the cache (llama.cpp had put a later token before earlier ones), so far in this process."""
    lib = install()
    return int(lib.q5_0_attention_reordered_rows()) if lib is not None else 0


@contextmanager
def loading_positions(first: int = 0) -> Iterator[None]:
    """Around llama.cpp reading a sequence's cache back from a file (which writes its keys without the positions
    gemserve's attention notes): the cells it fills take positions `first`, `first` + 1, ... in the order it
    writes them, as llama.cpp writes a sequence's cells. Only on the thread that owns the model, between passes."""
    lib = install()
    if lib is not None:
        lib.q5_0_positions_loading(first)
    try:
        yield
    finally:
        if lib is not None:
            lib.q5_0_positions_loading(-1)


def products() -> int:
    """Token-rows of Q5_0 matrices multiplied by the kernel so far in this process."""
    lib = install()
    return int(lib.q5_0_products()) if lib is not None else 0


def k_quant_products(kind: str) -> int:
    """Token-rows of matrices of a K-quant `kind` ("Q6_K" or "Q4_K") multiplied by the kernel so far in this
    process."""
    lib = install()
    return int(lib.k_quant_products(K_QUANT_TYPES[kind])) if lib is not None else 0


def describe() -> str:
    """Who multiplies Q5_0, Q6_K and Q4_K matrices in this process, for the log."""
    if os.environ.get("GEMSERVE_Q5_0_KERNEL", "1") == "0":
        return "llama.cpp (GEMSERVE_Q5_0_KERNEL=0)"
    lib = install()
    if lib is None:
        return "llama.cpp (gemserve's kernel is not built, this CPU lacks AVX2, or llama_cpp was imported first)"
    attention = "its attention" if lib.q5_0_attention_in_use() else "llama.cpp's attention"
    return f"gemserve's kernel ({lib.q5_0_packed_matrices()} matrices of loaded models seen so far), {attention}"


def _mappings(path: Path) -> set[tuple[int, int, bool]]:
    """The address ranges at which `path` is mapped into this process, and whether each is a shared read-only
    mapping (whose pages can be let go and read again from the file, as llama.cpp maps model files)."""
    target = str(path.resolve())
    found = set()
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.rstrip("\n").split(maxsplit=5)
                if len(fields) == 6 and fields[5] == target:
                    start, end = fields[0].split("-")
                    perms = fields[1]
                    found.add((int(start, 16), int(end, 16), "w" not in perms and perms.endswith("s")))
    except OSError:
        pass
    return found


class ModelWeights:
    """The memory of one loaded model's file, registered with the kernel while the model lives.

    Use: `with ModelWeights(path) as weights: model = load(path)`, then `weights.release()` once nothing computes
    with the model any more and before its memory is unmapped (freeing the model), so that no other model can be
    mapped at those addresses while the copies remain.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._ranges: set[tuple[int, int, bool]] = set()
        self._before: set[tuple[int, int, bool]] = set()

    def __enter__(self) -> ModelWeights:
        _loading.acquire()
        try:
            self._before = _mappings(self._path)
        except BaseException:
            _loading.release()
            raise
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        try:
            lib = install()
            if exc_type is None and lib is not None:
                self._ranges = _mappings(self._path) - self._before
                for start, end, shared_read_only in self._ranges:
                    # only the pages of a shared read-only mapping can be let go once packed (never a writable or
                    # private one's, whose pages may differ from the file)
                    (lib.q5_0_add_file_range if shared_read_only else lib.q5_0_add_range)(start, end)
        finally:
            _loading.release()

    def release(self) -> None:
        lib = install()
        if lib is not None:
            for start, end, _ in self._ranges:
                lib.q5_0_release_range(start, end)
        self._ranges = set()
