"""The llama.cpp engine: one loaded GGUF model serving many sequences with continuous batching.

One thread owns the llama.cpp context. Each step it takes the running sequences of one LoRA adapter (or of the
base model) - every decoding sequence's next token plus chunks of waiting prompts, up to `ubatch` tokens in
all - into one batch, runs a single forward pass, and samples only where a token is due: logits are requested
for a prompt's last token and for decoding tokens, nowhere else. Sequences join and leave between steps; when
several adapters have work, steps take turns between them (llama.cpp applies adapters per context, not per
sequence). A step's events go back to the event loop together (`engine/sequences.py`); a request that goes
away (client disconnect, stop sequence) is dropped at the next step.

A seeded request runs in a llama.cpp context of its own (`LlamaModel.solo`, sized to the request and freed when
it ends), one forward pass per step for it alone. A token's logits are now the same bits in any pass, prompts
too, wherever its cells sit in the shared cache (gemserve's products and attention, `_attention.h`); this was
made when they were not (a prompt's numbers depended on the passes it was computed in and on whether it came from
a kept cache), and it stays: it gives a seeded request the same tokens and log-probabilities alone, repeated, and
beside any other requests without resting on that. Its prompt advances SOLO_CHUNK
tokens a step, whatever else runs. It costs that request the batching, and a context's set-up (10 ms for a short
request, about 100 ms for one that may write 8192 tokens); requests without a seed are batched as ever.

Pinned prefixes (a cachedContent's prompt, `pin`) are kept apart under sequence ids of their own, from the first
time a sequence computes them, within `pin_budget` tokens (half the cache by default; least recently used out
first, and out before any running sequence is set aside). A sequence whose prompt begins with one starts from a
copy of it (llama.cpp shares the cells), so any number of requests use it at once.

A finished sequence's cache is kept (least recently used first out) so that a later request that starts with
the same tokens - the next turn of a conversation, the same long instructions - only computes what is new.
Kept caches are not free: every prompt token attends over (masked) all cells in use, so prompt processing slows
by roughly 3-8% per 1000 kept tokens. The most recently finished sequence is always kept, whatever its length;
older ones only while together they stay within `kept_tokens` (512 by default).

For Q8_0 output matrices, the output layer (hidden state -> logits) is gemserve's own (`output_head.py`): two
thirds of the per-token work for Gemma 3 270M, and the part that batching speeds up most.

A sequence that decodes alone feeds, beside its next token, the tokens its grammar forces next or else those prompt
lookup proposes (`engine/lookup.py`), as many as pay by what such passes cost (timed as the model loads), and
keeps those that decoding one token at a time would have chosen; where none pay, it may run a chain of passes
through the layers alone, drafting each next token from a shortlist, and compute the output layer once for the
chain (`engine/drafting.py`). When the engine runs out of work, its thread
lets its OpenMP workers go (`engine/threads.py`), so an idle model does not slow a busy one.

ctypes releases the GIL during `llama_decode`, so the event loop keeps serving HTTP while a step runs.
Not here: text, chat formats, stop sequences (the service layer).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gemserve.engine.backends import q5_0
from gemserve.engine.backends.llamacpp_model import LlamaModel
from gemserve.engine.constraints import Constraint, GrammarTokenizer
from gemserve.engine.drafting import MAX_CHAIN, DraftCosts, Drafter, chain_length
from gemserve.engine.lookup import MAX_PROPOSED, Acceptance, Lookup, PassCosts, worth_feeding
from gemserve.engine.sampling import MIN_TEMPERATURE
from gemserve.engine.sequences import Inbox, Message, Outbox, Sequence, advance, rng_for
from gemserve.engine.threads import release_idle_threads
from gemserve.engine.types import EngineError, Event, GenerationRequest

log = logging.getLogger("gemserve.engine")

MIN_REUSED_PREFIX = 8  # shorter common prefixes are not worth a cache slot
KEPT_TOKENS = 512  # kept caches beyond the most recent one, in tokens: see the module docstring
PROMPT_TOKENS_BESIDE_DECODING = 128  # prompt tokens per step while other sequences decode
MAX_RESTARTS = 3  # failed steps the engine starts afresh after, within RESTART_WINDOW; then it stops for good
RESTART_WINDOW = 60.0
SOLO_CELLS = 256  # a seeded sequence's own context is a whole number of these
SOLO_CHUNK = PROMPT_TOKENS_BESIDE_DECODING  # a seeded prompt's tokens per step, always
RECENT_TOKENS = 2048  # tokens written lately that drafts also score (engine/drafting.py)
FORCED_ACCEPTANCE = 0.9  # how often a grammar's forced tokens are taken to be chosen, until checked


@dataclass(eq=False)
class _Sequence(Sequence):
    seq_id: int = -1
    history: list[int] = field(default_factory=list)  # tokens whose keys and values are in the cache
    solo: LlamaModel | None = None  # a seeded sequence's own context (sequence id 0 there)
    lookup: Lookup | None = None  # its n-gram index, once it has decoded alone
    drafter: Drafter | None = None  # its drafts (engine/drafting.py), once it has decoded alone
    # How often the tokens its grammar forced were the ones chosen (the model may spell forced text otherwise).
    forced_acceptance: Acceptance = field(default_factory=lambda: Acceptance(FORCED_ACCEPTANCE))


@dataclass
class _Pinned:
    """A pinned prefix's computed cache, under a sequence id of its own; sequences copy it, never take it."""

    seq_id: int
    tokens: tuple[int, ...]
    adapter: str | None
    scope: str | None


