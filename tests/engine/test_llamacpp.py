"""The llama.cpp engine on the real default model: batching, cancellation and log-probabilities."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest

from gemserve.engine.backends import llamacpp as llamacpp_engine
from gemserve.engine.backends.llamacpp import LlamaCppEngine
from gemserve.engine.constraints import Constraint
from gemserve.engine.drafting import DraftCosts, Drafter
from gemserve.engine.lookup import PassCosts
from gemserve.engine.sampling import log_softmax
from gemserve.engine.types import EngineBusy, EngineError, FinishEvent, GenerationRequest, SamplingParams, TokenEvent

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def engine(default_gguf: Path) -> Iterator[LlamaCppEngine]:
    eng = LlamaCppEngine(default_gguf, context_size=4096, max_sequences=4, threads=2)
    yield eng
    eng.close()


def request(engine: LlamaCppEngine, text: str, n: int, params: SamplingParams = GREEDY) -> GenerationRequest:
    return GenerationRequest(tuple(engine.tokenize(text, add_bos=True, parse_special=False)), params, n)


async def run(engine: LlamaCppEngine, req: GenerationRequest) -> tuple[list[TokenEvent], str]:
    tokens: list[TokenEvent] = []
    async for event in engine.generate(req):
        if isinstance(event, TokenEvent):
            tokens.append(event)
        else:
            assert isinstance(event, FinishEvent)
            return tokens, event.reason
    raise AssertionError("no finish event")


def test_max_new_tokens_ends_with_max_tokens(engine: LlamaCppEngine) -> None:
    tokens, reason = asyncio.run(run(engine, request(engine, "The history of Rome", 7)))
    assert reason == "MAX_TOKENS"
    assert len(tokens) == 7


def test_concurrent_sequences_score_exactly_like_sequences_alone(engine: LlamaCppEngine, default_gguf: Path) -> None:
    """Batched decoding must not mix sequences up, nor change what a sequence gets: its tokens and log-probabilities
    are the same bits decoded alone (where prompt lookup also feeds proposals), beside three others, or alone for
    its first tokens until the others join, since every product and the attention give a token the same result in
    any pass (`_attention.h`). Also on an engine whose cache has a history (earlier requests
    kept and dropped), where llama.cpp puts a sequence's later tokens in holes before its earlier ones: CI once saw
    log-probabilities 0.06 apart there, when the attention summed cells in cache order."""
    prompts = ["The history of Rome", "Once upon a time", "def fibonacci(n):", "The weather today"]
    params = SamplingParams(temperature=0.0, logprobs=2)

    def scores(tokens: list[TokenEvent]) -> list[tuple[int, float | None, Any]]:
        return [(t.token, t.logprob, t.top) for t in tokens]

    async def alone(engine: LlamaCppEngine) -> list[list[TokenEvent]]:
        return [(await run(engine, request(engine, p, 24, params)))[0] for p in prompts]

    async def together(engine: LlamaCppEngine) -> list[list[TokenEvent]]:
        results = await asyncio.gather(*(run(engine, request(engine, p, 24, params)) for p in prompts))
        return [tokens for tokens, _ in results]

    async def joining_after_the_first_token(engine: LlamaCppEngine) -> list[list[TokenEvent]]:
        first: list[TokenEvent] = []
        started = asyncio.Event()

        async def leader() -> None:
            async for event in engine.generate(request(engine, prompts[0], 24, params)):
                if isinstance(event, TokenEvent):
                    first.append(event)
                started.set()

        task = asyncio.create_task(leader())
        await started.wait()
        rest = await asyncio.gather(*(run(engine, request(engine, p, 24, params)) for p in prompts[1:]))
        await task
        return [first, *(tokens for tokens, _ in rest)]

    fresh = LlamaCppEngine(default_gguf, context_size=4096, max_sequences=4, threads=2)
    try:
        expected = [scores(tokens) for tokens in asyncio.run(alone(fresh))]
    finally:
        fresh.close()
    assert all(len(tokens) == 24 for tokens in expected)
    for runs in (alone, together, joining_after_the_first_token):  # on the module's engine, after other requests
        assert [scores(tokens) for tokens in asyncio.run(runs(engine))] == expected, runs.__name__


def test_greedy_output_is_the_same_with_and_without_prompt_lookup_after_a_long_prompt(default_gguf: Path) -> None:
    """Past 512 cached tokens, where llama.cpp's attention would round a lone token otherwise than a pass of
    several: proposals fed (passes of up to 9 tokens) change neither tokens nor log-probabilities."""
    text = ("Here is a list of the planets of the solar system with one fact about each, repeated for study. "
            + 12 * ("Mercury is the closest to the Sun. Venus is the hottest. Earth has liquid water. Mars is red. "
                   "Jupiter is the largest. Saturn has bright rings. Uranus rolls on its side. Neptune is windy. ")
            + "Now the list once more: Mercury is")
    params = SamplingParams(temperature=0.0, logprobs=1)
    answers = []
    for lookup in (False, True):
        engine = LlamaCppEngine(default_gguf, context_size=2048, max_sequences=2, threads=2, lookup=lookup,
                                pass_costs=PassCosts.guessed(0.1))
        try:
            req = request(engine, text, 64, params)
            assert len(req.prompt) > 512
            tokens, _ = asyncio.run(run(engine, req))
            answers.append([(t.token, t.logprob, t.top) for t in tokens])
            if lookup:
                assert engine.accepted_tokens > 10 and engine.proposed_tokens > engine.accepted_tokens
        finally:
            engine.close()
    assert answers[0] == answers[1]


def test_closing_the_stream_cancels_and_frees_the_slot(engine: LlamaCppEngine) -> None:
    async def scenario() -> None:
        # More abandoned generations than slots: each must give its slot back or the last one would hang.
        for _ in range(6):
            stream = engine.generate(request(engine, "Count to a thousand:", 4000))
            async for _event in stream:
                break
            await stream.aclose()
        tokens, reason = await asyncio.wait_for(run(engine, request(engine, "Hello", 3)), timeout=60)
        assert reason == "MAX_TOKENS" and len(tokens) == 3

    asyncio.run(scenario())


def test_logprobs_match_the_models_own_scores(engine: LlamaCppEngine, default_gguf: Path) -> None:
    req = request(engine, "The capital of France is", 6, SamplingParams(temperature=0.0, logprobs=3))
    tokens, _ = asyncio.run(run(engine, req))
    reference = llama_cpp.Llama(str(default_gguf), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    try:
        sequence = list(req.prompt) + [t.token for t in tokens]
        reference.eval(sequence)
        scores = np.array(reference.scores[: len(sequence)])
    finally:
        reference.close()
    # The reference scores the whole sequence in one batch, the engine token by token: quantized kernels
    # round differently for the two shapes, so agreement is within that noise (see the batching test).
    gaps = []
    for step, event in enumerate(tokens):
        expected = log_softmax(scores[len(req.prompt) - 1 + step])
        gaps.append(abs(event.logprob - float(expected[event.token])))
        assert [t for t, _ in event.top][0] == event.token
        assert [lp for _, lp in event.top] == sorted((lp for _, lp in event.top), reverse=True)
        assert event.token in np.argsort(-expected)[:3]
    assert max(gaps) < 0.5 and sum(gaps) / len(gaps) < 0.15


def test_seeded_sampling_reproduces(engine: LlamaCppEngine) -> None:
    params = SamplingParams(temperature=1.0, top_k=64, top_p=0.95, seed=1234)
    first, _ = asyncio.run(run(engine, request(engine, "My favourite animal is", 20, params)))
    second, _ = asyncio.run(run(engine, request(engine, "My favourite animal is", 20, params)))
    assert [t.token for t in first] == [t.token for t in second]


def test_a_seeded_request_gives_the_same_tokens_and_logprobs_alone_repeated_and_beside_others(
        engine: LlamaCppEngine) -> None:
    """A seeded sequence runs in a context of its own: neither a kept prefix, nor the batch, nor where other
    sequences sit in the shared cache changes its numbers (issue 9)."""
    seeded = SamplingParams(temperature=1.0, seed=4, logprobs=0)
    prompt = "Tell me about your favourite city, and why you would like to live there one day."
    others = ["Once upon a time there was", "def fibonacci(n):", "List three fruits:"]

    def scores(tokens: list[TokenEvent]) -> list[tuple[int, float | None]]:
        return [(t.token, t.logprob) for t in tokens]

    first = scores(asyncio.run(run(engine, request(engine, prompt, 16, seeded)))[0])
    reused_before = engine.reused_tokens
    for _ in range(2):  # a kept cache of the same prompt is there now
        assert scores(asyncio.run(run(engine, request(engine, prompt, 16, seeded)))[0]) == first
    assert engine.reused_tokens == reused_before

    async def together() -> list[TokenEvent]:
        results = await asyncio.gather(run(engine, request(engine, prompt, 16, seeded)),
                                       *(run(engine, request(engine, o, 40, SamplingParams(temperature=0.8)))
                                         for o in others))
        return results[0][0]

    async def joining_late() -> list[TokenEvent]:
        async def late() -> list[TokenEvent]:
            await asyncio.sleep(0.3)  # the others are decoding by now
            return (await run(engine, request(engine, prompt, 16, seeded)))[0]

        results = await asyncio.gather(late(), *(run(engine, request(engine, o * 3, 60, SamplingParams(
            temperature=0.8))) for o in others))
        return results[0]

    assert scores(asyncio.run(together())) == first
    assert scores(asyncio.run(joining_late())) == first
    longer = scores(asyncio.run(run(engine, request(engine, prompt, 240, seeded)))[0])
    assert longer[:16] == first  # a context of 512 cells instead of 256 changes nothing


def test_a_conversation_reuses_its_cached_prefix(engine: LlamaCppEngine, default_gguf: Path) -> None:
    first = request(engine, "The history of Rome begins with a small settlement on the Tiber", 8)
    tokens, _ = asyncio.run(run(engine, first))
    before = engine.reused_tokens
    follow_up = list(first.prompt) + [t.token for t in tokens] + engine.tokenize(" and then", add_bos=False,
                                                                                  parse_special=False)
    params = SamplingParams(temperature=0.0, logprobs=1)
    second, _ = asyncio.run(run(engine, GenerationRequest(tuple(follow_up), params, 6)))
    assert engine.reused_tokens - before >= len(first.prompt)
    # What the reused cache gives must be what the model gives on the whole sequence.
    reference = llama_cpp.Llama(str(default_gguf), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    try:
        sequence = follow_up + [t.token for t in second]
        reference.eval(sequence)
        scores = np.array(reference.scores[: len(sequence)])
    finally:
        reference.close()
    gaps = [abs(t.logprob - float(log_softmax(scores[len(follow_up) - 1 + i])[t.token])) for i, t in enumerate(second)]
    assert max(gaps) < 0.5 and sum(gaps) / len(gaps) < 0.15


def test_kept_caches_beyond_the_most_recent_stay_within_their_budget(default_gguf: Path) -> None:
    """Kept caches slow every later prompt: only the latest finished sequence is kept whatever its length, older
    ones within the budget. With a budget of 24 tokens, two earlier 20-token prompts cannot both stay."""
    engine = LlamaCppEngine(default_gguf, context_size=1024, max_sequences=2, threads=2, kept_tokens=24)
    try:
        texts = [f"Story number {n}: once upon a time in a faraway kingdom there lived a" for n in range(3)]
        firsts = [request(engine, text, 2) for text in texts]
        for req in firsts:
            asyncio.run(run(engine, req))
        reused = []
        for req in reversed(firsts):  # the newest first, so that asking does not itself evict the others
            before = engine.reused_tokens
            asyncio.run(run(engine, GenerationRequest(req.prompt, GREEDY, 1)))
            reused.append(engine.reused_tokens - before)
        assert reused[0] >= len(firsts[2].prompt) - 1  # the most recent is always kept
        assert reused[1] >= len(firsts[1].prompt) - 1  # 20 tokens fit the 24-token budget
        assert reused[2] == 0  # a third did not
    finally:
        engine.close()


def test_a_full_cache_makes_the_latest_request_wait_and_ends_none(default_gguf: Path) -> None:
    """Two long prompts and three short ones on a cache that cannot hold them all at once: every request
    completes (the latest ones wait for room), none is ended with an error."""
    eng = LlamaCppEngine(default_gguf, context_size=1024, max_sequences=5, threads=2)
    long_text = "The history of the Roman empire is long and full of wars, emperors and roads. " * 26

    async def all_of_them() -> list[tuple[list[TokenEvent], str]]:
        longs = [run(eng, request(eng, long_text + f" Part {i}.", 60)) for i in range(2)]
        shorts = [run(eng, request(eng, f"Question {i}: what is the capital of France?", 40)) for i in range(3)]
        return await asyncio.gather(*longs, *shorts)

    try:
        assert len(eng.tokenize(long_text, add_bos=True, parse_special=False)) > 400
        results = asyncio.run(all_of_them())  # an error would raise here
        for (tokens, reason), wanted in zip(results, [60, 60, 40, 40, 40], strict=True):
            assert reason == "STOP" or (reason == "MAX_TOKENS" and len(tokens) == wanted)
    finally:
        eng.close()


def test_a_request_alone_that_cannot_fit_the_cache_ends_with_an_error(default_gguf: Path) -> None:
    eng = LlamaCppEngine(default_gguf, context_size=256, max_sequences=2, threads=2)
    try:
        with pytest.raises(EngineError, match="more context memory"):
            asyncio.run(run(eng, request(eng, "word " * 200, 200)))
    finally:
        eng.close()


def test_too_many_waiting_requests_are_refused_as_busy() -> None:
    from gemserve.engine.sequences import Inbox

    inbox: Inbox[Any] = Inbox(max_waiting=2)

    class Fake:
        cancelled = False

    async def queue_three() -> None:
        streams = [inbox.stream(lambda loop, queue: Fake()) for _ in range(3)]  # type: ignore[arg-type,return-value]
        for stream in streams[:2]:
            task = asyncio.ensure_future(stream.__anext__())
            await asyncio.sleep(0)
            task.cancel()
        with pytest.raises(EngineBusy, match="2 requests are already waiting"):
            await streams[2].__anext__()

    asyncio.run(queue_three())


def test_a_pinned_prefix_is_shared_saved_and_read_back(default_gguf: Path, tmp_path: Path) -> None:
    """Requests that begin with a pinned prefix start from it (several at once), and a new engine reads the
    prefix back from its saved state instead of computing it."""
    saved = tmp_path / "doc.kvstate"
    eng = LlamaCppEngine(default_gguf, context_size=2048, max_sequences=4, threads=2)
    try:
        prefix = tuple(eng.tokenize("A long document about Roman roads and aqueducts. " * 20, add_bos=True,
                                    parse_special=False))
        eng.pin("doc", prefix, saved=saved)

        async def ask(question: str) -> int:
            prompt = prefix + tuple(eng.tokenize(question, add_bos=False, parse_special=False))
            async for event in eng.generate(GenerationRequest(prompt, GREEDY, 4)):
                if isinstance(event, FinishEvent):
                    return event.cached_tokens
            raise AssertionError("no finish event")

        assert asyncio.run(ask(" First question?")) == 0  # computes the prefix, and pins it
        assert saved.is_file()

        async def together() -> list[int]:
            return list(await asyncio.gather(*(ask(f" Question {i}?") for i in range(3))))

        assert asyncio.run(together()) == [len(prefix)] * 3
    finally:
        eng.close()
    again = LlamaCppEngine(default_gguf, context_size=2048, max_sequences=4, threads=2)
    try:
        again.pin("doc", prefix, saved=saved)
        tokens = prefix + tuple(again.tokenize(" After a restart?", add_bos=False, parse_special=False))

        async def after_restart() -> int:
            async for event in again.generate(GenerationRequest(tokens, GREEDY, 4)):
                if isinstance(event, FinishEvent):
                    return event.cached_tokens
            raise AssertionError("no finish event")

        assert asyncio.run(after_restart()) == len(prefix)
    finally:
        again.close()


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(default_gguf: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    eng = LlamaCppEngine(default_gguf, context_size=1024, max_sequences=2, threads=2)
    try:
        expected, _ = asyncio.run(run(eng, request(eng, "The history of Rome", 5)))
        real_step = eng._step
        failures = iter([True])

        def failing_step() -> None:
            if next(failures, False):
                raise RuntimeError("llama_decode returned -3")
            real_step()

        monkeypatch.setattr(eng, "_step", failing_step)
        with pytest.raises(EngineError, match="stopped while serving"):
            asyncio.run(run(eng, request(eng, "A request in the failed step", 5)))
        # Afresh: an empty cache, the same answer as before.
        again, reason = asyncio.run(run(eng, request(eng, "The history of Rome", 5)))
        assert reason == "MAX_TOKENS" and [t.token for t in again] == [t.token for t in expected]

        def always_failing() -> None:
            raise RuntimeError("the backend is gone")

        monkeypatch.setattr(eng, "_step", always_failing)
        for _ in range(4):  # three more failures within the window are restarted; the fourth stops it
            with pytest.raises(EngineError):
                asyncio.run(run(eng, request(eng, "x", 2)))
        with pytest.raises(EngineError, match="the engine has stopped"):
            asyncio.run(run(eng, request(eng, "x", 2)))
    finally:
        eng.close()


def test_a_seeded_request_without_room_for_its_context_fails_alone(engine: LlamaCppEngine,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(n_ctx: int, ubatch: int) -> None:
        raise EngineError(f"llama.cpp could not create a context of {n_ctx} tokens")

    monkeypatch.setattr(engine._llm, "solo", no_memory)

    async def scenario() -> None:
        seeded = run(engine, request(engine, "Hello", 4, SamplingParams(temperature=1.0, seed=1)))
        plain = run(engine, request(engine, "Hello", 4))
        failed, served = await asyncio.gather(seeded, plain, return_exceptions=True)
        assert isinstance(failed, EngineError) and "could not create a context" in str(failed)
        assert not isinstance(served, BaseException) and served[1] == "MAX_TOKENS"

    asyncio.run(scenario())


def test_plain_text_keeps_the_vocabularys_whitespace_tokens_and_spells_markup_out(engine: LlamaCppEngine) -> None:
    text = "First paragraph.\n\nSecond one,    indented.\n\n\nThird."
    plain = engine.tokenize(text, add_bos=False, parse_special=False)
    assert plain == engine.tokenize(text, add_bos=False, parse_special=True)  # "\n\n" stays one token
    assert engine.tokenize("\n\n", add_bos=False, parse_special=False) != engine.tokenize("\n", add_bos=False,
                                                                                         parse_special=False) * 2
    turn = engine.tokenize("<end_of_turn>", add_bos=False, parse_special=True)
    assert turn[0] not in engine.tokenize("a <end_of_turn> b", add_bos=False, parse_special=False)


def test_prompt_lookup_keeps_the_greedy_output_and_the_budget(default_gguf: Path) -> None:
    # A pattern with a fork: proposals after "1, 2," are right every other time, whatever rounding decides (a greedy
    # answer that only may repeat, such as the days of the week listed twice, did not repeat on another machine).
    text = "1, 2, 3, 1, 2, 4, 1, 2, 3, 1, 2, 4, 1, 2, 3, 1, 2,"
    plain = LlamaCppEngine(default_gguf, context_size=2048, max_sequences=2, threads=2, lookup=False)
    try:
        expected, reason = asyncio.run(run(plain, request(plain, text, 96)))
    finally:
        plain.close()
    # Proposals fed whatever this machine's passes cost (the engine would otherwise feed only those that pay).
    looking = LlamaCppEngine(default_gguf, context_size=2048, max_sequences=2, threads=2,
                             pass_costs=PassCosts.guessed(0.1))
    try:
        for budget in (96, 37):
            tokens, finish = asyncio.run(run(looking, request(looking, text, budget)))
            assert [t.token for t in tokens] == [t.token for t in expected][:budget]
            assert finish == (reason if budget == 96 else "MAX_TOKENS")
        assert looking.accepted_tokens > 10  # the answer repeats the pattern: proposals were kept
        assert looking.proposed_tokens > looking.accepted_tokens  # and those past the fork were dropped
    finally:
        looking.close()
    # As the server runs it: the engine times passes of each size as it loads and feeds what pays, which a
    # repeating answer does; what it measured stays as it was (the sizes fed do not move with timing).
    measuring = LlamaCppEngine(default_gguf, context_size=2048, max_sequences=2, threads=2)
    try:
        costs = str(measuring._pass_costs)
        assert costs != str(PassCosts.guessed()) and costs.startswith("1:1.00 2:")
        tokens, _ = asyncio.run(run(measuring, request(measuring, text, 96)))
        assert len(tokens) == len(expected)
        assert measuring.accepted_tokens > 10
        assert str(measuring._pass_costs) == costs
    finally:
        measuring.close()


def test_an_engine_whose_batches_are_too_small_to_time_passes_serves_with_guessed_costs(default_gguf: Path) -> None:
    engine = LlamaCppEngine(default_gguf, context_size=2048, max_sequences=2, threads=2, ubatch=8)
    try:
        assert str(engine._pass_costs) == str(PassCosts.guessed())
        tokens, _ = asyncio.run(run(engine, request(engine, "The days of the week are Monday, Tuesday,", 12)))
        assert len(tokens) == 12
    finally:
        engine.close()


def test_proposals_looked_at_but_not_fed_teach_the_acceptance_rate(default_gguf: Path) -> None:
    # Passes cost 1 + 0.8 k here: one proposed token pays only once proposals are right more than 80% of the time,
    # above the rate a sequence starts from (0.5). Only the proposals the engine looks at without feeding them can
    # raise it there, which a text that repeats does, whatever rounding decides near ties (a greedy answer that only
    # may repeat, such as a list of the days of the week, ended differently with the kernels of another pass size).
    text = "1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2,"
    engine = LlamaCppEngine(default_gguf, context_size=2048, max_sequences=2, threads=2,
                            pass_costs=PassCosts.guessed(0.8))
    try:
        asyncio.run(run(engine, request(engine, text, 96)))
        assert engine.proposed_tokens > 0
        assert engine.accepted_tokens > 0
    finally:
        engine.close()


def test_forced_text_is_right_where_the_tokenizer_puts_a_space_before_text(engine: LlamaCppEngine,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Gemma's tokenizer adds no space before the text; make it look like one that does (Llama 2's, Mistral's).
    llm = engine._llm
    plain = llm.tokenize

    def with_space(text: str, *, add_bos: bool, parse_special: bool) -> list[int]:
        return plain(" " + text, add_bos=add_bos, parse_special=parse_special)

    monkeypatch.setattr(llm, "tokenize", with_space)
    constraint = Constraint(llm.grammar_tokenizer(), 'start: "say it"')
    assert b"".join(llm.token_bytes(t) for t in constraint.forced()) == b"say it"


DRAFTS_PAY = DraftCosts(0.3, {n: 0.5 + 0.05 * n for n in range(1, 9)})  # chains pay whatever this machine's costs
PLANETS = {"type": "array", "items": {"type": "object", "properties": {
    "name": {"type": "string"}, "description": {"type": "string"}}, "required": ["name", "description"]}}


JUPITER = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "description": {"type": "string", "maxLength": 60}},
           "required": ["name", "description"], "additionalProperties": False}


def drafting_engines(default_gguf: Path) -> tuple[LlamaCppEngine, LlamaCppEngine]:
    """One engine without drafting, one that drafts wherever it can (no prompt lookup in either: its proposals
    would take the steps a chain could)."""
    plain = LlamaCppEngine(default_gguf, context_size=2048, max_sequences=2, threads=2, lookup=False, drafting=False)
    drafting = LlamaCppEngine(default_gguf, context_size=2048, max_sequences=2, threads=2, lookup=False,
                              draft_costs=DRAFTS_PAY)
    if drafting._llm.drafts is None:  # llama.cpp computes the logits here (no AVX2, a GPU build): no drafting
        plain.close()
        drafting.close()
        pytest.skip("gemserve's output layer does not run on this machine")
    return plain, drafting


def chat(engine: LlamaCppEngine, text: str, n: int, params: SamplingParams = GREEDY,
         schema: dict[str, Any] | None = None) -> GenerationRequest:
    prompt = engine.tokenize(f"<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n", add_bos=True,
                             parse_special=True)
    constraint = None if schema is None else engine.compile_grammar("start: %json " + json.dumps(schema))
    return GenerationRequest(tuple(prompt), params, n, constraint=constraint)


def test_drafted_chains_keep_the_greedy_tokens_and_log_probabilities(default_gguf: Path) -> None:
    """New prose, free and under a JSON schema: what drafting gives is what one token a pass gives, bit for bit
    (its logits are computed from the same hidden states, by the same kernel), and most drafts are kept."""
    plain, drafting = drafting_engines(default_gguf)
    params = SamplingParams(temperature=0.0, logprobs=2)
    ends: list[str] = []
    try:
        for text, schema, n in (("Tell me a story about a dragon who learns to cook.", None, 64),
                                ("Describe the planets of the solar system as JSON.", PLANETS, 64),
                                ("Describe Jupiter as JSON.", JUPITER, 64)):  # the grammar ends within a chain
            expected, reason = asyncio.run(run(plain, chat(plain, text, n, params, schema)))
            got, finish = asyncio.run(run(drafting, chat(drafting, text, n, params, schema)))
            assert [(t.token, t.logprob, t.top) for t in got] == [(t.token, t.logprob, t.top) for t in expected]
            assert finish == reason
            ends.append(reason)
        assert ends[-1] == "STOP"  # the short answer ended before its budget, as without drafts
        assert drafting.drafted_tokens > 40 and drafting.draft_accepted > 0.8 * drafting.drafted_tokens
        assert plain.drafted_tokens == 0
    finally:
        plain.close()
        drafting.close()


def test_wrong_drafts_are_dropped_with_their_cache_and_sampled_tokens_are_drawn_as_without_drafts(
        default_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every other draft is made wrong (under a schema: a token the grammar permits, not the best): the tokens
    after it are computed again, from a cache without the wrong one, and the grammar goes on from the tokens kept.
    Sampled, with the same random stream for both engines, the same tokens come out: each position is drawn once,
    from the same logits, drafted or not."""
    propose = Drafter.propose
    calls = 0

    def sometimes_wrong(self: Drafter, hidden: np.ndarray, constraint: Any, params: SamplingParams,
                        generated: Any) -> int | None:
        nonlocal calls
        calls += 1
        token = propose(self, hidden, constraint, params, generated)
        if token is None or calls % 2:
            return token
        wrong = [t for t in range(token + 1, token + 2000) if constraint is None or constraint.permits(t)]
        return wrong[0] if wrong else token

    monkeypatch.setattr(Drafter, "propose", sometimes_wrong)
    monkeypatch.setattr(llamacpp_engine, "rng_for", lambda seed: np.random.default_rng(1234))
    plain, drafting = drafting_engines(default_gguf)
    try:
        for text, schema, params in (
                ("Describe the planets of the solar system as JSON.", PLANETS, GREEDY),
                ("Tell me a story about a dragon who learns to cook.", None, SamplingParams(temperature=0.8)),
                ("Describe the planets of the solar system as JSON.", PLANETS, SamplingParams(temperature=0.8))):
            expected, _ = asyncio.run(run(plain, chat(plain, text, 48, params, schema)))
            got, _ = asyncio.run(run(drafting, chat(drafting, text, 48, params, schema)))
            assert [t.token for t in got] == [t.token for t in expected]
            assert [t.logprob for t in got] == [t.logprob for t in expected]
        assert drafting.drafted_tokens > drafting.draft_accepted > 0
    finally:
        plain.close()
        drafting.close()
