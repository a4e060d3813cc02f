"""llama.cpp's view of a GGUF file with only its vocabulary loaded (well under a second, no weights): the
tokenizer that serves the model, its special tokens, and the metadata serving builds prompts from.

Training a GGUF base tokenizes with this, not with a converted Hugging Face tokenizer, so the token ids it learns
from are the ones llama.cpp will feed the model. Not here: anything that needs the weights.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import llama_cpp as llama

log = logging.getLogger("gemserve.tuning")

_GGML_LOG_LEVEL_ERROR = 4  # ggml's enum: 1 debug, 2 info, 3 warn, 4 error


@llama.llama_log_callback
def _quiet_llama_log(level: int, text: bytes, _: ctypes.c_void_p) -> None:
    """llama.cpp prints a lot while loading; its errors go to our log, the rest is dropped."""
    if level == _GGML_LOG_LEVEL_ERROR and text:
        log.error("llama.cpp: %s", text.decode("utf-8", errors="replace").rstrip())


class GgufVocab:
    def __init__(self, gguf_file: Path) -> None:
        llama.llama_log_set(_quiet_llama_log, ctypes.c_void_p(0))
        llama.llama_backend_init()
        params = llama.llama_model_default_params()
        params.vocab_only = True
        model = llama.llama_model_load_from_file(str(gguf_file).encode(), params)
        if not model:
            raise ValueError(f"llama.cpp could not read the vocabulary of {gguf_file}")
        self._model: llama.llama_model_p | None = model
        self._vocab = llama.llama_model_get_vocab(model)
        bos = llama.llama_vocab_bos(self._vocab)
        self.bos_id = bos if bos >= 0 else None
        self.eos_id = int(llama.llama_vocab_eos(self._vocab))

    def tokenize(self, text: str, *, parse_special: bool) -> list[int]:
        """Token ids of `text`, never adding BOS."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        for _ in range(2):
            buf = (llama.llama_token * capacity)()
            n = llama.llama_tokenize(self._vocab, data, len(data), buf, capacity, False, parse_special)
            if n >= 0:
                return list(buf[:n])
            capacity = -n  # the buffer was too small: -n is the size needed
        raise ValueError("llama.cpp could not tokenize a text")

    def special_token_id(self, text: str) -> int | None:
        """The id of the control token spelled `text`, None when the vocabulary has none."""
        ids = self.tokenize(text, parse_special=True)
        if len(ids) == 1 and ids != self.tokenize(text, parse_special=False):
            return ids[0]
        return None

    def token_text(self, token: int | None) -> str:
        if token is None or token < 0:
            return ""
        return (llama.llama_vocab_get_text(self._vocab, token) or b"").decode("utf-8", errors="replace")

    def meta(self, key: str) -> str | None:
        """A metadata value as llama.cpp prints it, None when the file has no such key."""
        size = 1 << 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = llama.llama_model_meta_val_str(self._model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1
        return None

    def close(self) -> None:
        if self._model:
            llama.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        self.close()
