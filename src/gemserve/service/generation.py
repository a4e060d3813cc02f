"""Running a generation plan and shaping what the engine gives back into GenerateContentResponse JSON.

Each candidate is one engine sequence. Their events are merged as they come; each candidate's tokens pass
through its own `TextStream` (UTF-8 reassembly, stop sequences). A stop sequence ends only its candidate: the
iterator of that sequence is closed, which cancels it in the engine. Leaving `stream` early (the client went
away) closes every candidate's iterator, so no generation outlives its request.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from gemserve.engine.types import EngineError, Event, FinishEvent, TokenEvent
from gemserve.errors import ApiError
from gemserve.service.requests import GenerationPlan
from gemserve.service.text import TextStream


@dataclass
class _Candidate:
    index: int
    text: TextStream
    tokens: int = 0
    finish: str | None = None
    chosen: list[dict[str, Any]] = field(default_factory=list)
    top: list[dict[str, Any]] = field(default_factory=list)
    logprob_sum: float = 0.0


@dataclass(frozen=True)
class Delta:
    """New output of one candidate: text that became final, log-probabilities, and the finish reason at the end."""

    index: int
    text: str
    chosen: list[dict[str, Any]]
    top: list[dict[str, Any]]
    finish: str | None


def _merge(first: Delta, then: Delta) -> Delta:
    return Delta(first.index, first.text + then.text, first.chosen + then.chosen, first.top + then.top,
                 then.finish or first.finish)


class Generation:
    """One generateContent call in flight: `deltas()` yields candidate outputs as they become final."""

    def __init__(self, plan: GenerationPlan) -> None:
        self.plan = plan
        self.response_id = secrets.token_urlsafe(16)
        self.candidates = [_Candidate(i, TextStream(plan.stop_sequences)) for i in range(len(plan.candidates))]

    @property
    def prompt_token_count(self) -> int:
        return len(self.plan.prompt)

    @property
    def candidates_token_count(self) -> int:
        return sum(c.tokens for c in self.candidates)

    async def deltas(self) -> AsyncIterator[Delta]:
        engine = self.plan.model.engine
        streams = [engine.generate(request) for request in self.plan.candidates]
        queue: asyncio.Queue[tuple[int, Event | BaseException | None]] = asyncio.Queue()

        async def pump(index: int, events: AsyncIterator[Event]) -> None:
            try:
                async for event in events:
                    await queue.put((index, event))
                    if self.candidates[index].finish is not None:
                        break  # a stop sequence ended it: leaving the loop closes (cancels) the sequence
            except Exception as exc:  # delivered to the consumer, which raises it
                await queue.put((index, exc))
            finally:
                await events.aclose()  # type: ignore[attr-defined]
                await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            live = len(tasks)
            while live:
                # Whatever else has arrived meanwhile goes out with it: a client that reads slower than the
                # model writes gets fewer, larger chunks instead of falling behind.
                arrived = [await queue.get()]
                while not queue.empty():
                    arrived.append(queue.get_nowait())
                merged: dict[int, Delta] = {}
                for index, event in arrived:
                    if event is None:
                        live -= 1
                        continue
                    if isinstance(event, EngineError):
                        raise ApiError("UNAVAILABLE", f"The model could not finish this request: {event}") from event
                    if isinstance(event, BaseException):
                        raise event
                    delta = self._apply(self.candidates[index], event)
                    if delta is not None:
                        merged[index] = _merge(merged[index], delta) if index in merged else delta
                for delta in merged.values():
                    yield delta
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _apply(self, cand: _Candidate, event: Event) -> Delta | None:
        if cand.finish is not None:
            return None
        if isinstance(event, FinishEvent):
            cand.finish = event.reason
            return Delta(cand.index, cand.text.flush(), [], [], cand.finish)
        assert isinstance(event, TokenEvent)
        cand.tokens += 1
        chosen: list[dict[str, Any]] = []
        top: list[dict[str, Any]] = []
        if self.plan.logprobs is not None and event.logprob is not None:
            chosen = [self._logprob_candidate(event.token, event.logprob)]
            cand.logprob_sum += event.logprob
            if self.plan.logprobs > 0:
                top = [{"candidates": [self._logprob_candidate(t, lp) for t, lp in event.top]}]
            cand.chosen.extend(chosen)
            cand.top.extend(top)
        text = cand.text.push(self.plan.model.engine.token_bytes(event.token))
        if cand.text.stopped:
            cand.finish = "STOP"
            return Delta(cand.index, text, chosen, top, "STOP")
        if not text and not chosen:
            return None
        return Delta(cand.index, text, chosen, top, None)

    def _logprob_candidate(self, token: int, logprob: float) -> dict[str, Any]:
        piece = self.plan.model.engine.token_bytes(token).decode("utf-8", errors="replace")
        return {"token": piece, "tokenId": token, "logProbability": logprob}

    def usage(self) -> dict[str, int]:
        prompt, generated = self.prompt_token_count, self.candidates_token_count
        return {"promptTokenCount": prompt, "candidatesTokenCount": generated, "totalTokenCount": prompt + generated}

    def response(self, candidates: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "candidates": candidates,
            "usageMetadata": self.usage(),
            "modelVersion": self.plan.version,
            "responseId": self.response_id,
        }


def candidate_json(index: int, text: str, finish: str | None, tokens: int | None = None,
                   logprobs: tuple[list[dict[str, Any]], list[dict[str, Any]], float] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
    if finish is not None:
        out["finishReason"] = finish
    out["index"] = index
    if tokens is not None:
        out["tokenCount"] = tokens
    if logprobs is not None:
        chosen, top, avg = logprobs
        out["avgLogprobs"] = avg
        result: dict[str, Any] = {"chosenCandidates": chosen}
        if top:
            result["topCandidates"] = top
        out["logprobsResult"] = result
    return out


async def generate(plan: GenerationPlan) -> dict[str, Any]:
    """The whole response at once (generateContent)."""
    generation = Generation(plan)
    texts = [""] * len(plan.candidates)
    async for delta in generation.deltas():
        texts[delta.index] += delta.text
    candidates = []
    for cand in generation.candidates:
        logprobs = None
        if plan.logprobs is not None:
            avg = cand.logprob_sum / len(cand.chosen) if cand.chosen else 0.0
            logprobs = (cand.chosen, cand.top, avg)
        candidates.append(candidate_json(cand.index, texts[cand.index], cand.finish, cand.tokens, logprobs))
    return generation.response(candidates)


async def stream(plan: GenerationPlan) -> AsyncIterator[dict[str, Any]]:
    """One GenerateContentResponse per delta (streamGenerateContent); the last ones carry finishReason."""
    generation = Generation(plan)
    async for delta in generation.deltas():
        cand = generation.candidates[delta.index]
        logprobs = None
        if delta.chosen:
            avg = sum(c["logProbability"] for c in delta.chosen) / len(delta.chosen)
            logprobs = (delta.chosen, delta.top, avg)
        tokens = cand.tokens if delta.finish is not None else None
        yield generation.response([candidate_json(delta.index, delta.text, delta.finish, tokens, logprobs)])
