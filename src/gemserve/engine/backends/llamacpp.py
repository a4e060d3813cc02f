"""The llama.cpp engine: one loaded GGUF model serving many sequences with continuous batching.

One thread owns the llama.cpp context. Each step it takes every running sequence's next token plus chunks of
waiting prompts (up to `n_ubatch` tokens in all) into one batch, runs a single forward pass, and samples only
where a token is due: logits are requested for a prompt's last token and for decoding tokens, nowhere else.
Sequences join and leave between steps. Events go back to each request's asyncio queue; a request that goes
away (client disconnect, stop sequence) is dropped at the next step and its KV cache cells freed.

ctypes releases the GIL during `llama_decode`, so the event loop keeps serving HTTP while a step runs.
Not here: text, chat formats, stop sequences (the service layer), and LoRA adapters (not yet).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import threading
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp as llama
import numpy as np

from gemserve.engine.sampling import sample
from gemserve.engine.types import (
    EngineError,
    Event,
    FinishEvent,
    GenerationRequest,
    ModelMetadata,
    TokenEvent,
)

log = logging.getLogger("gemserve.engine")

_backend_lock = threading.Lock()
_backend_ready = False


@llama.llama_log_callback
def _forward_log(level: int, text: bytes, _: ctypes.c_void_p) -> None:
    """llama.cpp talks a lot while loading; its lines go to our log at debug level (errors at error level)."""
    message = text.decode("utf-8", errors="replace").rstrip()
    if message:
        log.log(logging.ERROR if level == 3 else logging.DEBUG, "llama.cpp: %s", message)


def _init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama.llama_log_set(_forward_log, ctypes.c_void_p(0))
            llama.llama_backend_init()
            _backend_ready = True


@dataclass(eq=False)
class _Sequence:
    request: GenerationRequest
    emit: Callable[[Event | BaseException], None]
    rng: np.random.Generator
    seq_id: int = -1
    n_past: int = 0  # tokens of this sequence already in the KV cache
    pending: list[int] = field(default_factory=list)  # tokens to feed in the next steps
    generated: Counter[int] = field(default_factory=Counter)
    n_generated: int = 0
    cancelled: bool = False


class LlamaCppEngine:
    """Serves one GGUF model. `max_sequences` sequences decode together; more requests wait their turn."""

    def __init__(
        self,
        path: Path,
        *,
        context_size: int | None = None,
        max_sequences: int = 8,
        threads: int | None = None,
        ubatch: int = 512,
    ) -> None:
        _init_backend()
        model_params = llama.llama_model_default_params()
        model = llama.llama_model_load_from_file(str(path).encode(), model_params)
        if not model:
            raise EngineError(f"llama.cpp could not load {path}")
        self._model = model
        self._vocab = llama.llama_model_get_vocab(model)
        self._n_vocab = llama.llama_vocab_n_tokens(self._vocab)
        trained = llama.llama_model_n_ctx_train(model)
        n_ctx = context_size or trained
        threads = threads or os.cpu_count() or 1

        ctx_params = llama.llama_context_default_params()
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = ubatch
        ctx_params.n_ubatch = ubatch
        ctx_params.n_seq_max = max_sequences
        ctx_params.kv_unified = True  # all sequences share the cache, so one long prompt may use it all
        ctx_params.n_threads = threads
        ctx_params.n_threads_batch = threads
        ctx = llama.llama_init_from_model(model, ctx_params)
        if not ctx:
            llama.llama_model_free(model)
            raise EngineError(f"llama.cpp could not create a context of {n_ctx} tokens for {path}")
        self._ctx = ctx
        self._memory = llama.llama_get_memory(ctx)
        self._ubatch = ubatch
        self._batch = llama.llama_batch_init(ubatch, 0, 1)
        self._free_ids = list(range(max_sequences - 1, -1, -1))
        self._piece_cache: dict[int, bytes] = {}

        self.metadata = ModelMetadata(
            context_length=min(n_ctx, trained),
            vocab_size=self._n_vocab,
            bos_text=self._token_text(llama.llama_vocab_bos(self._vocab)),
            eos_text=self._token_text(llama.llama_vocab_eos(self._vocab)),
            chat_template=self._meta("tokenizer.chat_template"),
            architecture=self._meta("general.architecture") or "",
        )

        self._cond = threading.Condition()
        self._incoming: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._closed = False
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="gemserve-llamacpp", daemon=True)
        self._thread.start()

    # ---- tokens -------------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (llama.llama_token * capacity)()
        n = llama.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_bos, parse_special)
        if n < 0:  # the buffer was too small: -n is the size needed
            capacity = -n
            buf = (llama.llama_token * capacity)()
            n = llama.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_bos, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int) -> bytes:
        piece = self._piece_cache.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = llama.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
            piece = buf.raw[:n]
            self._piece_cache[token] = piece
        return piece

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama.llama_vocab_is_eog(self._vocab, token))

    # ---- generation ---------------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        if request.adapter is not None:
            raise EngineError("this engine does not serve LoRA adapters yet")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event | BaseException] = asyncio.Queue()

        def emit(event: Event | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        seed = request.sampling.seed
        rng = np.random.default_rng(seed if seed is not None else None)
        seq = _Sequence(request=request, emit=emit, rng=rng, pending=list(request.prompt))
        with self._cond:
            if self._failure is not None:
                raise EngineError("the engine has stopped") from self._failure
            self._incoming.append(seq)
            self._cond.notify()
        try:
            while True:
                event = await queue.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, FinishEvent):
                    return
        finally:
            seq.cancelled = True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)
        llama.llama_batch_free(self._batch)
        llama.llama_free(self._ctx)
        llama.llama_model_free(self._model)

    # ---- the engine thread --------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closed and not self._incoming and not self._running:
                        self._cond.wait()
                    if self._closed:
                        break
                    while self._incoming and self._free_ids:
                        seq = self._incoming.popleft()
                        if seq.cancelled:
                            continue
                        seq.seq_id = self._free_ids.pop()
                        self._running.append(seq)
                self._step()
        except BaseException as exc:  # the thread must never die silently: fail every waiting request
            log.exception("engine thread failed")
            with self._cond:
                self._failure = exc
                waiting = list(self._running) + list(self._incoming)
                self._running.clear()
                self._incoming.clear()
            for seq in waiting:
                seq.emit(EngineError("the engine stopped while serving this request"))

    def _step(self) -> None:
        for seq in [s for s in self._running if s.cancelled]:
            self._release(seq)
        if not self._running:
            return
        batch = self._batch
        n = 0
        plan: list[tuple[_Sequence, int]] = []  # (sequence, tokens it puts into this batch)
        # Decoding sequences first (one token each), then prompt chunks in what room is left.
        for seq in sorted(self._running, key=lambda s: len(s.pending) > 1):
            chunk = seq.pending[: self._ubatch - n]
            if not chunk:
                break
            for i, token in enumerate(chunk):
                batch.token[n + i] = token
                batch.pos[n + i] = seq.n_past + i
                batch.n_seq_id[n + i] = 1
                batch.seq_id[n + i][0] = seq.seq_id
                batch.logits[n + i] = False
            n += len(chunk)
            if len(chunk) == len(seq.pending):
                batch.logits[n - 1] = True
            plan.append((seq, len(chunk)))
        batch.n_tokens = n
        status = llama.llama_decode(self._ctx, batch)
        if status != 0:
            # llama.cpp restores the cache of a batch it could not place; nothing of ours moved yet.
            self._drop_youngest(status)
            return
        row = 0
        for seq, size in plan:
            seq.n_past += size
            del seq.pending[:size]
            row += size
            if not seq.pending:
                self._advance(seq, row - 1)

    def _advance(self, seq: _Sequence, row: int) -> None:
        logits = np.ctypeslib.as_array(llama.llama_get_logits_ith(self._ctx, row), shape=(self._n_vocab,))
        choice = sample(logits, seq.request.sampling, seq.generated, seq.rng)
        if self.is_end_of_generation(choice.token):
            seq.emit(FinishEvent("STOP"))
            self._release(seq)
            return
        seq.generated[choice.token] += 1
        seq.n_generated += 1
        seq.emit(TokenEvent(choice.token, choice.logprob, choice.top))
        if seq.n_generated >= seq.request.max_new_tokens:
            seq.emit(FinishEvent("MAX_TOKENS"))
            self._release(seq)
            return
        seq.pending.append(choice.token)

    def _drop_youngest(self, status: int) -> None:
        """The batch did not fit the KV cache: give up the sequence with least context so the others go on."""
        victim = min(self._running, key=lambda s: s.n_past)
        log.warning("llama_decode returned %d; dropping the sequence with the least context", status)
        victim.emit(EngineError("the server ran out of context memory for this request"))
        self._release(victim)

    def _release(self, seq: _Sequence) -> None:
        llama.llama_memory_seq_rm(self._memory, seq.seq_id, -1, -1)
        self._running.remove(seq)
        self._free_ids.append(seq.seq_id)
        seq.cancelled = True

    # ---- model facts --------------------------------------------------------------------------------------

    def _meta(self, key: str) -> str | None:
        size = 1 << 16
        buf = ctypes.create_string_buffer(size)
        n = llama.llama_model_meta_val_str(self._model, key.encode(), buf, size)
        if n < 0:
            return None
        if n >= size:
            buf = ctypes.create_string_buffer(n + 1)
            llama.llama_model_meta_val_str(self._model, key.encode(), buf, n + 1)
        return buf.value.decode("utf-8", errors="replace")

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return (llama.llama_vocab_get_text(self._vocab, token) or b"").decode("utf-8", errors="replace")