@dataclass
class _Kept:
    """The cache of a finished sequence, kept under its sequence id for reuse."""

    tokens: list[int]
    adapter: str | None
    scope: str | None


class LlamaCppEngine:
    """Serves one GGUF model. `max_sequences` sequences decode together; more requests wait their turn."""

    def __init__(self, path: Path, *, context_size: int | None = None, max_sequences: int = 8,
                 threads: int | None = None, ubatch: int = 512, own_output_layer: bool = True,
                 kept_tokens: int = KEPT_TOKENS, pin_budget: int | None = None, lookup: bool = True,
                 pass_costs: PassCosts | None = None, drafting: bool = True,
                 draft_costs: DraftCosts | None = None) -> None:
        self._max_running = max_sequences
        self._kept_tokens = kept_tokens
        self._free_ids = list(range(2 * max_sequences - 1, -1, -1))
        self._kept: OrderedDict[int, _Kept] = OrderedDict()
        self._turn = 0
        self.reused_tokens = 0  # prompt tokens served from kept caches, for tests and benchmarks
        self._lookup = lookup  # prompt-lookup decoding for a sequence that decodes alone (engine/lookup.py)
        # What passes of a sequence decoding alone cost here: measured as the model loads, unless given.
        self._pass_costs = pass_costs if pass_costs is not None else PassCosts.guessed()
        self._drafting = drafting  # chains of passes drafted from a shortlist (engine/drafting.py)
        self._draft_costs = draft_costs if draft_costs is not None else DraftCosts.guessed()
        self.drafted_tokens = 0  # tokens drafted and fed, and how many of them were kept
        self._recent: OrderedDict[int, None] = OrderedDict()  # tokens sequences wrote lately, for drafts
        self.draft_accepted = 0
        self.proposed_tokens = 0  # tokens proposed (by prompt lookup or a grammar), and how many of them were kept
        self.accepted_tokens = 0
        self.forced_tokens = 0  # of those proposed, how many a grammar forced, and how many of these were kept
        self.forced_accepted = 0

        self._inbox: Inbox[_Sequence] = Inbox()
        self._outbox = Outbox()
        self._running: list[_Sequence] = []  # in the order they were admitted
        self._waiting: deque[_Sequence] = deque()  # set aside by _make_room until the cache has room
        self._admitting: list[_Sequence] = []  # taken from the inbox, not running yet
        self._forgotten: set[str] = set()  # adapters to unload, filled from other threads
        self._forgotten_lock = threading.Lock()
        # key -> (prefix, adapter, file to save its state to / load it from, scope); written by other threads
        self._pins: dict[str, tuple[tuple[int, ...], str | None, Path | None, str | None]] = {}
        self._pinned: OrderedDict[str, _Pinned] = OrderedDict()  # computed pins, least recently used first
        self._unloadable: set[str] = set()  # pins whose saved state could not be read back

        # The model is loaded on the engine thread, which then runs every step: llama.cpp's OpenMP threads (and
        # the output-layer kernel's) belong to the thread that first starts them, and a second such pool, made
        # by another thread, would compete with the first for the cores (steps measured 20-30% slower).
        loaded: concurrent.futures.Future[None] = concurrent.futures.Future()

        def load_and_loop() -> None:
            try:
                # Twice as many llama.cpp sequence ids as running sequences: the other half holds kept prefixes.
                self._llm = LlamaModel(path, context_size=context_size, sequences=2 * max_sequences,
                                       threads=threads, ubatch=ubatch, own_output_layer=own_output_layer)
                if (pass_costs is None and lookup or draft_costs is None and drafting) and self._llm.can_cut:
                    self._measure_pass_costs(pass_costs is None and lookup,
                                             draft_costs is None and drafting and self._llm.drafts is not None)
            except BaseException as exc:
                loaded.set_exception(exc)
                return
            loaded.set_result(None)
            self._loop()

        self._thread = threading.Thread(target=load_and_loop, name="gemserve-llamacpp", daemon=True)
        self._thread.start()
        loaded.result()
        self.metadata = self._llm.metadata
        # Pinned prefixes may hold half the cache by default; the rest is for requests.
        self.pin_budget = pin_budget if pin_budget is not None else self._llm.n_ctx // 2
        log.info("pinned prefixes (cachedContents) may hold %d of %d KV cache tokens", self.pin_budget,
                 self._llm.n_ctx)
        self._grammar = GrammarTokenizer(self._llm.grammar_tokenizer)

    @property
    def output_layer(self) -> str:
        return self._llm.output_layer

    def tokenize(self, text: str, *, add_bos: bool, parse_special: bool) -> list[int]:
        return self._llm.tokenize(text, add_bos=add_bos, parse_special=parse_special)

    def token_bytes(self, token: int) -> bytes:
        return self._llm.token_bytes(token)

    def is_end_of_generation(self, token: int) -> bool:
        return self._llm.is_end_of_generation(token)

    def prepare_grammar(self) -> None:
        self._grammar.start()

    def compile_grammar(self, grammar: str) -> Constraint:
        return self._grammar.compile(grammar)

    def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        if not request.prompt:
            raise EngineError("the prompt has no tokens")

        def make(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Message]) -> _Sequence:
            rng = rng_for(request.sampling.seed)
            return _Sequence(request=request, loop=loop, queue=queue, rng=rng, pending=list(request.prompt))

        return self._inbox.stream(make)

    def forget_adapter(self, path: str) -> None:
        with self._forgotten_lock:
            self._forgotten.add(path)

    def pin(self, key: str, prefix: tuple[int, ...], adapter: str | None = None, saved: Path | None = None,
            scope: str | None = None) -> None:
        """See `Engine.pin`. With `saved`, the computed state is written there, and read from there when the
        file exists (after a restart), so that it is not computed again. Only requests of `scope` use it."""
        with self._forgotten_lock:
            self._pins[key] = (tuple(prefix), adapter, saved, scope)

    def unpin(self, key: str) -> None:
        with self._forgotten_lock:
            self._pins.pop(key, None)
            self._unloadable.discard(key)

    def close(self) -> None:
        self._inbox.close()
        self._thread.join(timeout=30)
        if self._thread.is_alive():  # still in a step: freeing what it uses would crash the process
            log.error("the engine thread did not stop within 30 s; its model stays loaded")
            return
        for seq in self._running:
            if seq.solo is not None:
                seq.solo.close()
        self._grammar.wait()  # it reads the vocabulary that closing frees
        self._llm.close()

    # ---- the engine thread --------------------------------------------------------------------------------

    def _measure_pass_costs(self, passes: bool, drafts: bool) -> None:
        """Time passes like the ones `_step` feeds with proposals, over 1 to MAX_PROPOSED + 1 tokens of sequence
        0 after a short prompt, each with logits (lookup.PassCosts.measure), and with `drafts` the parts of a
        drafted chain (drafting.DraftCosts.measure); about 1.5 s for Gemma 3 270M and 3 s for
        Qwen2.5-Coder-0.5B on two cores. LoRA adapters are served with the base model's costs."""
        llm = self._llm
        prompt = llm.tokenize("Passes of one to nine tokens are timed here, each with its logits.",
                              add_bos=True, parse_special=False)
        tokens = (prompt * MAX_PROPOSED)[1 : MAX_PROPOSED + 2]
        start = len(prompt)

        def run(n: int, logits: bool = True) -> float:
            entries = [(0, start + i, [token], True) for i, token in enumerate(tokens[:n])]
            began = time.perf_counter()
            fitted = llm.decode(entries, logits=logits)
            if not logits:
                head = llm.drafts
                assert head is not None
                head.shortlist_scores(llm.hidden[0])
            seconds = time.perf_counter() - began
            llm.forget(0, start)
            if not fitted:
                raise EngineError("the cache has no room to time passes in")
            return seconds

        try:
            if max(len(prompt), MAX_PROPOSED + 1) > llm.ubatch:
                raise EngineError(f"a batch holds {llm.ubatch} tokens, too few to time passes with")
            if not llm.decode([(0, 0, prompt, False)]):
                raise EngineError("the cache has no room to time passes in")
            if passes:
                self._pass_costs = PassCosts.measure(run)
                log.info("pass costs, in single-token passes by tokens fed: %s", self._pass_costs)
        except Exception as exc:  # the model serves all the same: proposals fed by a guess, no drafting
            log.warning("pass costs not measured (%s): proposals are fed at guessed costs, none drafted", exc)
            if passes:
                self._pass_costs = PassCosts.guessed()
            drafts = False
        try:
            if drafts:
                run(1, logits=False)
                hidden = np.repeat(np.array(llm.hidden[:1]), MAX_CHAIN, axis=0)

                def logits_of(n: int) -> float:
                    began = time.perf_counter()
                    llm.logits_of(hidden[:n])
                    return time.perf_counter() - began

                unit = min(run(1) for _ in range(3))
                self._draft_costs = DraftCosts.measure(lambda: run(1, logits=False), logits_of, unit)
                log.info("drafting costs, in single-token passes: %s", self._draft_costs)
        except Exception as exc:  # the model serves all the same, without drafting
            log.warning("drafting costs not measured (%s): no drafting", exc)
            self._draft_costs = DraftCosts.guessed()
        finally:
            llm.forget(0)
        log.info("Q5_0, Q6_K and Q4_K products, attention: %s", q5_0.describe())

    def _loop(self) -> None:
        """Runs steps until closed. A step that fails fails the requests it had; the engine starts afresh (an
        empty cache) and serves the rest, unless it failed MAX_RESTARTS times within RESTART_WINDOW seconds."""
        failures: deque[float] = deque()
        while True:
            try:
                self._serve()
                return
            except Exception as exc:
                log.exception("engine step failed")
                self._inbox.fail(exc, self._held(), self._outbox, for_good=False)
                failures.append(time.monotonic())
                while failures and failures[0] < time.monotonic() - RESTART_WINDOW:
                    failures.popleft()
                if len(failures) > MAX_RESTARTS or not self._start_afresh():
                    log.error("engine stopped: it failed %d times within %d s", len(failures), RESTART_WINDOW)
                    self._inbox.fail(exc, [], self._outbox)
                    return
                log.warning("engine restarted with an empty cache")
            except BaseException as exc:  # the thread must never die silently: fail every waiting request
                log.exception("engine thread failed")
                self._inbox.fail(exc, self._held(), self._outbox)
                return

    def _start_afresh(self) -> bool:
        """Forget every cache (the failed step may have left any of them half written); False if even that fails."""
        try:
            for seq_id in range(2 * self._max_running):
                self._llm.forget(seq_id, 0)
        except Exception:
            log.exception("the engine's cache could not be cleared")
            return False
        self._free_ids = list(range(2 * self._max_running - 1, -1, -1))
        self._kept.clear()
        self._pinned.clear()  # computed again (or loaded from their saved state) when next used
        return True

    def _serve(self) -> None:
        while True:
            # Set-aside sequences go first, each once the cache has room for it; new ones only after them.
            self._waiting = deque(s for s in self._waiting if not s.cancelled)
            while self._waiting and len(self._running) < self._max_running and self._fits(self._waiting[0]):
                self._admitting = [self._waiting.popleft()]  # held until running: a failure fails it too
                self._admit(self._admitting[0])
                self._admitting = []
            room = 0 if self._waiting else self._max_running - len(self._running)
            busy = bool(self._running or self._waiting)
            if not busy and self._inbox.empty():
                release_idle_threads()  # idle: no parked workers to slow the other models down (threads.py)
            admitted = self._inbox.take(room, busy=busy)
            if admitted is None:
                break
            self._admitting = admitted  # until they are running: a failure on the way fails them too
            # Cancelled sequences leave first, so that a new one can start from the cache they leave.
            for seq in [s for s in self._running if s.cancelled]:
                self._finish(seq)
            for seq in admitted:
                self._admit(seq)
            self._admitting = []
            self._step()
            self._outbox.flush()

    def _held(self) -> list[_Sequence]:
        """Every sequence the engine thread holds: running, set aside, or on its way in."""
        held = {id(s): s for s in [*self._running, *self._waiting, *self._admitting]}
        for seq in held.values():
            if seq.solo is not None:
                seq.solo.close()
                seq.solo = None
        self._running.clear()
        self._waiting.clear()
        self._admitting = []
        return list(held.values())

    def _admit(self, seq: _Sequence) -> None:
        """Give `seq` a sequence id, starting from the kept cache that shares the longest prefix with it."""
        prompt = seq.pending
        if not _reuses_prefixes(seq):
            # A whole number of llama.cpp's 256-cell steps: then the cells attention reads depend on the
            # sequence's length alone, not on the size of the context.
            size = -(-(len(prompt) + seq.request.max_new_tokens + 1) // SOLO_CELLS) * SOLO_CELLS
            try:
                seq.solo = self._llm.solo(size, SOLO_CHUNK)
            except EngineError as exc:  # no memory for it: this request fails, the others go on
                self._outbox.put(seq, exc)
                seq.cancelled = True
                return
            self._running.append(seq)
            return
        if _reuses_prefixes(seq) and self._start_from_pin(seq):
            return
        best_id, best_len = -1, 0
        for seq_id, kept in self._kept.items() if _reuses_prefixes(seq) else ():
            if (kept.adapter, kept.scope) == (seq.request.adapter, seq.request.scope):
                common = _common_prefix(kept.tokens, prompt)
                if common > best_len:
                    best_id, best_len = seq_id, common
        best_len = min(best_len, len(prompt) - 1)  # the last prompt token is always fed, for its logits
        if best_len >= MIN_REUSED_PREFIX and self._llm.forget(best_id, best_len):
            del self._kept[best_id]
            seq.seq_id = best_id
            seq.history = prompt[:best_len]
            seq.pending = prompt[best_len:]
            seq.cached_tokens = best_len
            self.reused_tokens += best_len
        else:
            fresh = self._take_id()
            assert fresh is not None, "pins hold at most half the ids, so one is free or kept"
            seq.seq_id = fresh
            self._llm.forget(fresh)
        self._running.append(seq)

    def _start_from_pin(self, seq: _Sequence) -> bool:
        """Start `seq` from a copy of the longest computed pin its prompt begins with (and leave it room)."""
        self._drop_unpinned()
        self._load_saved_pins(seq)
        prompt = seq.pending
        best: tuple[str, _Pinned] | None = None
        for key, pinned in self._pinned.items():
            n = len(pinned.tokens)
            if ((pinned.adapter, pinned.scope) == (seq.request.adapter, seq.request.scope) and n < len(prompt)
                    and tuple(prompt[:n]) == pinned.tokens
                    and (best is None or n > len(best[1].tokens))):
                best = key, pinned
        if best is None:
            return False
        key, pinned = best
        seq_id = self._take_id()
        if seq_id is None:
            return False
        self._pinned.move_to_end(key)
        n = len(pinned.tokens)
        self._llm.copy(pinned.seq_id, seq_id, n)
        seq.seq_id, seq.history, seq.pending, seq.cached_tokens = seq_id, prompt[:n], prompt[n:], n
        self.reused_tokens += n
        self._running.append(seq)
        return True

    def _take_id(self) -> int | None:
        if self._free_ids:
            return self._free_ids.pop()
        if self._kept:
            return self._evict_oldest_kept()
        return None

    def _drop_unpinned(self) -> None:
        with self._forgotten_lock:
            wanted = {k: (p, a, s) for k, (p, a, _, s) in self._pins.items()}
        for key in [k for k, p in self._pinned.items() if wanted.get(k) != (p.tokens, p.adapter, p.scope)]:
            self._forget_pin(key)

    def _load_saved_pins(self, seq: _Sequence) -> None:
        """Pins `seq`'s prompt begins with whose state was saved (before a restart, or before the pin had to
        make room) come back from their files."""
        prompt = seq.pending
        with self._forgotten_lock:
            saved = [(k, p, a, f, s) for k, (p, a, f, s) in self._pins.items()
                     if k not in self._pinned and k not in self._unloadable
                     and (a, s) == (seq.request.adapter, seq.request.scope)
                     and len(p) < len(prompt) and tuple(prompt[: len(p)]) == p and f is not None]
        for key, prefix, adapter, path, scope in saved:
            if not path.is_file():
                continue
            if not self._fits_pin(len(prefix)):
                continue
            seq_id = self._take_id()
            if seq_id is None:
                return
            if self._llm.load_sequence(seq_id, path, len(prefix)) == prefix:
                self._pinned[key] = _Pinned(seq_id, prefix, adapter, scope)
                log.info("pinned prefix read back", extra={"tokens": len(prefix)})
            else:
                self._llm.forget(seq_id)
                self._free_ids.append(seq_id)
                self._unloadable.add(key)  # computed again by the first request that needs it

    def _fits_pin(self, n: int) -> bool:
        """Make room for a pin of `n` tokens (least recently used out first); False if it cannot have any."""
        if n > self.pin_budget:
            log.warning("a pinned prefix is larger than the pin budget", extra={"tokens": n})
            return False
        # Pins use at most half the sequence ids (the other half is for running sequences), and the budget.
        while self._pinned and (len(self._pinned) >= self._max_running or
                                sum(len(p.tokens) for p in self._pinned.values()) + n > self.pin_budget):
            self._forget_pin(next(iter(self._pinned)))
        return True

    def _forget_pin(self, key: str) -> None:
        pinned = self._pinned.pop(key)
        self._llm.forget(pinned.seq_id)
        self._free_ids.append(pinned.seq_id)

    def _pin_from(self, seq: _Sequence) -> None:
        """Keep a copy of the pins `seq` computed (its history begins with them) that are not kept yet."""
        with self._forgotten_lock:
            wanted = [(k, p, a, f, s) for k, (p, a, f, s) in self._pins.items() if k not in self._pinned]
        for key, prefix, adapter, path, scope in wanted:
            n = len(prefix)
            if ((adapter, scope) != (seq.request.adapter, seq.request.scope) or len(seq.history) < n
                    or tuple(seq.history[:n]) != prefix):
                continue
            if not self._fits_pin(n):
                continue
            seq_id = self._take_id()
            if seq_id is None:
                return
            self._llm.copy(seq.seq_id, seq_id, n)
            self._pinned[key] = _Pinned(seq_id, prefix, adapter, scope)
            self._unloadable.discard(key)
            if path is not None:
                partial = path.with_suffix(".partial")
                if self._llm.save_sequence(seq_id, partial, prefix):
                    partial.replace(path)

    def _step(self) -> None:
        self._unload_forgotten()
        for seq in [s for s in self._running if s.solo is not None]:
            self._solo_step(seq)
        if not any(s.solo is None for s in self._running):
            return
        adapter = self._next_adapter()
        try:
            self._llm.use_adapter(adapter)
        except EngineError as exc:
            for seq in [s for s in self._running if s.solo is None and s.request.adapter == adapter]:
                self._outbox.put(seq, exc)
                self._finish(seq, keep=False)
            return
        entries: list[tuple[int, int, list[int], bool]] = []
        plan: list[_Sequence] = []
        group = sorted((s for s in self._running if s.solo is None and s.request.adapter == adapter),
                       key=lambda s: len(s.pending))
        room = self._llm.ubatch
        # While others decode, prompts advance by a smaller chunk per step, so that a long prompt slows their
        # tokens down rather than stopping them (a 512-token chunk deep into a long prompt takes seconds here).
        decoding = any(s.history and len(s.pending) == 1 for s in group)
        prompt_room = min(room, PROMPT_TOKENS_BESIDE_DECODING) if decoding else room
        # Decoding sequences first (one token each), then prompt chunks in what room is left.
        for seq in group:
            prompt = len(seq.pending) > 1 or not seq.history
            chunk = seq.pending[: min(room, prompt_room) if prompt else room]
            if not chunk:
                break
            entries.append((seq.seq_id, len(seq.history), chunk, len(chunk) == len(seq.pending)))
            plan.append(seq)
            room -= len(chunk)
            if prompt:
                prompt_room -= len(chunk)
        # A sequence decoding alone also feeds the tokens its grammar forces or prompt lookup proposes
        # (engine/lookup.py), each with logits, as many as pay by what such passes cost; where none do, it may run
        # a chain of drafted tokens instead (engine/drafting.py). (Choosing between the two by their expected
        # tokens per pass measured slower: the chain then took steps where lookup's streaks would have paid more.)
        lone = len(plan) == 1 and len(entries[0][2]) == 1 and bool(plan[0].history)
        proposed: list[int] = []
        forced = False
        unfed: tuple[int, Acceptance] | None = None  # a proposal not fed, checked against the token chosen
        if len(group) == 1 and lone and entries[0][3]:
            candidates, forced, acceptance, feeding = self._proposal(plan[0])
            passes = 0 if feeding else self._chain_passes(plan[0])
            first = (candidates[0], acceptance) if candidates and acceptance is not None else None
            if passes and self._draft_chain(plan[0], passes, first):
                return
            proposed = candidates[:feeding]
            unfed = first if not feeding else None
        if proposed:
            seq_id, start, chunk, _ = entries[0]
            entries += [(seq_id, start + 1 + i, [token], True) for i, token in enumerate(proposed)]
            if self._llm.decode(entries):
                self._check_proposal(plan[0], chunk, proposed, "forced" if forced else "lookup")
                return
            # No cells for the proposals: the step goes on without them (llama.cpp left the cache as it was).
            entries = entries[:1]
        if not self._llm.decode(entries):
            self._make_room()
            return
        row = 0
        for seq, (_, _, chunk, wants_logits) in zip(plan, entries, strict=True):
            seq.history.extend(chunk)
            del seq.pending[: len(chunk)]
            row += len(chunk)
            if wants_logits:
                self._advance(seq, row - 1)
        if lone and plan[0].pending:  # it goes on: the token chosen after the step's one is there
            chosen = plan[0].pending[-1]
            if unfed is not None:
                token, acceptance = unfed
                acceptance.observe(1, int(chosen == token))
            drafter = plan[0].drafter
            if drafter is not None:  # would a draft have been right? (its best guess is nearly always the argmax)
                drafter.acceptance.observe(1, int(chosen == int(np.argmax(self._llm.logits(row - 1)))))

    def _proposal(self, seq: _Sequence) -> tuple[list[int], bool, Acceptance | None, int]:
        """Tokens that may be fed after `seq`'s next one, within its budget and the cache's room, and whether its
        grammar forces them: those a constraint forces if any, else those prompt lookup proposes; the rate they
        count toward; and how many of them pay (`lookup.worth_feeding`)."""
        if not self._lookup or not self._llm.can_cut or len(seq.pending) != 1 or not seq.history:
            return [], False, None, 0
        kept = sum(len(k.tokens) for k in self._kept.values())
        room = self._llm.n_ctx - len(seq.history) - 1 - kept - MAX_PROPOSED
        limit = min(seq.request.max_new_tokens - seq.n_generated - 1, self._llm.ubatch - 1, room, MAX_PROPOSED)
        if limit <= 0:
            return [], False, None, 0
        forced = seq.request.constraint.forced() if seq.request.constraint is not None else []
        if forced:
            candidates, acceptance = forced[:limit], seq.forced_acceptance
        else:
            if seq.lookup is None:
                seq.lookup = Lookup()
            seq.lookup.sync(seq.history, seq.pending)
            candidates, acceptance = seq.lookup.propose(limit), seq.lookup.acceptance
        feeding = worth_feeding(len(candidates), acceptance.rate, self._pass_costs)
        return candidates, bool(forced), acceptance, feeding

    def _chain_passes(self, seq: _Sequence) -> int:
        """How many passes a drafted chain of `seq` should run, within its budget and the cache's room; 0 where no
        chain is expected to beat one token a pass (or none can run)."""
        llm = self._llm
        head = llm.drafts
        if not self._drafting or head is None or not llm.can_cut or not self._draft_costs.can_pay:
            return 0  # (the last: not even drafts always right would pay, on the costs measured)
        if seq.drafter is None:
            params = seq.request.sampling
            seq.drafter = Drafter(head, greedy=params.temperature < MIN_TEMPERATURE or params.top_k == 1)
            seq.drafter.add(list(self._recent))
        kept = sum(len(k.tokens) for k in self._kept.values())
        room = llm.n_ctx - len(seq.history) - 1 - kept - MAX_CHAIN
        limit = min(seq.request.max_new_tokens - seq.n_generated, room + 1)
        return chain_length(seq.drafter.acceptance.rate, self._draft_costs, limit)

    def _draft_chain(self, seq: _Sequence, passes: int, unfed: tuple[int, Acceptance] | None) -> bool:
        """Run `seq`'s next token and the tokens drafted after it through the layers, one pass each (`passes` at
        most), then the output layer over all of them at once, and keep the drafts that decoding one token at a
        time would have chosen (engine/drafting.py). False, and nothing done, where it cannot run."""
        llm = self._llm
        head, drafter, constraint = llm.drafts, seq.drafter, seq.request.constraint
        assert head is not None and drafter is not None
        try:
            drafter.sync(seq.history, seq.pending)
        except OSError as exc:  # the model file's rows could not be read again: serve on without drafts
            log.warning("drafting turned off for this model: %s", exc)
            self._drafting = False
            return False
        start = len(seq.history)
        fed = [seq.pending[0]]
        hidden = np.empty((passes, head.n_embd), np.float32)
        done = consumed = 0
        missed = False  # no draft came (none permitted, an end, a grammar in error): counts as a wrong one
        for i in range(passes):  # (a failing decode fails the step, and with it this request and its grammar)
            if not llm.decode([(seq.seq_id, start + i, [fed[i]], True)], logits=False):
                break  # no cells left: the chain ends here (llama.cpp left the cache as it was)
            hidden[i] = llm.hidden[0]
            done = i + 1
            if done == passes:
                break
            try:
                token = drafter.propose(hidden[i], constraint, seq.request.sampling, seq.generated)
                if token is None or llm.is_end_of_generation(token):
                    missed = True
                    break
                if self._lookup_pays(seq, fed + [token]):
                    break  # the next step feeds what prompt lookup proposes after this token
                if constraint is not None:
                    if not constraint.speculate(token):
                        missed = True
                        break
                    consumed += 1
                    if constraint.finished:  # the sequence ends with this token: nothing to draft after it
                        break
            except Exception:  # a grammar in error: choosing the chain's tokens below reports it to the request
                missed = True
                break
            fed.append(token)
        if constraint is not None and consumed:
            try:
                constraint.rollback(consumed)
            except Exception as exc:  # this request's grammar is lost; the others go on
                log.exception("a grammar could not undo its drafted tokens")
                self._outbox.put(seq, EngineError(f"constrained decoding failed for this request: {exc}"))
                self._finish(seq, keep=False)
                return True
        if done == 0:
            return False
        if missed:
            drafter.acceptance.observe(1, 0)
        llm.logits_of(hidden[:done])
        self._check_proposal(seq, fed[:1], fed[1:done], "draft")
        if unfed is not None:  # the proposal prompt lookup did not feed, against the token chosen after the first
            after = seq.history[start + 1 :] or seq.pending[-1:]
            if after:
                token, acceptance = unfed
                acceptance.observe(1, int(after[0] == token))
        return True

    def _lookup_pays(self, seq: _Sequence, drafted: list[int]) -> bool:
        """Whether prompt lookup would feed tokens after `seq`'s tokens so far and then `drafted`."""
        if seq.lookup is None:
            return False
        candidates = seq.lookup.propose_after((seq.history[-3:] + drafted)[-3:], MAX_PROPOSED)
        return bool(candidates) and worth_feeding(len(candidates), seq.lookup.acceptance.rate, self._pass_costs) > 0

    def _check_proposal(self, seq: _Sequence, fed: list[int], proposed: list[int], source: str) -> None:
        """Choose `seq`'s tokens position by position, as one at a time would; keep each proposed token only while
        it is the token chosen before it, and drop the cache of the rest. `source`: who proposed them ("forced"
        by a grammar, "lookup" or "draft")."""
        seq.history.extend(fed)
        seq.pending.clear()
        kept = 0
        ended = False
        for row in range(len(proposed) + 1):
            ended = advance(seq, self._llm.logits(row), self._llm.is_end_of_generation, self._outbox)
            if ended or row == len(proposed) or seq.pending[-1] != proposed[row]:
                break
            seq.history.append(seq.pending.pop())  # its keys and values were computed in this pass
            kept += 1
        if kept < len(proposed) and not self._llm.forget(seq.seq_id, len(seq.history)):
            raise EngineError("the cache of rejected proposals could not be dropped")  # fails this step's requests
        if source == "draft":  # counted apart from prompt lookup's and a grammar's proposals
            assert seq.drafter is not None
            seq.drafter.acceptance.observe(len(proposed), kept)
            self.drafted_tokens += len(proposed)
            self.draft_accepted += kept
        else:
            if source == "forced":
                seq.forced_acceptance.observe(len(proposed), kept)
                self.forced_tokens += len(proposed)
                self.forced_accepted += kept
            else:
                assert seq.lookup is not None
                seq.lookup.acceptance.observe(len(proposed), kept)
            self.proposed_tokens += len(proposed)
            self.accepted_tokens += kept
        if ended:
            self._finish(seq)

    def _solo_step(self, seq: _Sequence) -> None:
        """One forward pass of a seeded sequence in its own context: a prompt chunk of SOLO_CHUNK tokens (the same
        chunks whatever else runs, and small enough not to hold the others' tokens up), or its next token. A
        failure there is this request's alone."""
        solo = seq.solo
        assert solo is not None
        chunk = seq.pending[:SOLO_CHUNK]
        last = len(chunk) == len(seq.pending)
        try:
            solo.use_adapter(seq.request.adapter)
            if not solo.decode([(0, len(seq.history), chunk, last)]):
                raise EngineError("a seeded request did not fit the context made for it")
        except EngineError as exc:
            log.exception("a seeded request's step failed")
            self._outbox.put(seq, exc)
            self._finish(seq, keep=False)
            return
        seq.history.extend(chunk)
        del seq.pending[: len(chunk)]
        if last and advance(seq, solo.logits(len(chunk) - 1), solo.is_end_of_generation, self._outbox):
            self._finish(seq)

    def _unload_forgotten(self) -> None:
        with self._forgotten_lock:
            if not self._forgotten:
                return
            in_use = {s.request.adapter for s in self._running}
            done = {path for path in self._forgotten if path not in in_use}
            self._forgotten -= done
        for path in done:
            self._llm.unload_adapter(path)
            for seq_id in [i for i, kept in self._kept.items() if kept.adapter == path]:
                del self._kept[seq_id]
                self._llm.forget(seq_id)
                self._free_ids.append(seq_id)

    def _next_adapter(self) -> str | None:
        """Steps take turns between the adapters (None: the base model) that running sequences of the shared
        context use (seeded ones have contexts of their own)."""
        adapters = sorted({s.request.adapter for s in self._running if s.solo is None}, key=lambda a: a or "")
        self._turn = (self._turn + 1) % len(adapters)
        return adapters[self._turn]

    def _advance(self, seq: _Sequence, row: int) -> None:
        if advance(seq, self._llm.logits(row), self._llm.is_end_of_generation, self._outbox):
            self._finish(seq)

    def _finish(self, seq: _Sequence, keep: bool = True) -> None:
        self._running.remove(seq)
        seq.cancelled = True
        for token in seq.generated:
            self._recent[token] = None
            self._recent.move_to_end(token)
        while len(self._recent) > RECENT_TOKENS:
            self._recent.popitem(last=False)
        if seq.solo is not None:
            seq.solo.close()
            seq.solo = None
            return
        if keep:
            self._pin_from(seq)
        if keep and len(seq.history) >= MIN_REUSED_PREFIX:
            self._kept[seq.seq_id] = _Kept(seq.history, seq.request.adapter, seq.request.scope)
            total = sum(len(kept.tokens) for kept in self._kept.values())
            while len(self._kept) > 1 and total > len(seq.history) + self._kept_tokens:
                oldest = next(iter(self._kept))
                total -= len(self._kept[oldest].tokens)
                self._free_ids.append(self._evict_oldest_kept())
        else:
            self._llm.forget(seq.seq_id)
            self._free_ids.append(seq.seq_id)

    def _evict_oldest_kept(self) -> int:
        seq_id, _ = self._kept.popitem(last=False)
        self._llm.forget(seq_id)
        return seq_id

    def _make_room(self) -> None:
        """The batch did not fit the KV cache: drop kept caches first; then set aside the sequence that came last
        (its cache freed, its tokens so far computed again once there is room), so that a long prompt never
        ends requests that were there before it. A sequence alone that does not fit ends with an error."""
        if self._kept:
            while self._kept:
                self._free_ids.append(self._evict_oldest_kept())
            return
        if self._pinned:  # computed again when next needed
            self._forget_pin(next(iter(self._pinned)))
            return
        shared = [s for s in self._running if s.solo is None]  # seeded sequences have contexts of their own
        victim = shared[-1]
        if len(shared) == 1:
            log.warning("KV cache full with one sequence")
            self._outbox.put(victim, EngineError("this request needs more context memory than the server has "
                                                 "(see --context-size)"))
            self._finish(victim, keep=False)
            return
        log.info("KV cache full; the latest sequence waits for room", extra={"tokens": len(victim.history)})
        self._running.remove(victim)
        self._llm.forget(victim.seq_id)
        self._free_ids.append(victim.seq_id)
        victim.pending = victim.history + victim.pending
        victim.history = []
        victim.seq_id = -1
        victim.cached_tokens = 0
        self._waiting.appendleft(victim)

    def _fits(self, seq: _Sequence) -> bool:
        """Whether the cache has room for `seq`'s tokens beside what the running sequences hold."""
        if not _reuses_prefixes(seq):
            return True  # it gets a context of its own
        shared = [s for s in self._running if s.solo is None]
        used = sum(len(s.history) + len(s.pending) for s in shared)
        return not shared or used + len(seq.pending) + len(shared) <= self._llm.n_ctx


def _reuses_prefixes(seq: _Sequence) -> bool:
    """Seeded requests promise the same output every time: they run in contexts of their own, from their first
    token. When this was written a prompt continued from a kept prefix scored differently from the same prompt
    computed whole (log-probabilities moved by up to 0.07), and in the shared context a sequence's numbers depended
    on the batch and on where its keys and values landed in the cache (15 of 18 seeded runs beside 5 other streams
    differed); gemserve's kernels and attention have since made those the same bits, and the contexts stay."""
    return seq.request.sampling.seed is None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
