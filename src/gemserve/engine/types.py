"""What the engine takes and gives: token ids in, token events out. No HTTP, no text, no JSON here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from gemserve.engine.constraints import Constraint


class EngineError(RuntimeError):
    """The engine could not run a sequence (out of context memory, or the engine thread died)."""


class EngineBusy(EngineError):
    """Too many requests are already waiting for this engine; the caller may try again later."""


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. `temperature == 0` is greedy decoding; `top_k == 0` means no top-k cut."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    # The model's own remedy against loops (a model default, not an API field): logits of tokens this sequence
    # already generated are divided by it (multiplied where negative), as Hugging Face and llama.cpp do.
    repetition_penalty: float = 1.0
    # None: no log-probabilities; 0: only the chosen token's; n: also the n most likely tokens at each step.
    logprobs: int | None = None
    # With logprobs: these tokens' log-probabilities are reported at each step instead of the most likely ones
    # (a judge reads the scores of its answers, say "Yes" and "No", whatever else the model would write).
    scored: tuple[int, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    prompt: tuple[int, ...]
    sampling: SamplingParams
    max_new_tokens: int
    adapter: str | None = None
    # The grammar the output must follow (compiled for this sequence alone: it keeps the sequence's parse state).
    constraint: Constraint | None = None
    # Who may share computed prefixes with this sequence (the caller's owner id): a kept or pinned cache serves
    # only requests of the same scope, so that timing and cachedContentTokenCount reveal nothing across keys.
    scope: str | None = None


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, with its log-probability under the model's distribution when asked for. A sequence's
    first token also says how many prompt tokens came from a kept or pinned cache (`cached_tokens`), so that
    usage can report them from the first streamed chunk on."""

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()
    cached_tokens: int | None = None


@dataclass(frozen=True)
class FinishEvent:
    """The sequence ended: `"STOP"` at the model's end-of-turn token, `"MAX_TOKENS"` at the budget.
    `cached_tokens`: how many prompt tokens came from a kept or pinned cache instead of being computed."""

    reason: str
    cached_tokens: int = 0


Event = TokenEvent | FinishEvent


@dataclass(frozen=True)
class ModelMetadata:
    context_length: int
    vocab_size: int
    bos_text: str  # the BOS token as chat templates spell it ("<bos>"), or "" for models without one
    eos_text: str
    chat_template: str | None
    architecture: str


class Engine(Protocol):
    """A loaded model serving many generations at once. Implementations must not block the event loop."""

    metadata: ModelMetadata

    def tokenize(self, text: str, *, add_bos: bool, parse_special: bool) -> list[int]: ...

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes a token stands for (a piece of UTF-8 that may end mid-character)."""
        ...

    def prepare_grammar(self) -> None:
        """Start preparing the vocabulary for constraints in the background, so that the first one is quick."""
        ...

    def compile_grammar(self, grammar: str) -> Constraint:
        """A fresh constraint for one sequence from an llguidance grammar; slow the first time (call it off the
        event loop). Raises `ConstraintError` for a grammar that does not compile."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Stream events for one sequence; closing the iterator early cancels the generation."""
        ...

    def pin(self, key: str, prefix: tuple[int, ...], adapter: str | None = None, saved: Path | None = None,
            scope: str | None = None) -> None:
        """Keep the computed state of `prefix` for prompts that start with it (a cachedContent), from the first
        time it is computed until `unpin(key)`; within a memory budget, beyond which it is computed again.
        With `saved`, the state is also written to that file, and read back from it after a restart."""
        ...

    def unpin(self, key: str) -> None: ...

    def forget_adapter(self, path: str) -> None:
        """The adapter at `path` will not be asked for again: free it once no running sequence uses it."""
        ...

    def close(self) -> None: ...
