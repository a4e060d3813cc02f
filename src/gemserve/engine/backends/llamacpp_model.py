"""A thin, typed layer over llama-cpp-python's C API: one model, one context, its KV cache and LoRA adapters.

It knows nothing of requests or scheduling (`llamacpp.py` does that); it turns the C calls the scheduler needs
into Python methods with Python types. Every method must be called from one thread (the engine thread), except
the token helpers, which only read the vocabulary.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path

import llama_cpp as llama
import llguidance
import llguidance.llamacpp
import numpy as np

from gemserve.engine.backends import q5_0
from gemserve.engine.backends.output_head import OutputHead, gguf_contents
from gemserve.engine.types import EngineError, ModelMetadata

log = logging.getLogger("gemserve.engine")

SHORTLIST_PREFIX = 16384  # the first tokens of the vocabulary drafting scores (_shortlist_tokens)

_backend_lock = threading.Lock()
_backend_ready = False


@llama.llama_log_callback
def _forward_log(level: int, text: bytes, _: ctypes.c_void_p) -> None:
    """llama.cpp talks a lot while loading; its lines go to our log at debug level (warnings and errors at theirs)."""
    message = text.decode("utf-8", errors="replace").rstrip()
    if message:
        # ggml's levels: 1 debug, 2 info, 3 warn, 4 error, 5 continuation of the previous line.
        log.log({3: logging.WARNING, 4: logging.ERROR}.get(level, logging.DEBUG), "llama.cpp: %s", message)


def _init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama.llama_log_set(_forward_log, ctypes.c_void_p(0))
            llama.llama_backend_init()
            _backend_ready = True


def _model_params() -> llama.llama_model_params:
    params = llama.llama_model_default_params()
    # Without llama.cpp's repacked copies of Q4_K (and Q4_0, Q8_0) matrices: their products over 4 tokens or more
    # round otherwise than over fewer, so a token's logits moved with the size of its pass (prompt lookup, other
    # sequences). llama.cpp's plain products, like gemserve's kernels and attention (q5_0.py), give each token the
    # same bits in any pass; they cost about as much on these models (docs/benchmarks.md).
    if hasattr(params, "use_extra_bufts"):
        params.use_extra_bufts = False
    return params


def _context_params(n_ctx: int, sequences: int, threads: int, ubatch: int) -> llama.llama_context_params:
    params = llama.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = ubatch
    params.n_ubatch = ubatch
    params.n_seq_max = sequences
    params.kv_unified = True  # all sequences share the cache, so one long prompt may use it all
    params.swa_full = True  # keep whole histories in sliding-window layers too, so prefixes can be reused
    params.n_threads = threads
    params.n_threads_batch = threads
    return params


class LlamaModel:
    _owns_model = True  # False for a solo context, which only borrows the model

    def __init__(self, path: Path, *, context_size: int | None, sequences: int, threads: int | None,
                 ubatch: int, own_output_layer: bool = True) -> None:
        _init_backend()
        with q5_0.ModelWeights(path) as weights:
            model = llama.llama_model_load_from_file(str(path).encode(), _model_params())
        if not model:
            weights.release()
            raise EngineError(f"llama.cpp could not load {path}")
        self._model = model
        self._weights = weights
        self._vocab = llama.llama_model_get_vocab(model)
        self.n_vocab = llama.llama_vocab_n_tokens(self._vocab)
        trained = llama.llama_model_n_ctx_train(model)
        n_ctx = context_size or trained
        threads = threads or os.cpu_count() or 1

        params = _context_params(n_ctx, sequences, threads, ubatch)
        self._head: OutputHead | None = None
        if own_output_layer:
            self._head = OutputHead.load(path, n_vocab=self.n_vocab, n_embd=llama.llama_model_n_embd(model),
                                         threads=threads)
        if self._head is not None:
            params.cb_eval = self._head.callback
            params.cb_eval_user_data = ctypes.cast(ctypes.pointer(self._head.state), ctypes.c_void_p)
        ctx = llama.llama_init_from_model(model, params)
        if not ctx:
            weights.release()
            llama.llama_model_free(model)
            raise EngineError(f"llama.cpp could not create a context of {n_ctx} tokens for {path}")
        self._ctx = ctx
        self._memory = llama.llama_get_memory(ctx)
        self._threads = threads
        self.ubatch = ubatch
        self.n_ctx = n_ctx  # KV cache cells, shared by all sequences
        # Whether a sequence's cache can be cut at any position (not for recurrent state: Mamba, hybrids).
        self.can_cut = not (llama.llama_model_is_recurrent(model) or llama.llama_model_is_hybrid(model))
        self._batch = llama.llama_batch_init(ubatch, 0, 1)
        self._adapters: dict[str, llama.llama_adapter_lora_p] = {}
        self._adapters_changing_output: set[str] = set()
        self._active_adapter: str | None = None
        self._pieces: dict[int, bytes] = {}
        self._output_rows: dict[int, int] = {}  # batch row -> row of the head's logits, after a decode by the head
        self._capture_owner = self._head  # llama.cpp holds pointers into it for the context's life
        if self._head is not None and not self._head_agrees():
            self._head = None
        self._drafts: OutputHead | None = None
        if self._head is not None:
            try:
                self._head.build_shortlist(np.array(self._shortlist_tokens()))
                self._drafts = self._head
            except (OSError, RuntimeError) as exc:  # the model serves all the same, without drafting
                log.warning("no shortlist for drafting: %s", exc)
        self.metadata = ModelMetadata(
            context_length=min(n_ctx, trained),
            vocab_size=self.n_vocab,
            bos_text=self._token_text(llama.llama_vocab_bos(self._vocab)),
            eos_text=self._token_text(llama.llama_vocab_eos(self._vocab)),
            chat_template=self._meta("tokenizer.chat_template"),
            architecture=self._meta("general.architecture") or "",
        )

    # ---- tokens (any thread) ------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool, parse_special: bool) -> list[int]:
        """Token ids of `text`. Without `parse_special` the text is literal: llama.cpp still reads user-defined
        tokens (Qwen's `<tool_call>`) out of plain text, so any it found are spelled out again, split. Runs of
        whitespace stay whole (Gemma's vocabulary has user-defined tokens for them, which it was trained with)."""
        ids = self._tokenize(text, add_bos, parse_special)
        if parse_special or not any(self._user_defined(t) for t in ids):
            return ids
        out: list[int] = []
        for token in ids:
            piece = self.token_bytes(token).decode("utf-8", errors="replace")
            if self._user_defined(token) and len(piece) > 1 and piece.strip():
                out += self.tokenize(piece[:1], add_bos=False, parse_special=False)
                out += self.tokenize(piece[1:], add_bos=False, parse_special=False)
            else:
                out.append(token)
        return out

    def _user_defined(self, token: int) -> bool:
        return bool(llama.llama_vocab_get_attr(self._vocab, token) & llama.LLAMA_TOKEN_ATTR_USER_DEFINED)

    def _tokenize(self, text: str, add_bos: bool, parse_special: bool) -> list[int]:
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
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = llama.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
            piece = buf.raw[:n]
            self._pieces[token] = piece
        return piece

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama.llama_vocab_is_eog(self._vocab, token))

    def grammar_tokenizer(self) -> llguidance.LLTokenizer:
        """The vocabulary for llguidance, ending where llama.cpp ends a generation (about a second).

        Special tokens are marked as llguidance's own llama.cpp reader marks them (control tokens, and user-defined
        ones written like `<tool_call>`), but text the grammar forces is tokenized here, as literal text: llama.cpp's
        tokenizer would read Qwen's `<tool_call>` out of an enum value or a key of that spelling, and llguidance
        would then allow a token that no text can match. A vocabulary whose tokenizer puts a space before the text
        (`add_space_prefix`, Llama 2 and Mistral's older ones) keeps llguidance's own reader, which knows how to
        take that space off again."""
        ends = [t for t in range(self.n_vocab) if self.is_end_of_generation(t)]
        spelled = b"".join(self.token_bytes(t) for t in self.tokenize("a", add_bos=False, parse_special=False))
        if spelled != b"a":
            return llguidance.llamacpp.lltokenizer_from_vocab(self._vocab, eos_token=ends or None)
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_GrammarVocab(self, ends)), eos_token=ends or None)

    # ---- forward passes (engine thread) -------------------------------------------------------------------

    def decode(self, entries: list[tuple[int, int, list[int], bool]], logits: bool = True) -> bool:
        """One forward pass over `(seq_id, first position, tokens, want logits of the last)` entries.

        With `logits` False (only where `drafts` is not None), the wanted positions' final hidden states are left
        in `hidden` instead, for `logits_of` later. False when the tokens did not fit the KV cache; llama.cpp then
        leaves the cache as it was."""
        batch = self._batch
        n = 0
        output_rows: dict[int, int] = {}
        for seq_id, start, tokens, want_logits in entries:
            for i, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = start + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq_id
                batch.logits[n] = False
                n += 1
            if want_logits:
                batch.logits[n - 1] = True
                output_rows[n - 1] = len(output_rows)
        batch.n_tokens = n
        # gemserve's output layer takes over after the final norm, unless the adapter in use changes that layer.
        # A batch fits one micro-batch (n <= ubatch), so llama.cpp computes it in one graph; were it ever to split
        # one, the head could not tell the rows' order and the decode fails (OutputHead.finish).
        head = self._head if self._active_adapter not in self._adapters_changing_output else None
        if head is not None:
            head.prepare(len(output_rows))
        try:
            status = llama.llama_decode(self._ctx, batch)
        finally:
            self._output_rows = {}
            if head is not None:
                try:
                    by_head = head.finish(logits)
                except RuntimeError as exc:
                    raise EngineError(str(exc)) from exc
                if by_head and logits:
                    self._output_rows = output_rows
                elif not by_head and not logits and status == 0:
                    raise EngineError("a decode without logits ran llama.cpp's output layer")
        if status < 0:
            raise EngineError(f"llama_decode failed with status {status}")
        return status == 0

    @property
    def drafts(self) -> OutputHead | None:
        """The output layer whose shortlist drafts tokens (engine/drafting.py), while gemserve computes logits."""
        return self._drafts if self._active_adapter not in self._adapters_changing_output else None

    @property
    def hidden(self) -> np.ndarray:
        """The final hidden states a decode without logits captured, one row per wanted position (a view)."""
        assert self._head is not None
        return self._head.hidden

    def logits_of(self, hidden: np.ndarray) -> None:
        """Compute the logits of hidden states captured by decodes without logits: afterwards `logits(i)` is
        those of `hidden[i]`, the same bits as if their decodes had computed them."""
        assert self._head is not None
        try:
            self._head.compute(hidden)
        except RuntimeError as exc:
            raise EngineError(str(exc)) from exc
        self._output_rows = {i: i for i in range(hidden.shape[0])}

    def _shortlist_tokens(self) -> list[int]:
        """The tokens drafting scores every time: the first SHORTLIST_PREFIX of the vocabulary (BPE vocabularies
        list tokens by merge order, roughly by frequency), every token of one character below U+3000 (punctuation,
        digits, letters; Gemma keeps them at the end of its vocabulary), and the end-of-generation tokens. Each
        sequence adds the tokens it has seen (engine/drafting.py); CJK characters come in that way. Small matters:
        reading the shortlist is most of a draft's cost beside the layers."""
        chosen = list(range(min(SHORTLIST_PREFIX, self.n_vocab)))
        buf = ctypes.create_string_buffer(8)
        for token in range(SHORTLIST_PREFIX, self.n_vocab):
            n = llama.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if (0 < n <= 3 and _one_character(buf.raw[:n])) or self.is_end_of_generation(token):
                chosen.append(token)
        return chosen

    @property
    def output_layer(self) -> str:
        """Who computes logits: "gemserve" (the Q8_0 output-layer kernel) or "llama.cpp"."""
        return "llama.cpp" if self._head is None else "gemserve"

    def logits(self, row: int) -> np.ndarray:
        """The logits of batch row `row` of the last decode (a view: use it before the next decode)."""
        if self._output_rows:
            assert self._head is not None
            return self._head.logits[self._output_rows[row]]
        return np.ctypeslib.as_array(llama.llama_get_logits_ith(self._ctx, row), shape=(self.n_vocab,))

    def _head_agrees(self) -> bool:
        """Run one short prompt through llama.cpp's output layer and through gemserve's, and compare: any
        architecture that does more after the final norm than one matrix product shows up here. In between,
        llama.cpp's copy of the matrix leaves memory and the packed one is made, so both are never resident."""
        assert self._head is not None
        prompt = self.tokenize("The capital of France is", add_bos=True, parse_special=False)
        entries = [(0, 0, prompt, True)]
        head, self._head = self._head, None
        try:
            self.decode(entries)
            theirs = np.array(self.logits(len(prompt) - 1))
            self.forget(0)
            head.release_source()
            head.pack()
            self._head = head
            self.decode(entries)
            if not self._output_rows:
                raise EngineError("the hidden state was not captured")
            ours = self.logits(len(prompt) - 1)
            self.forget(0)
        except Exception as exc:
            log.warning("gemserve's output layer failed its start-up check (%s); llama.cpp computes logits", exc)
            self.forget(0)
            head.unpack()
            return False
        gap = float(np.max(np.abs(ours - theirs)))
        if int(np.argmax(ours)) != int(np.argmax(theirs)) or gap > 1e-3 * float(np.max(np.abs(theirs))):
            log.warning("gemserve's output layer disagrees with llama.cpp's on this model (largest logit gap %.3g); "
                        "llama.cpp computes logits", gap)
            head.unpack()
            return False
        log.info("output layer: gemserve's kernel, %s (%.0f MiB packed; largest logit gap to llama.cpp's %.2g)",
                 head.instructions, head.nbytes / 2**20, gap)
        return True

    def copy(self, source: int, target: int, length: int) -> None:
        """Give sequence `target` the cache of `source`'s first `length` positions (shared cells, no copying)."""
        llama.llama_memory_seq_cp(self._memory, source, target, 0, length)

    def save_sequence(self, seq_id: int, path: Path, tokens: tuple[int, ...]) -> bool:
        """Write a sequence's cache (and its tokens) to `path`; llama.cpp's own file format."""
        array = (llama.llama_token * len(tokens))(*tokens)
        return bool(llama.llama_state_seq_save_file(self._ctx, str(path).encode(), seq_id, array, len(tokens)))

    def load_sequence(self, seq_id: int, path: Path, capacity: int) -> tuple[int, ...] | None:
        """Read a cache `save_sequence` wrote into sequence `seq_id`; its tokens, or None if it cannot."""
        array = (llama.llama_token * capacity)()
        count = ctypes.c_size_t(0)
        with q5_0.loading_positions(0):  # a saved sequence starts at position 0 (save_sequence)
            read = llama.llama_state_seq_load_file(self._ctx, str(path).encode(), seq_id, array, capacity,
                                                   ctypes.byref(count))
        return tuple(array[: count.value]) if read else None

    def forget(self, seq_id: int, start: int = 0) -> bool:
        """Drop a sequence's cache from position `start` on; False if llama.cpp cannot cut it there."""
        return bool(llama.llama_memory_seq_rm(self._memory, seq_id, start, -1))

    # ---- LoRA adapters (engine thread) --------------------------------------------------------------------

    def use_adapter(self, path: str | None) -> None:
        """Make `path` (a llama.cpp LoRA GGUF) the adapter of the next forward passes; None for the base."""
        if path == self._active_adapter:
            return
        if path is None:
            llama.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            adapter = self._adapters.get(path)
            if adapter is None:
                adapter = llama.llama_adapter_lora_init(self._model, path.encode())
                if not adapter:
                    raise EngineError(f"llama.cpp could not load the adapter {path}")
                if _changes_output_layer(Path(path)):
                    self._adapters_changing_output.add(path)
                self._adapters[path] = adapter
            adapters = (llama.llama_adapter_lora_p_ctypes * 1)(adapter)  # type: ignore[misc]
            scales = (ctypes.c_float * 1)(1.0)
            if llama.llama_set_adapters_lora(self._ctx, adapters, 1, scales) != 0:
                raise EngineError(f"llama.cpp could not apply the adapter {path}")
        self._active_adapter = path

    def unload_adapter(self, path: str) -> None:
        self._adapters_changing_output.discard(path)
        adapter = self._adapters.pop(path, None)
        if adapter is not None:
            if self._active_adapter == path:
                self.use_adapter(None)
            llama.llama_adapter_lora_free(adapter)

    def solo(self, n_ctx: int, ubatch: int) -> LlamaModel:
        """A context of its own for one sequence, on the same model (weights, adapters and output layer
        shared): what it computes for a sequence depends on that sequence alone - not on other
        sequences in the batch nor on where they sit in a shared cache - so a seeded request gives the same
        tokens and log-probabilities alone, repeated, or beside others. Close it when the sequence ends (before
        this model)."""
        params = _context_params(n_ctx, 1, self._threads, ubatch)  # a small ubatch: a small compute buffer
        if self._head is not None:  # gemserve's output layer here too (the engine thread runs one pass at a time)
            params.cb_eval = self._head.callback
            params.cb_eval_user_data = ctypes.cast(ctypes.pointer(self._head.state), ctypes.c_void_p)
        ctx = llama.llama_init_from_model(self._model, params)
        if not ctx:
            raise EngineError(f"llama.cpp could not create a context of {n_ctx} tokens")
        solo = object.__new__(LlamaModel)
        solo.__dict__.update(self.__dict__)  # the model, vocabulary, metadata and adapters are shared
        solo._owns_model = False
        solo._ctx = ctx
        solo._memory = llama.llama_get_memory(ctx)
        solo._batch = llama.llama_batch_init(ubatch, 0, 1)
        solo.ubatch = ubatch
        solo._output_rows = {}
        solo._active_adapter = None
        solo.n_ctx = n_ctx
        return solo

    def close(self) -> None:
        llama.llama_set_adapters_lora(self._ctx, None, 0, None)
        if self._owns_model:
            for adapter in self._adapters.values():
                llama.llama_adapter_lora_free(adapter)
            self._adapters.clear()
        llama.llama_batch_free(self._batch)
        llama.llama_free(self._ctx)
        if self._owns_model:
            self._weights.release()  # before the model's memory is unmapped (see q5_0.ModelWeights)
            llama.llama_model_free(self._model)

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


