"""gemserve's own output layer for llama.cpp models whose output matrix is Q8_0 (Gemma 3 270M's is).

The output layer turns each sampled position's final hidden state into logits over the whole vocabulary. For
Gemma 3 270M that is a 262144 x 640 matrix: two thirds of the weights and of llama.cpp's time per decoded token,
and the part that grows with every sequence added to a batch. `_output_head.c` packs the matrix once (eight rows
interleaved) and multiplies it with AVX-512 VNNI instructions (AVX2 where the CPU has no VNNI), reusing each
weight load for every token of a batch; the arithmetic is llama.cpp's (8-bit weights and activations, a scale
per 32).

The hand-over: a llama.cpp eval callback (in C) copies the hidden state named "result_norm" out of the graph and
stops the graph there, so llama.cpp never runs its own output layer; `LlamaModel` then asks this class for the
logits. `OutputHead.load` returns None - and llama.cpp keeps its own output layer - when the kernel is not
built, the CPU lacks AVX2, llama.cpp was built for a GPU, the model's output matrix is not Q8_0, or the
model applies anything after it (a bias, a scale, a cap); `LlamaModel` further compares both paths' logits once
at start-up and falls back when they differ by more than float rounding.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as llama
import numpy as np

log = logging.getLogger("gemserve.engine")

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
Q8_0 = 8  # ggml's type number for Q8_0


class CaptureState(ctypes.Structure):
    """Mirror of `capture_state` in _output_head.c."""

    _fields_ = [
        ("get_name", _PTR),
        ("get_data", _PTR),
        ("nelements", _PTR),
        ("enabled", ctypes.c_int32),
        ("captured", ctypes.c_int32),
        ("width", _I64),
        ("capacity", _I64),
        ("rows", _I64),
        ("hidden", _PTR),
    ]


def _kernel() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("gemserve.engine.backends._output_head")
    if spec is None or spec.origin is None:
        return None
    try:
        return _bind(ctypes.CDLL(spec.origin))
    except AttributeError as exc:  # a library left from an older build
        raise RuntimeError(f"_output_head was built from another version ({exc}); run scripts/setup.sh") from exc


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.output_head_supported.restype = ctypes.c_int
    lib.output_head_set_level.restype = ctypes.c_int
    lib.output_head_level.restype = ctypes.c_int
    lib.output_head_set_level.argtypes = [ctypes.c_int]
    lib.output_head_packed_bytes.restype = _I64
    lib.output_head_packed_bytes.argtypes = [_I64, _I64]
    lib.output_head_pack.restype = ctypes.c_int
    lib.output_head_pack.argtypes = [_PTR, _I64, _I64, _PTR, ctypes.c_int]
    lib.output_head_matmul.restype = ctypes.c_int
    lib.output_head_matmul.argtypes = [_PTR, _I64, _I64, _PTR, _I64, _PTR, _PTR, ctypes.c_int]
    lib.output_head_scratch_bytes.restype = _I64
    lib.output_head_scratch_bytes.argtypes = [_I64, _I64]
    lib.output_head_capture_state_bytes.restype = _I64
    if lib.output_head_capture_state_bytes() != ctypes.sizeof(CaptureState):
        raise RuntimeError("_output_head was built from another version of the capture state")
    return lib


@functools.cache
def _ggml_base() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(Path(llama.__file__).parent / "lib" / "libggml-base.so"))
    lib.gguf_init_from_file.restype = _PTR
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GGUFInitParams]
    lib.gguf_free.argtypes = [_PTR]
    lib.gguf_get_n_tensors.restype = _I64
    lib.gguf_get_n_tensors.argtypes = [_PTR]
    lib.gguf_get_tensor_name.restype = ctypes.c_char_p
    lib.gguf_get_tensor_name.argtypes = [_PTR, _I64]
    lib.gguf_get_tensor_type.restype = ctypes.c_int
    lib.gguf_get_tensor_type.argtypes = [_PTR, _I64]
    lib.gguf_get_tensor_offset.restype = ctypes.c_size_t
    lib.gguf_get_tensor_offset.argtypes = [_PTR, _I64]
    lib.gguf_get_tensor_size.restype = ctypes.c_size_t
    lib.gguf_get_tensor_size.argtypes = [_PTR, _I64]
    lib.gguf_get_data_offset.restype = ctypes.c_size_t
    lib.gguf_get_data_offset.argtypes = [_PTR]
    lib.gguf_get_n_kv.restype = _I64
    lib.gguf_get_n_kv.argtypes = [_PTR]
    lib.gguf_get_key.restype = ctypes.c_char_p
    lib.gguf_get_key.argtypes = [_PTR, _I64]
    return lib


class _GGUFInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", _PTR)]


@dataclass(frozen=True)
class GGUFTensor:
    type: int  # ggml's type number
    offset: int  # from the start of the file
    nbytes: int


def gguf_contents(path: Path) -> tuple[dict[str, GGUFTensor], list[str]]:
    """The tensors and metadata keys of a GGUF file, read by ggml's own parser (the gguf package's reader takes
    ~10 s over Gemma's 262144-entry vocabulary; this takes milliseconds)."""
    lib = _ggml_base()
    ctx = lib.gguf_init_from_file(str(path).encode(), _GGUFInitParams(True, None))
    if not ctx:
        raise OSError(f"not a readable GGUF file: {path}")
    try:
        start = lib.gguf_get_data_offset(ctx)
        tensors = {
            lib.gguf_get_tensor_name(ctx, i).decode(): GGUFTensor(
                lib.gguf_get_tensor_type(ctx, i), start + lib.gguf_get_tensor_offset(ctx, i),
                lib.gguf_get_tensor_size(ctx, i))
            for i in range(lib.gguf_get_n_tensors(ctx))
        }
        keys = [lib.gguf_get_key(ctx, i).decode() for i in range(lib.gguf_get_n_kv(ctx))]
        return tensors, keys
    finally:
        lib.gguf_free(ctx)


