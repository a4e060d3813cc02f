"""Running a generation plan and shaping what the engine gives back into GenerateContentResponse JSON.

Each candidate is one engine sequence. Their events are merged as they come; each candidate's tokens pass
through its own `TextStream` (UTF-8 reassembly, stop sequences) and, when the request has tools, its own
`CallReader`, which turns the text into text parts and functionCall parts. A call that repeats one whose result
the conversation already holds is left out; a candidate left with nothing at all is generated once more with
calls ruled out (small models tend to call the same function again instead of reading its result).

A stop sequence ends only its candidate: the iterator of that sequence is closed, which cancels it in the engine.
Leaving `stream` early (the client went away) closes every candidate's iterator, so no generation outlives its
request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from gemserve.engine.types import EngineBusy, EngineError, Event, FinishEvent, GenerationRequest, TokenEvent
from gemserve.errors import RETRY_AFTER_SECONDS, ApiError
from gemserve.sandbox.bwrap import Execution, SandboxUnavailable
from gemserve.schema.content import Blob, CodeExecutionResult, Content, ExecutableCode, FunctionCall, Part
from gemserve.schema.responses import (
    Candidate,
    GenerateContentResponse,
    LogprobsCandidate,
    LogprobsResult,
    ModalityTokenCount,
    PromptFeedback,
    SafetyRating,
    TopCandidates,
    UsageMetadata,
)
from gemserve.service.code_execution import MAX_ROUNDS, Code, CodeReader, Forged, output_block
from gemserve.service.requests import GenerationPlan
from gemserve.service.safety import CONTEXT_CHARS, FIRST_WINDOW_TOKENS, WINDOW_TOKENS, Guard, highest, parts_text
from gemserve.service.text import TextStream
from gemserve.service.tools import CallPart, CallReader, MalformedCall, OutputPart, TextPart, call_key


@dataclass
class _Candidate:
    index: int
    text: TextStream
    calls: CallReader | None
    code: CodeReader | None  # set when the model may run code
    tokens: int = 0
    malformed: bool = False
    emitted: bool = False  # some part went out
    repeated: bool = False  # a call whose result the conversation already holds was left out
    retry: GenerationRequest | None = None  # set when the candidate is to be generated again, calls ruled out
    attempt: int = 0  # events of an earlier attempt are dropped
    # Log-probabilities not sent yet: while a first attempt may still be dropped, they wait for its first part.
    held: tuple[list[LogprobsCandidate], list[TopCandidates]] = field(default_factory=lambda: ([], []))
    finish: str | None = None
    chosen: list[LogprobsCandidate] = field(default_factory=list)
    top: list[TopCandidates] = field(default_factory=list)
    logprob_sum: float = 0.0
    # Code execution: the current attempt's prompt and the tokens it generated, what is to run, rounds done.
    prompt: tuple[int, ...] = ()
    written: list[int] = field(default_factory=list)
    to_run: str | None = None
    base: GenerationRequest | None = None  # what continuations are made from: the request, or its retry
    rules: str | None = None  # the grammar base's constraint was compiled from
    ran: list[str] = field(default_factory=list)  # the code of the blocks run so far
    cut: bool = False  # the candidate ends at the block it wrote last (see _prose_and_code)
    tool_tokens: int = 0  # tokens of run results put into the prompt


@dataclass(frozen=True)
class Ran:
    """A code run ended; its continuation is `request` (None: no room left to continue)."""

    execution: Execution
    request: GenerationRequest | None


@dataclass(frozen=True)
class Delta:
    """New output of one candidate: parts that became final, log-probabilities, and the finish reason at the end."""

    index: int
    parts: list[Part]
    chosen: list[LogprobsCandidate]
    top: list[TopCandidates]
    finish: str | None
    ratings: tuple[SafetyRating, ...] | None = None  # the candidate's safety ratings so far, when it is rated


def _merge(first: Delta, then: Delta) -> Delta:
    return Delta(first.index, join_parts(first.parts + then.parts), first.chosen + then.chosen, first.top + then.top,
                 then.finish or first.finish, then.ratings or first.ratings)


def join_parts(parts: list[Part]) -> list[Part]:
    """Neighbouring text parts as one."""
    out: list[Part] = []
    for part in parts:
        if out and part.text is not None and out[-1].text is not None:
            out[-1] = Part(text=out[-1].text + part.text)
        else:
            out.append(part)
    return out


class Generation:
    """One generateContent call in flight: `deltas()` yields candidate outputs as they become final."""

    def __init__(self, plan: GenerationPlan) -> None:
        self.plan = plan
        self.response_id = secrets.token_urlsafe(16)
        self.reused_tokens = 0  # prompt tokens the engine took from a kept cache (implicit caching)
        # Set by `guarded` when a threshold can block: a candidate's code runs only once it is rated, its gate
        # opened (`_cleared`) after the window that holds the code passed.
        self._gated = False
        self._cleared: dict[int, asyncio.Event] = {}
        self.candidates = [
            _Candidate(i, TextStream(plan.stop_sequences), CallReader(plan.bare_calls) if plan.reads_calls else None,
                       CodeReader() if plan.sandbox is not None else None, prompt=request.prompt, base=request,
                       rules=plan.rules)
            for i, request in enumerate(plan.candidates)
        ]

    @property
    def prompt_token_count(self) -> int:
        return len(self.plan.prompt)

    @property
    def candidates_token_count(self) -> int:
        return sum(c.tokens for c in self.candidates)

    @property
    def tool_use_token_count(self) -> int:
        return sum(c.tool_tokens for c in self.candidates)

    async def deltas(self) -> AsyncGenerator[Delta, None]:
        engine = self.plan.model.engine
        streams = [engine.generate(request) for request in self.plan.candidates]
        queue: asyncio.Queue[tuple[int, int, Event | Ran | BaseException | None]] = asyncio.Queue()

        async def pump(index: int, attempt: int, events: AsyncIterator[Event]) -> None:
            cand = self.candidates[index]
            try:
                async for event in events:
                    await queue.put((index, attempt, event))
                    if cand.finish is not None or cand.attempt != attempt:
                        break  # it ended (a stop sequence) or starts over: leaving the loop cancels the sequence
            except Exception as exc:  # delivered to the consumer, which raises it
                await queue.put((index, attempt, exc))
            finally:
                await events.aclose()  # type: ignore[attr-defined]
                await queue.put((index, attempt, None))

        async def run_then_continue(index: int, attempt: int, code: str) -> None:
            """Runs the candidate's code and goes on generating after its output."""
            cand = self.candidates[index]
            try:
                if self._gated:
                    cleared = self._cleared.setdefault(index, asyncio.Event())
                    await cleared.wait()
                    cleared.clear()
                    if cand.finish is not None:  # blocked: the code never runs
                        await queue.put((index, attempt, None))
                        return
                ran = await self._run(cand, code)
            except Exception as exc:
                await queue.put((index, attempt, exc))
                await queue.put((index, attempt, None))
                return
            await queue.put((index, attempt, ran))
            if ran.request is None:
                await queue.put((index, attempt, None))
                return
            await pump(index, attempt, engine.generate(ran.request))

        tasks = [asyncio.create_task(pump(i, 0, s)) for i, s in enumerate(streams)]
        current = dict(enumerate(tasks))  # each candidate's running attempt
        try:
            live = len(tasks)
            while live:
                # Whatever else has arrived meanwhile goes out with it: a client that reads slower than the
                # model writes gets fewer, larger chunks instead of falling behind.
                arrived = [await queue.get()]
                while not queue.empty():
                    arrived.append(queue.get_nowait())
                merged: dict[int, Delta] = {}
                for index, attempt, event in arrived:
                    cand = self.candidates[index]
                    if event is None:
                        live -= 1
                        continue
                    if attempt != cand.attempt:
                        continue
                    if isinstance(event, EngineBusy):
                        raise ApiError("RESOURCE_EXHAUSTED", f"The server is busy: {event}. Try again later.",
                                       retry_after=RETRY_AFTER_SECONDS) from event
                    if isinstance(event, EngineError):
                        raise ApiError("UNAVAILABLE", f"The model could not finish this request: {event}") from event
                    if isinstance(event, BaseException):
                        raise event
                    delta = self._ran(cand, event) if isinstance(event, Ran) else self._apply(cand, event)
                    if delta is not None:
                        merged[index] = _merge(merged[index], delta) if index in merged else delta
                    if cand.retry is not None:
                        # The first attempt is cancelled before the second is queued: the engine then keeps its
                        # cache, and the second attempt, which shares its prompt's prefix, starts from it.
                        current[index].cancel()
                        current[index] = asyncio.create_task(pump(index, cand.attempt, engine.generate(cand.retry)))
                        tasks.append(current[index])
                        cand.retry = None
                        live += 1
                    if cand.to_run is not None and cand.finish is not None:
                        cand.to_run = None  # a stop sequence ended the candidate with the block: nothing runs
                    if cand.to_run is not None:
                        # The model closed a code block: its generation stops there, the code runs, and the
                        # model goes on after the output (from the cache of what it wrote, kept by the engine).
                        current[index].cancel()
                        cand.attempt += 1
                        current[index] = asyncio.create_task(run_then_continue(index, cand.attempt, cand.to_run))
                        tasks.append(current[index])
                        cand.to_run = None
                        live += 1
                for delta in merged.values():
                    yield delta
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _apply(self, cand: _Candidate, event: Event) -> Delta | None:
        if cand.finish is not None:
            return None
        # The prompt tokens a kept cache gave: said by the first token, or by the finish where no token came. Only
        # the first attempt's: later attempts start from the first one's own cache, not the prompt's reuse.
        reused = event.cached_tokens if isinstance(event, TokenEvent) or cand.tokens == 0 else None
        if reused is not None and cand.attempt == 0:
            self.reused_tokens = max(self.reused_tokens, min(reused, self.prompt_token_count))
        if isinstance(event, FinishEvent):
            parts = self._parts(cand, cand.text.flush(), final=True)
            if self._start_over(cand):
                return None
            if cand.to_run is not None:  # the model ended right after a code block: it runs, and the model goes on
                return Delta(cand.index, parts, *self._release(cand, [], []), None)
            cand.finish = "MALFORMED_FUNCTION_CALL" if cand.malformed and event.reason == "STOP" else event.reason
            return Delta(cand.index, parts, *self._release(cand, [], []), cand.finish)
        assert isinstance(event, TokenEvent)
        cand.tokens += 1
        cand.written.append(event.token)
        chosen: list[LogprobsCandidate] = []
        top: list[TopCandidates] = []
        if self.plan.logprobs is not None and event.logprob is not None:
            chosen = [self._logprob_candidate(event.token, event.logprob)]
            cand.logprob_sum += event.logprob
            if self.plan.logprobs > 0:
                top = [TopCandidates(candidates=[self._logprob_candidate(t, lp) for t, lp in event.top])]
            cand.chosen.extend(chosen)
            cand.top.extend(top)
        text = cand.text.push(self.plan.model.engine.token_bytes(event.token))
        if cand.text.stopped:
            cand.finish = "STOP"
            parts = self._parts(cand, text, final=True)
            return Delta(cand.index, parts, *self._release(cand, chosen, top), "STOP")
        parts = self._parts(cand, text, final=False)
        if self._start_over(cand):
            return None
        if cand.cut:
            cand.finish = "STOP"
            return Delta(cand.index, parts, *self._release(cand, chosen, top), "STOP")
        chosen, top = self._release(cand, chosen, top)
        if not parts and not chosen:
            return None
        return Delta(cand.index, parts, chosen, top, None)

    def _release(self, cand: _Candidate, chosen: list[LogprobsCandidate], top: list[TopCandidates],
                 ) -> tuple[list[LogprobsCandidate], list[TopCandidates]]:
        """The log-probabilities that may go out now, with any held back before them."""
        held_chosen, held_top = cand.held
        if self.plan.retries and cand.attempt == 0 and not cand.emitted and cand.finish is None:
            held_chosen += chosen
            held_top += top
            return [], []
        cand.held = ([], [])
        return held_chosen + chosen, held_top + top

    def _start_over(self, cand: _Candidate) -> bool:
        """When all the model wrote so far is calls it has the results of, it answers again, in text, within what
        is left of its token budget. Nothing of the first attempt has gone out."""
        if not (cand.repeated and not cand.emitted and self.plan.retries and cand.attempt == 0):
            return False
        retry = self.plan.retries[cand.index]
        left = min(retry.max_new_tokens - cand.tokens, self.plan.model.input_token_limit - len(retry.prompt))
        if left <= 0:
            return False
        cand.retry = replace(retry, max_new_tokens=left)
        cand.attempt += 1
        cand.repeated = cand.malformed = False
        cand.text, cand.calls = TextStream(self.plan.stop_sequences), None
        cand.base, cand.rules = cand.retry, self.plan.retry_rules
        cand.code = CodeReader() if cand.code is not None else None
        cand.prompt, cand.written = retry.prompt, []
        cand.chosen, cand.top, cand.logprob_sum = [], [], 0.0
        cand.held = ([], [])
        return True

    def _parts(self, cand: _Candidate, text: str, final: bool) -> list[Part]:
        found: list[OutputPart]
        if cand.calls is None:
            found = [TextPart(text)] if text else []
        else:
            found = cand.calls.push(text)
            if final:
                found += cand.calls.finish()
        parts = []
        for item in found:
            if isinstance(item, TextPart):
                parts += self._prose_and_code(cand, item.text)
                continue
            parts += self._held_prose(cand)  # text held back before a call goes out before it
            if isinstance(item, CallPart):
                if call_key(item.name, item.args) in self.plan.answered:
                    cand.repeated = True
                    continue
                parts.append(Part(function_call=FunctionCall(name=item.name, args=item.args)))
            elif isinstance(item, MalformedCall):
                cand.malformed = True
        if final:
            parts += self._held_prose(cand)
        cand.emitted = cand.emitted or bool(parts)
        return parts

    def _prose_and_code(self, cand: _Candidate, text: str) -> list[Part]:
        """Text as text parts, and a finished python block as an executableCode part, to be run."""
        if cand.code is None:
            return [Part(text=text)] if text else []
        parts = []
        for item in cand.code.push(text):
            if isinstance(item, Code) and len(cand.ran) < MAX_ROUNDS and item.code not in cand.ran:
                parts.append(Part(executable_code=ExecutableCode(language="PYTHON", code=item.code)))
                cand.to_run = item.code
            elif isinstance(item, Code | Forged):
                # The candidate ends here, without this block: past the rounds a request may run, running the
                # same code again (small models repeat a failing block word for word), or writing the output
                # of code itself (it would be made up).
                cand.cut = True
            else:
                parts.append(Part(text=item.text))
        return parts

    def _held_prose(self, cand: _Candidate) -> list[Part]:
        if cand.code is None:
            return []
        return [Part(text=item.text) for item in cand.code.finish()]

    async def _run(self, cand: _Candidate, code: str) -> Ran:
        """Runs the code; the continuation's prompt is the attempt's own tokens plus the output block."""
        assert self.plan.sandbox is not None
        try:
            execution = await self.plan.sandbox.run(code)
        except SandboxUnavailable as exc:
            raise ApiError("UNAVAILABLE", f"The code the model wrote could not be run: {exc}") from None
        cand.ran.append(code)
        engine = self.plan.model.engine
        written = b"".join(engine.token_bytes(t) for t in cand.written).decode("utf-8", errors="replace")
        block = output_block(execution.output) if written.endswith("\n") else "\n" + output_block(execution.output)
        fed = await asyncio.to_thread(engine.tokenize, block, add_bos=False, parse_special=False)
        prompt = (*cand.prompt, *cand.written, *fed)
        cand.tool_tokens += len(fed)
        request = cand.base
        assert request is not None
        budget = self.plan.candidates[cand.index].max_new_tokens  # the whole answer's, over all attempts
        left = min(budget - cand.tokens, self.plan.model.input_token_limit - len(prompt))
        if left <= 0:
            return Ran(execution, None)
        constraint = None
        if cand.rules is not None:
            constraint = await asyncio.to_thread(engine.compile_grammar, cand.rules)
        cand.prompt, cand.written = prompt, []
        if cand.code is not None:
            cand.code.reopen()
        cand.text = TextStream(self.plan.stop_sequences)
        if cand.calls is not None:  # the grammar starts afresh, and may allow a call written as bare JSON again
            cand.calls = CallReader(self.plan.bare_calls)
        return Ran(execution, replace(request, prompt=prompt, max_new_tokens=left, constraint=constraint))

    def _ran(self, cand: _Candidate, ran: Ran) -> Delta | None:
        if cand.finish is not None:  # it ended meanwhile (blocked for safety)
            return None
        execution = ran.execution
        parts = [Part(code_execution_result=CodeExecutionResult(outcome=execution.outcome,
                                                                output=execution.output or None))]
        parts += [Part(inline_data=Blob(mime_type="image/png", data=base64.b64encode(png).decode("ascii")))
                  for png in execution.figures]
        finish = None
        if ran.request is None:
            cand.finish = finish = "MAX_TOKENS"
        return Delta(cand.index, parts, [], [], finish)

    def _logprob_candidate(self, token: int, logprob: float) -> LogprobsCandidate:
        piece = self.plan.model.engine.token_bytes(token).decode("utf-8", errors="replace")
        return LogprobsCandidate(token=piece, token_id=token, log_probability=logprob)

    def usage(self) -> UsageMetadata:
        prompt, generated = self.prompt_token_count, self.candidates_token_count
        cached = max(self.plan.cached_tokens, self.reused_tokens)  # a named cache, or a recent prefix reused
        tool = self.tool_use_token_count
        details = [ModalityTokenCount(modality=m, token_count=n) for m, n in self.plan.prompt_details]
        return UsageMetadata(prompt_token_count=prompt, cached_content_token_count=cached or None,
                             candidates_token_count=generated, tool_use_prompt_token_count=tool or None,
                             total_token_count=prompt + generated + tool, prompt_tokens_details=details or None)

    def response(self, candidates: list[Candidate], feedback: PromptFeedback | None = None) -> dict[str, Any]:
        return GenerateContentResponse(candidates=candidates, prompt_feedback=feedback, usage_metadata=self.usage(),
                                       model_version=self.plan.version, response_id=self.response_id).to_wire()

    def blocked_prompt(self, ratings: tuple[SafetyRating, ...]) -> dict[str, Any]:
        """The answer to a prompt its safety settings block: its ratings, and no candidates."""
        prompt = self.prompt_token_count
        usage = UsageMetadata(prompt_token_count=prompt, total_token_count=prompt,
                              prompt_tokens_details=self.usage().prompt_tokens_details)
        feedback = PromptFeedback(block_reason="SAFETY", safety_ratings=list(ratings))
        return GenerateContentResponse(prompt_feedback=feedback, usage_metadata=usage, model_version=self.plan.version,
                                       response_id=self.response_id).to_wire()

    async def guarded(self, guard: Guard) -> AsyncGenerator[Delta, None]:
        """`deltas()`, each candidate rated as it is written (service/safety.py): with a policy that can block,
        held back in windows of WINDOW_TOKENS tokens (the first FIRST_WINDOW_TOKENS) until rated, and a window
        that holds code rated before the code runs; a window rated above a threshold ends its candidate with
        SAFETY, unsent. With one that cannot, released at once, and rated whole at the end. A candidate's
        ratings are the highest of its windows'."""
        blocks = guard.policy.blocks
        self._gated = blocks
        held: dict[int, Delta] = {}
        written = ["" for _ in self.candidates]  # each candidate's text so far, sent or held
        sent_chars = [0 for _ in self.candidates]
        rated_at = [0 for _ in self.candidates]  # tokens written when the candidate was last rated
        seen: list[dict[str, float]] = [{} for _ in self.candidates]  # highest probabilities so far
        blocked: set[int] = set()
        async with contextlib.aclosing(self.deltas()) as deltas:
            async for delta in deltas:
                i = delta.index
                if i in blocked:
                    continue
                cand = self.candidates[i]
                written[i] += parts_text(delta.parts)
                held[i] = _merge(held[i], delta) if i in held else delta
                code = any(part.executable_code is not None for part in delta.parts)
                window = WINDOW_TOKENS if rated_at[i] else FIRST_WINDOW_TOKENS
                if delta.finish is None and not (blocks and code) and (
                        not blocks or cand.tokens - rated_at[i] < window):
                    if blocks:
                        continue
                    yield held.pop(i)
                    continue
                rated_at[i] = cand.tokens
                start = 0 if not blocks else max(0, sent_chars[i] - CONTEXT_CHARS)
                seen[i] = highest(seen[i], await guard.probabilities([written[i][start:]]))
                verdict = guard.judge(seen[i])
                pending = held.pop(i, None)
                if verdict.blocked:
                    blocked.add(i)
                    cand.finish = "SAFETY"  # its engine sequence is cancelled at its next event
                    self._clear(i)  # code waiting to run sees the finish, and does not run
                    yield Delta(i, [], [], [], "SAFETY", verdict.ratings)
                    continue
                if code:
                    self._clear(i)
                sent_chars[i] = len(written[i])
                yield replace(pending or Delta(i, [], [], [], None), ratings=verdict.ratings)

    def _clear(self, index: int) -> None:
        self._cleared.setdefault(index, asyncio.Event()).set()


