"""The PyTorch engine: a Hugging Face model directory (config.json, safetensors, tokenizer) on transformers.

One thread owns the model and runs it in float32 on the CPU under `torch.inference_mode`. Each sequence
keeps its own KV cache (`past_key_values`); the running sequences take turns, one forward pass each per
round: a chunk of the prompt, or the one token just sampled. Sequences arrive and events leave through
`engine/sequences.py`, as in the llama.cpp engine; a request that goes away (client disconnect, stop
sequence) is dropped at its next turn and its cache freed.
torch releases the GIL inside its kernels, so the event loop keeps serving HTTP while a step runs.

Not here: batching several sequences into one forward pass, GPUs and other dtypes, text, chat formats and
stop sequences (the service layer), and LoRA adapters (not yet).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import llguidance
import llguidance.hf
import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from gemserve.engine.constraints import Constraint, GrammarTokenizer
from gemserve.engine.sequences import Inbox, Message, Outbox, Sequence, advance, rng_for
from gemserve.engine.threads import release_idle_threads
from gemserve.engine.types import (
    EngineError,
    Event,
    GenerationRequest,
    ModelMetadata,
)

log = logging.getLogger("gemserve.engine")

# Tokens that end a turn in common chat formats; as in llama.cpp, they end generation where the vocabulary has
# them as special tokens, even when generation_config.json does not list them.
_END_OF_TURN_NAMES = ("<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<|endoftext|>")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass(eq=False)
class _Sequence(Sequence):
    cache: Any = None  # the model's past_key_values, created by its first forward pass


class TransformersEngine:
    """Serves one Hugging Face model directory. `max_sequences` sequences take turns; more requests wait."""

    def __init__(
        self,
        path: Path,
        *,
        context_size: int | None = None,
        max_sequences: int = 8,
        threads: int | None = None,
        prefill_chunk: int = 256,
    ) -> None:
        transformers.utils.logging.disable_progress_bar()  # stderr carries JSON log lines only
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise EngineError(f"transformers could not load {path}: {exc}") from exc
        self._model = model.eval()
        self._threads = threads
        self._tokenizer: PreTrainedTokenizerBase = tokenizer
        self._added = dict(tokenizer.added_tokens_decoder)  # id -> AddedToken
        self._byte_level = _uses_byte_level(tokenizer)
        self._pieces: dict[int, bytes] = {}
        self._prefill_chunk = prefill_chunk
        self._max_sequences = max_sequences

        config = model.config
        text_config = config.get_text_config()
        trained = getattr(text_config, "max_position_embeddings", None) or context_size
        if not trained:
            raise EngineError(f"{path}: config.json has no max_position_embeddings; set context_size for it")
        bos_id = tokenizer.bos_token_id
        # Add BOS only where the tokenizer itself would (Llama, Gemma), not for models without one (Qwen).
        self._bos = bos_id if bos_id is not None and tokenizer("")["input_ids"][:1] == [bos_id] else None
        self._end_ids = self._end_of_generation_ids(text_config)
        template = tokenizer.chat_template
        if isinstance(template, dict):  # several named templates: the default one is the chat format
            template = template.get("default")
        self.metadata = ModelMetadata(
            context_length=min(context_size or trained, trained),
            vocab_size=text_config.vocab_size,
            bos_text=tokenizer.bos_token or "",
            eos_text=tokenizer.eos_token or "",
            chat_template=template,
            architecture=config.model_type,
        )

        self._grammar = GrammarTokenizer(self._grammar_tokenizer)
        self._inbox: Inbox[_Sequence] = Inbox()
        self._outbox = Outbox()
        self._running: list[_Sequence] = []
        self._thread = threading.Thread(target=self._loop, name="gemserve-transformers", daemon=True)
        self._thread.start()

    # ---- tokens -------------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool, parse_special: bool) -> list[int]:
        encoded = self._tokenizer(text, add_special_tokens=False, split_special_tokens=not parse_special)
        ids = list(encoded["input_ids"])
        if not parse_special and any(t in self._added for t in ids):
            # Added tokens that are not "special" (Qwen's `<tool_call>`) are still read out of plain text: spell
            # any found out again, split, so that the text stays literal.
            literal: list[int] = []
            for token in ids:
                piece = self._added[token].content if token in self._added else ""
                if len(piece) > 1 and piece.strip():  # runs of whitespace (Gemma's) stay whole
                    literal += self.tokenize(piece[:1], add_bos=False, parse_special=False)
                    literal += self.tokenize(piece[1:], add_bos=False, parse_special=False)
                else:
                    literal.append(token)
            ids = literal
        return [self._bos, *ids] if add_bos and self._bos is not None else ids

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._piece(token)
            self._pieces[token] = piece
        return piece

    def is_end_of_generation(self, token: int) -> bool:
        return token in self._end_ids

    def _piece(self, token: int) -> bytes:
        added = self._added.get(token)
        if added is not None:  # control tokens print as nothing, as llama.cpp's pieces do
            return b"" if added.special else added.content.encode("utf-8")
        text: str | None = self._tokenizer.convert_ids_to_tokens([token])[0]
        if text is None:  # ids past the tokenizer (the model's vocabulary is padded)
            return b""
        if self._byte_level:
            return bytes(_UNICODE_TO_BYTE[c] for c in text if c in _UNICODE_TO_BYTE)
        byte = _BYTE_TOKEN.fullmatch(text)
        if byte:
            return bytes([int(byte.group(1), 16)])
        return text.replace("\u2581", " ").encode("utf-8")  # SentencePiece writes spaces as U+2581

    def _end_of_generation_ids(self, text_config: Any) -> frozenset[int]:
        ids: set[int] = set()
        for source in (self._model.generation_config.eos_token_id, text_config.eos_token_id,
                       self._tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        ids.update(i for i, t in self._added.items() if t.special and t.content in _END_OF_TURN_NAMES)
        return frozenset(ids)

    def _grammar_tokenizer(self) -> llguidance.LLTokenizer:
        return llguidance.hf.from_tokenizer(cast(Any, self._tokenizer), n_vocab=self.metadata.vocab_size,
                                            eos_token=sorted(self._end_ids))

    # ---- generation ---------------------------------------------------------------------------------------

    def prepare_grammar(self) -> None:
        self._grammar.start()

    def compile_grammar(self, grammar: str) -> Constraint:
        return self._grammar.compile(grammar)

    def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        if request.adapter is not None:
            raise EngineError("this engine does not serve LoRA adapters yet")
        if not request.prompt:
            raise EngineError("the prompt has no tokens")
        needed = len(request.prompt) + request.max_new_tokens - 1
        if needed > self.metadata.context_length:
            raise EngineError(f"the request needs {needed} tokens of context; the model has "
                              f"{self.metadata.context_length}")

        def make(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Message]) -> _Sequence:
            rng = rng_for(request.sampling.seed)
            return _Sequence(request=request, loop=loop, queue=queue, rng=rng, pending=list(request.prompt))

        return self._inbox.stream(make)

    def forget_adapter(self, path: str) -> None:
        """This engine serves no adapters: nothing to free."""

    def pin(self, key: str, prefix: tuple[int, ...], adapter: str | None = None, saved: Path | None = None,
            scope: str | None = None) -> None:
        """This engine keeps no caches between sequences: nothing to pin (prompts are computed every time)."""

    def unpin(self, key: str) -> None:
        """Nothing was pinned."""

    def close(self) -> None:
        self._inbox.close()
        self._thread.join(timeout=30)
        self._grammar.wait()

    # ---- the engine thread --------------------------------------------------------------------------------

    def _loop(self) -> None:
        if self._threads:  # torch's thread count is set per thread: this one runs the model
            torch.set_num_threads(self._threads)
        try:
            with torch.inference_mode():  # thread-local, so it is entered here and not in __init__
                while True:
                    if not self._running and self._inbox.empty():
                        release_idle_threads()  # idle: torch's workers go (engine/threads.py)
                    admitted = self._inbox.take(self._max_sequences - len(self._running), busy=bool(self._running))
                    if admitted is None:
                        break
                    self._running.extend(admitted)
                    for seq in list(self._running):
                        if seq.cancelled:
                            self._release(seq)
                        else:
                            self._turn(seq)
                        self._outbox.flush()
        except BaseException as exc:  # the thread must never die silently: fail every waiting request
            log.exception("engine thread failed")
            self._inbox.fail(exc, self._running, self._outbox)
            self._running.clear()

    def _turn(self, seq: _Sequence) -> None:
        """One forward pass for `seq`: the next chunk of its prompt, or its last sampled token."""
        chunk = seq.pending[: self._prefill_chunk]
        try:
            out = self._model(input_ids=torch.tensor([chunk]), past_key_values=seq.cache, use_cache=True,
                              logits_to_keep=1)  # input_ids: [1, len(chunk)] -> logits: [1, 1, vocab]
        except Exception as exc:  # e.g. out of memory: this sequence fails, the others go on
            log.exception("forward pass failed")
            self._outbox.put(seq, EngineError(f"the model failed on this request: {exc}"))
            self._release(seq)
            return
        seq.cache = out.past_key_values
        del seq.pending[: len(chunk)]
        if not seq.pending:
            self._advance(seq, out.logits[0, -1].numpy())

    def _advance(self, seq: _Sequence, logits: np.ndarray) -> None:
        if advance(seq, logits, self.is_end_of_generation, self._outbox):
            self._release(seq)

    def _release(self, seq: _Sequence) -> None:
        self._running.remove(seq)
        seq.cache = None
        seq.cancelled = True


def _uses_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    """GPT-2-style byte-level BPE (Llama 3, Qwen) spells each byte as one printable character."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel(" in repr(backend.decoder)


def _byte_level_alphabet() -> dict[str, int]:
    """Inverse of GPT-2's `bytes_to_unicode`: printable bytes are themselves, the others from U+0100 on."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # "!".."~", "¡".."¬", "®".."ÿ"
    table = {chr(b): b for b in printable}
    shifted = (b for b in range(256) if b not in printable)
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


_UNICODE_TO_BYTE = _byte_level_alphabet()
