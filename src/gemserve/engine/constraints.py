"""Grammar-constrained decoding: which tokens a sequence may produce next, computed by llguidance.

A `Constraint` wraps one llguidance matcher: a grammar (Lark-like, or a JSON schema compiled to one) compiled
against the model's vocabulary. Each step the engine asks it for the mask of allowed tokens, samples among those,
and feeds the chosen token back. The grammar decides when the output is complete: end-of-generation tokens are
allowed exactly where the grammar accepts, and a grammar that cannot be extended any more ends the sequence.

`GrammarTokenizer` builds llguidance's view of a vocabulary once per model, in a thread of its own: for a 262k
vocabulary that takes about a second, which neither start-up nor the engine thread should wait for. The server
starts it when a model is loaded; an engine that is closed waits for it first (it reads the model's vocabulary).

Not here: which grammar a request needs (`gemserve.service.constraints`), sampling (`engine/sampling.py`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import llguidance
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask


class ConstraintError(ValueError):
    """The grammar does not compile (a schema llguidance cannot express, or a grammar with an error)."""


class Constraint:
    """The grammar one sequence's output must follow; used by the engine thread alone once submitted."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str) -> None:
        self._matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise ConstraintError(self._matcher.get_error())
        self._bitmask = allocate_token_bitmask(1, tokenizer.vocab_size)

    def allowed(self, n_vocab: int) -> np.ndarray:
        """Which of the `n_vocab` tokens may come next, as a boolean array."""
        fill_next_token_bitmask(self._matcher, self._bitmask)
        if self._matcher.is_error():
            raise ConstraintError(self._matcher.get_error())
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")
        allowed = np.zeros(n_vocab, dtype=bool)
        shared = min(n_vocab, bits.shape[0])
        allowed[:shared] = bits[:shared]
        return allowed

    def permits(self, token: int) -> bool:
        """Whether `token` may come next, without computing the whole mask (an end-of-generation token where the
        grammar accepts)."""
        return bool(self._matcher.validate_tokens([token]) == 1)

    def forced(self) -> list[int]:
        """The tokens the grammar forces next, whatever the model would prefer (a key name in a JSON object whose
        keys come in a fixed order, the rest of a name once it is told apart); often none. Never raises: a
        matcher in error says so at the next `allowed` or `consume`, where the failure is this sequence's alone."""
        try:
            return list(self._matcher.compute_ff_tokens())
        except Exception:
            return []

    def consume(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise ConstraintError(self._matcher.get_error() or f"token {token} is not allowed here")

    def speculate(self, token: int) -> bool:
        """Consume `token` if the grammar permits it (a drafted token, to be rolled back); False, and nothing
        consumed, if not."""
        return self.permits(token) and bool(self._matcher.consume_token(token))

    def rollback(self, tokens: int) -> None:
        """Undo the last `tokens` tokens consumed."""
        if tokens and not self._matcher.rollback(tokens):
            raise ConstraintError(self._matcher.get_error() or f"could not roll back {tokens} tokens")

    @property
    def finished(self) -> bool:
        """The grammar is complete and nothing may follow: the sequence ends here."""
        return bool(self._matcher.is_stopped())


class GrammarTokenizer:
    """An engine's vocabulary as llguidance sees it, built once in a thread of its own and then shared."""

    def __init__(self, build: Callable[[], llguidance.LLTokenizer]) -> None:
        self._build = build
        self._built: llguidance.LLTokenizer | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Begin building, unless that has begun already."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gemserve-grammar-vocab", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        try:
            self._built = self._build()
        except BaseException as exc:  # reported to whoever asks for it
            self._error = exc

    def wait(self) -> None:
        """Until a build that has begun has ended."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join()

    def get(self) -> llguidance.LLTokenizer:
        """The tokenizer, waiting for it if it is still being built (call it off the event loop)."""
        self.start()
        self.wait()
        if self._built is None:
            raise ConstraintError(f"the model's vocabulary could not be prepared for constraints: {self._error}")
        return self._built

    def compile(self, grammar: str) -> Constraint:
        return Constraint(self.get(), grammar)