def _one_character(piece: bytes) -> bool:
    """Whether `piece` is one character below U+3000 (where CJK scripts begin)."""
    try:
        text = piece.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return len(text) == 1 and ord(text) < 0x3000


def _changes_output_layer(adapter: Path) -> bool:
    """Whether a llama.cpp LoRA GGUF adapts the output matrix (then llama.cpp must compute that layer)."""
    try:
        names, _ = gguf_contents(adapter)
    except OSError:
        return True  # unreadable here (llama.cpp read it): leave the output layer to llama.cpp
    return any(name.startswith(("output.", "token_embd.")) for name in names)


class _GrammarVocab:
    """A llama.cpp vocabulary as `llguidance.TokenizerWrapper` reads it: every token's bytes, special ones marked
    with a leading 0xff, and a tokenizer of literal text."""

    def __init__(self, model: LlamaModel, ends: list[int]) -> None:
        vocab = model._vocab
        self._model = model
        self.eos_token_id = ends[0] if ends else llama.llama_vocab_eos(vocab)
        bos = llama.llama_vocab_bos(vocab)
        self.bos_token_id = bos if bos >= 0 else None
        buf = ctypes.create_string_buffer(256)
        self.tokens: list[bytes] = []
        self.special_token_ids: list[int] = []
        for token in range(model.n_vocab):
            n = llama.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
            if n < 0:  # longer than the buffer: -n is its length
                buf = ctypes.create_string_buffer(-n)
                n = llama.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
            piece = buf.raw[:n]
            attr = llama.llama_vocab_get_attr(vocab, token)
            if attr & llama.LLAMA_TOKEN_ATTR_CONTROL or (attr & llama.LLAMA_TOKEN_ATTR_USER_DEFINED
                                                          and piece.startswith(b"<") and piece.endswith(b">")):
                piece = b"\xff" + piece
                self.special_token_ids.append(token)
            self.tokens.append(piece)

    def __call__(self, text: bytes | str) -> list[int]:
        # TokenizerWrapper hands over text it has encoded itself (or the text itself), so it is always UTF-8.
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._model.tokenize(text, add_bos=False, parse_special=False)