def _output_matrix(path: Path, n_embd: int, n_vocab: int) -> tuple[GGUFTensor | None, str]:
    """Where the output matrix lies in the file, or None and why gemserve's kernel cannot take it."""
    tensors, keys = gguf_contents(path)
    tensor = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if tensor is None:
        return None, "no output matrix found"
    extra = sorted(name for name in tensors if name.startswith("output.") and name != "output.weight")
    if extra:
        return None, f"the model applies {', '.join(extra)} after the output matrix"
    if any(key.endswith((".final_logit_softcapping", ".logit_scale")) for key in keys):
        return None, "the model scales or caps its logits after the output matrix"
    if tensor.type != Q8_0:
        return None, f"the output matrix has ggml type {tensor.type}, not Q8_0 ({Q8_0})"
    if n_embd % 32 or tensor.nbytes != n_vocab * (n_embd // 32) * 34:
        return None, f"the output matrix has {tensor.nbytes} bytes, not {n_vocab} x {n_embd} in Q8_0"
    return tensor, ""


MAX_CACHED_ROWS = 8192  # dequantized rows `OutputHead.rows` keeps (2.5 KiB each for Gemma 3 270M)
_PACK_ROWS = 16384  # rows packed at a time; a multiple of the kernel's 8-row groups


def _pack(lib: ctypes.CDLL, path: Path, tensor: GGUFTensor, n_vocab: int, n_embd: int, threads: int) -> np.ndarray:
    """The packed matrix, read from the file a slice at a time and each slice's pages let go once packed, so
    the source never sits in memory whole beside its packed copy."""
    packed = np.empty(lib.output_head_packed_bytes(n_vocab, n_embd), np.uint8)
    row_bytes = n_embd // 32 * 34
    group_bytes = lib.output_head_packed_bytes(8, n_embd)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        source = np.frombuffer(mapped, np.uint8)
        try:
            for r0 in range(0, n_vocab, _PACK_ROWS):
                rows = min(_PACK_ROWS, n_vocab - r0)
                start = tensor.offset + r0 * row_bytes
                status = lib.output_head_pack(source[start:].ctypes.data, rows, n_embd,
                                              packed[r0 // 8 * group_bytes:].ctypes.data, threads)
                if status != 0:
                    raise RuntimeError("the output-layer kernel could not pack the matrix")
                page_start = start - start % mmap.PAGESIZE
                mapped.madvise(mmap.MADV_DONTNEED, page_start, start + rows * row_bytes - page_start)
        finally:
            del source
    return packed


def drop_resident_pages(path: Path, offset: int, nbytes: int) -> None:
    """Let go of this process's resident pages of `path`'s bytes [offset, offset + nbytes), in every mapping of
    the file that holds them. The data stays in the page cache and comes back on use."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [_PTR, ctypes.c_size_t, ctypes.c_int]
    target = os.path.realpath(path)
    page = mmap.PAGESIZE
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or fields[5].strip() != target or "w" in fields[1]:
                continue  # never a writable mapping: dropping its pages could lose changes
            low, high = (int(x, 16) for x in fields[0].split("-"))
            mapped_from = int(fields[2], 16)  # the file offset at address `low`
            first = max(low, low + offset - mapped_from)
            last = min(high, low + offset + nbytes - mapped_from)
            first -= first % page
            if first < last:
                libc.madvise(first, last - first, mmap.MADV_DONTNEED)


class OutputHead:
    """The packed output matrix, the capture state llama.cpp's callback writes, and the logits of the last
    decode. Used from the engine thread only (`LlamaModel`)."""

    def __init__(self, lib: ctypes.CDLL, n_vocab: int, n_embd: int, threads: int, path: Path,
                 tensor: GGUFTensor) -> None:
        self._lib = lib
        self._path = path
        self._tensor = tensor
        self._packed = np.empty(0, np.uint8)  # see pack()
        self.n_vocab = n_vocab
        self.n_embd = n_embd
        self._threads = threads
        self._hidden = np.empty((0, n_embd), np.float32)
        self.logits = np.empty((0, n_vocab), np.float32)
        self._scratch = np.empty(0, np.uint8)
        self._expected = 0
        self._short_packed = np.empty(0, np.uint8)  # see build_shortlist()
        self.shortlist = np.empty(0, np.int64)  # token ids, in the order of the shortlist's scores
        self._short_scores = np.empty(0, np.float32)
        self._rows: dict[int, np.ndarray] = {}  # dequantized rows of tokens off the shortlist (rows())
        base = _ggml_base()
        self.state = CaptureState(
            get_name=ctypes.cast(base.ggml_get_name, _PTR).value,
            get_data=ctypes.cast(base.ggml_get_data, _PTR).value,
            nelements=ctypes.cast(base.ggml_nelements, _PTR).value,
            enabled=0,
            width=n_embd,
        )
        address = ctypes.cast(lib.output_head_eval_callback, _PTR).value
        assert address is not None
        self.callback = llama.ggml_backend_sched_eval_callback(address)

    @classmethod
    def load(cls, path: Path, *, n_vocab: int, n_embd: int, threads: int) -> OutputHead | None:
        """A head for `path`'s output matrix (call `pack` before use); None, and a log line why, when the kernel
        cannot take it."""
        if llama.llama_supports_gpu_offload():
            log.info("llama.cpp was built for a GPU; it computes logits itself")
            return None
        try:
            lib = _kernel()
            if lib is None:
                log.info("output-layer kernel not built; llama.cpp computes logits")
                return None
            if not lib.output_head_supported():
                log.info("this CPU lacks AVX2; llama.cpp computes logits")
                return None
            tensor, why = _output_matrix(path, n_embd, n_vocab)
            if tensor is None:
                log.info("llama.cpp computes logits: %s", why)
                return None
            return cls(lib, n_vocab, n_embd, threads, path, tensor)
        except (OSError, RuntimeError) as exc:
            log.warning("output-layer kernel unusable (%s); llama.cpp computes logits", exc)
            return None

    def prepare(self, outputs: int) -> None:
        """Before a decode that samples at `outputs` positions: room for their hidden states, capture on."""
        if outputs > self._hidden.shape[0]:
            self._hidden = np.empty((outputs, self.n_embd), np.float32)
            self.logits = np.empty((outputs, self.n_vocab), np.float32)
            self._scratch = np.empty(self._lib.output_head_scratch_bytes(outputs, self.n_embd), np.uint8)
        state = self.state
        state.hidden = self._hidden.ctypes.data
        state.capacity = self._hidden.shape[0]
        state.rows = 0
        state.captured = 0
        state.enabled = 1
        self._expected = outputs

    def finish(self, logits: bool = True) -> bool:
        """After the decode: compute the captured rows' logits into `logits` (or, with `logits` False, leave
        them in `hidden`, for `compute` later). False when nothing was captured (llama.cpp then computed its own
        logits); an error when what was captured is not one hidden state per sampled position, in batch order,
        as gemserve's single-micro-batch decodes give."""
        state = self.state
        state.enabled = 0
        if state.captured == 0 or (state.captured == -1 and state.rows == 0):
            return False
        if state.captured != 1 or state.rows != self._expected:
            raise RuntimeError(f"the output layer captured {state.rows} hidden states for {self._expected} "
                               f"sampled positions (capture state {state.captured})")
        if state.rows and logits:
            self._matmul(self._packed, self.n_vocab, self._hidden, state.rows, self.logits)
        return True

    @property
    def hidden(self) -> np.ndarray:
        """The hidden states the last decode captured, one row per sampled position (a view)."""
        return self._hidden[: self.state.rows]

    def compute(self, hidden: np.ndarray) -> None:
        """The logits of `hidden`'s rows (final hidden states captured earlier) into `logits`: the same bits as
        computing them in the decodes that captured them."""
        n = hidden.shape[0]
        if n > self._hidden.shape[0]:
            self.prepare(n)
            self.state.enabled = 0
        self._matmul(self._packed, self.n_vocab, np.ascontiguousarray(hidden, np.float32), n, self.logits)

    def _matmul(self, packed: np.ndarray, rows: int, hidden: np.ndarray, n: int, out: np.ndarray) -> None:
        if n > self._hidden.shape[0]:
            raise RuntimeError(f"{n} hidden states for an output layer prepared for {self._hidden.shape[0]}")
        status = self._lib.output_head_matmul(packed.ctypes.data, rows, self.n_embd, hidden.ctypes.data, n,
                                              out.ctypes.data, self._scratch.ctypes.data, self._threads)
        if status != 0:
            raise RuntimeError("the output-layer kernel refused its input")

    # ---- the shortlist: cheap guesses at the next token, for drafting (engine/drafting.py) ----------------

    def build_shortlist(self, tokens: np.ndarray) -> None:
        """Pack a second, small copy of the rows of `tokens` (the vocabulary's common tokens), whose scores
        `shortlist_scores` computes in a fraction of the whole layer's time."""
        ids = np.unique(np.asarray(tokens, np.int64))
        ids = ids[(ids >= 0) & (ids < self.n_vocab)]
        row_bytes = self.n_embd // 32 * 34
        with self._path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            matrix = np.frombuffer(mapped, np.uint8, self.n_vocab * row_bytes, self._tensor.offset)
            rows = matrix.reshape(self.n_vocab, row_bytes)[ids]  # a copy
            del matrix
        packed = np.empty(self._lib.output_head_packed_bytes(len(ids), self.n_embd), np.uint8)
        if self._lib.output_head_pack(rows.ctypes.data, len(ids), self.n_embd, packed.ctypes.data,
                                      self._threads) != 0:
            raise RuntimeError("the output-layer kernel could not pack the shortlist")
        self._short_packed, self.shortlist = packed, ids
        self._short_scores = np.empty(len(ids), np.float32)

    def shortlist_scores(self, hidden: np.ndarray) -> np.ndarray:
        """The logits of the shortlist's tokens for one hidden state (a buffer reused by the next call)."""
        self._matmul(self._short_packed, len(self.shortlist), np.ascontiguousarray(hidden[None], np.float32), 1,
                     self._short_scores)
        return self._short_scores

    def rows(self, tokens: list[int]) -> np.ndarray:
        """The rows of `tokens` in the output matrix, dequantized to float (read from the file, the recent ones
        kept: for scoring a few tokens off the shortlist, approximately)."""
        blocks = self.n_embd // 32
        found = {t: self._rows[t] for t in tokens if t in self._rows}
        missing = [t for t in dict.fromkeys(tokens) if t not in found]
        if missing:
            with self._path.open("rb", buffering=0) as f:
                for token in missing:
                    at = self._tensor.offset + token * blocks * 34
                    raw = np.frombuffer(os.pread(f.fileno(), blocks * 34, at), np.uint8).reshape(blocks, 34)
                    scales = raw[:, :2].copy().view(np.float16).astype(np.float32)
                    found[token] = (raw[:, 2:].view(np.int8).astype(np.float32) * scales).reshape(-1)
                    self._rows[token] = found[token]
            while len(self._rows) > MAX_CACHED_ROWS:
                self._rows.pop(next(iter(self._rows)))
        if not tokens:
            return np.empty((0, self.n_embd), np.float32)
        return np.stack([found[t] for t in tokens])

    def pack(self) -> None:
        """Read and pack the matrix; needed before the first decode with capture on."""
        self._packed = _pack(self._lib, self._path, self._tensor, self.n_vocab, self.n_embd, self._threads)

    def unpack(self) -> None:
        """Free the packed matrix (when llama.cpp computes logits after all)."""
        self._packed = np.empty(0, np.uint8)

    def release_source(self) -> None:
        """Once this head computes the logits, llama.cpp reads its own copy of the matrix only for the embeddings
        of input tokens, if the model ties the two as Gemma does: let its resident pages go (those of tokens
        used later come back, as clean file pages the system may reclaim). Best effort."""
        try:
            drop_resident_pages(self._path, self._tensor.offset, self._tensor.nbytes)
        except OSError as exc:
            log.info("could not release llama.cpp's copy of the output matrix: %s", exc)

    @property
    def instructions(self) -> str:
        return {2: "AVX-512 VNNI", 1: "AVX2"}.get(self._lib.output_head_level(), "none")

    @property
    def nbytes(self) -> int:
        return self._packed.nbytes