def candidate(index: int, parts: list[Part], finish: str | None, tokens: int | None = None,
              logprobs: tuple[list[LogprobsCandidate], list[TopCandidates], float] | None = None,
              ratings: tuple[SafetyRating, ...] | None = None) -> Candidate:
    result = None
    avg = None
    if logprobs is not None:
        chosen, top, avg = logprobs
        result = LogprobsResult(chosen_candidates=chosen, top_candidates=top or None)
    # A chunk with nothing new (the last one of a stream, say) still carries a content with one empty text; a
    # candidate blocked for safety carries none.
    content = None if finish == "SAFETY" and not parts else Content(role="model", parts=parts or [Part(text="")])
    return Candidate(content=content, finish_reason=finish, index=index, token_count=tokens, avg_logprobs=avg,
                     logprobs_result=result, safety_ratings=list(ratings) if ratings is not None else None)


def _deltas(generation: Generation) -> AsyncGenerator[Delta, None]:
    guard = generation.plan.safety
    return generation.deltas() if guard is None else generation.guarded(guard)


async def generate(plan: GenerationPlan) -> dict[str, Any]:
    """The whole response at once (generateContent)."""
    generation = Generation(plan)
    feedback = None
    if plan.safety is not None:
        verdict = await plan.safety.rate_prompt()
        if verdict.blocked:
            return generation.blocked_prompt(verdict.ratings)
        feedback = PromptFeedback(safety_ratings=list(verdict.ratings))
    parts: list[list[Part]] = [[] for _ in plan.candidates]
    ratings: list[tuple[SafetyRating, ...] | None] = [None for _ in plan.candidates]
    async with contextlib.aclosing(_deltas(generation)) as deltas:  # closed at once when the client leaves
        async for delta in deltas:
            parts[delta.index] = join_parts(parts[delta.index] + delta.parts)
            ratings[delta.index] = delta.ratings or ratings[delta.index]
            if delta.finish == "SAFETY":
                parts[delta.index] = []  # none of a blocked candidate's content is returned
    candidates = []
    for cand in generation.candidates:
        logprobs = None
        if plan.logprobs is not None and cand.finish != "SAFETY":
            avg = cand.logprob_sum / len(cand.chosen) if cand.chosen else 0.0
            logprobs = (cand.chosen, cand.top, avg)
        candidates.append(candidate(cand.index, parts[cand.index], cand.finish, cand.tokens, logprobs,
                                    ratings[cand.index]))
    return generation.response(candidates, feedback)


async def stream(plan: GenerationPlan) -> AsyncIterator[dict[str, Any]]:
    """One GenerateContentResponse per delta (streamGenerateContent); the last ones carry finishReason. The
    first carries the prompt's safety ratings, when it is rated; a blocked prompt's answer is one response."""
    generation = Generation(plan)
    feedback = None
    if plan.safety is not None:
        verdict = await plan.safety.rate_prompt()
        if verdict.blocked:
            yield generation.blocked_prompt(verdict.ratings)
            return
        feedback = PromptFeedback(safety_ratings=list(verdict.ratings))
    # Closed with this generator, not left to the collector: its tasks hold the engine's sequences.
    async with contextlib.aclosing(_deltas(generation)) as deltas:
        async for delta in deltas:
            cand = generation.candidates[delta.index]
            logprobs = None
            if delta.chosen:
                avg = sum(c.log_probability for c in delta.chosen) / len(delta.chosen)
                logprobs = (delta.chosen, delta.top, avg)
            tokens = cand.tokens if delta.finish is not None else None
            yield generation.response([candidate(delta.index, delta.parts, delta.finish, tokens, logprobs,
                                                 delta.ratings)], feedback)
            feedback = None
