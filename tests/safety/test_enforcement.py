"""Safety settings enforced, in process: a scripted model and a classifier that rates by keywords, so each test
knows exactly which text is harmful. The real classifiers are scored in benchmarks/safety and driven through
the clients in tests/api/test_safety.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from gemserve.engine.types import EngineBusy, EngineError, Event, GenerationRequest
from gemserve.errors import ApiError
from gemserve.safety.classifiers import JudgeClassifier
from gemserve.safety.policy import safety_policy
from gemserve.schema.content import GenerateContentRequest
from gemserve.schema.wire import parse_model
from gemserve.service import generation
from gemserve.service.requests import base_target, plan_generation
from gemserve.service.safety import WINDOW_TOKENS, Guard, pieces, prompt_turns
from tests.fuzz.test_openapi_fuzz import KEY, scripted_app
from tests.service.scripted import ScriptedEngine, served

ALL = ["HARM_CATEGORY_SEXUALLY_EXPLICIT", "HARM_CATEGORY_HATE_SPEECH", "HARM_CATEGORY_HARASSMENT",
       "HARM_CATEGORY_DANGEROUS_CONTENT", "HARM_CATEGORY_CIVIC_INTEGRITY"]


class KeywordClassifier:
    """"bomb" is dangerous (0.9), "idiot" harassment (0.6: MEDIUM), "meh" harassment (0.3: LOW). With `dilutes`,
    a keyword counts only in a text of at most 100 characters (as a real classifier's rating falls when harmless
    text surrounds a harmful sentence); with `delay`, each rating takes that long."""

    def __init__(self, dilutes: bool = False, delay: float = 0.0, fails: BaseException | None = None) -> None:
        self.texts: list[str] = []
        self.calls = 0
        self.dilutes = dilutes
        self.delay = delay
        self.fails = fails

    async def probabilities(self, texts: Sequence[str]) -> list[dict[str, float]]:
        self.texts += texts
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fails is not None:
            raise self.fails
        return [self._rate(t) if not self.dilutes or len(t) <= 100 else {} for t in texts]

    @staticmethod
    def _rate(t: str) -> dict[str, float]:
        return {"HARM_CATEGORY_DANGEROUS_CONTENT": 0.9 if "bomb" in t else 0.01,
                "HARM_CATEGORY_HARASSMENT": 0.6 if "idiot" in t else 0.3 if "meh" in t else 0.02}


def settings(threshold: str, categories: list[str] = ALL) -> list[dict[str, str]]:
    return [{"category": c, "threshold": threshold} for c in categories]


class PacedEngine(ScriptedEngine):
    """Gives its tokens one at a time, as a real engine does (the scripted one has them all at once)."""

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        async for event in super().generate(request):
            await asyncio.sleep(0.001)
            yield event


def run(script: str | list[str], prompt: str, safety: list[dict[str, Any]] | None, stream: bool = False,
        candidates: int = 1, classifier: KeywordClassifier | None = None, sandbox: Any = None,
        **fields: Any) -> tuple[Any, ScriptedEngine, KeywordClassifier]:
    engine = PacedEngine(script, chat_template=None)
    model = served(engine)
    classifier = classifier or KeywordClassifier()
    body: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": prompt}]}],
                            "generationConfig": {"candidateCount": candidates}, **fields}
    if safety is not None:
        body["safetySettings"] = safety

    async def go() -> Any:
        parsed = parse_model(GenerateContentRequest, body, "GenerateContentRequest")
        plan = await plan_generation(base_target(model), parsed, sandbox=sandbox)
        policy = safety_policy(parsed.safety_settings)
        if policy is not None:
            plan = replace(plan, safety=Guard(classifier, policy, prompt_turns(parsed)))
        if stream:
            return [chunk async for chunk in generation.stream(plan)]
        return await generation.generate(plan)

    return asyncio.run(go()), engine, classifier


def ratings(items: list[dict[str, Any]]) -> dict[str, tuple[str, bool]]:
    return {r["category"]: (r["probability"], r.get("blocked", False)) for r in items}


def test_without_settings_nothing_is_rated_and_nothing_reported() -> None:
    response, engine, classifier = run("Here is a bomb joke.", "Tell me about a bomb", None)
    assert classifier.texts == []
    assert "promptFeedback" not in response
    assert "safetyRatings" not in response["candidates"][0]
    assert response["candidates"][0]["content"]["parts"][0]["text"] == "Here is a bomb joke."


def test_off_skips_rating_and_block_none_rates_without_blocking() -> None:
    response, _, classifier = run("A bomb.", "bomb idiot", settings("OFF"))
    assert classifier.texts == [] and "promptFeedback" not in response
    safety = settings("OFF", ALL[:2]) + settings("BLOCK_NONE", ALL[2:])
    response, _, classifier = run("A bomb, idiot.", "bomb idiot", safety)
    prompt = ratings(response["promptFeedback"]["safetyRatings"])
    assert "blockReason" not in response["promptFeedback"]
    assert prompt == {"HARM_CATEGORY_HARASSMENT": ("MEDIUM", False), "HARM_CATEGORY_DANGEROUS_CONTENT": ("HIGH", False),
                      "HARM_CATEGORY_CIVIC_INTEGRITY": ("NEGLIGIBLE", False)}
    candidate = response["candidates"][0]
    assert candidate["finishReason"] == "STOP"
    assert candidate["content"]["parts"][0]["text"] == "A bomb, idiot."
    assert ratings(candidate["safetyRatings"])["HARM_CATEGORY_DANGEROUS_CONTENT"] == ("HIGH", False)


def test_a_prompt_above_its_threshold_is_blocked_before_generation() -> None:
    response, engine, _ = run("Never written.", "How do I build a bomb?", settings("BLOCK_ONLY_HIGH"))
    assert engine.prompts == []  # nothing was generated
    assert "candidates" not in response
    feedback = response["promptFeedback"]
    assert feedback["blockReason"] == "SAFETY"
    assert ratings(feedback["safetyRatings"])["HARM_CATEGORY_DANGEROUS_CONTENT"] == ("HIGH", True)
    assert ratings(feedback["safetyRatings"])["HARM_CATEGORY_HARASSMENT"] == ("NEGLIGIBLE", False)
    assert [r["category"] for r in feedback["safetyRatings"]] == ALL  # every rated category, Google's order
    usage = response["usageMetadata"]
    assert usage["promptTokenCount"] == usage["totalTokenCount"] > 0 and "candidatesTokenCount" not in usage
    chunks, engine, _ = run("Never written.", "How do I build a bomb?", settings("BLOCK_ONLY_HIGH"), stream=True)
    assert engine.prompts == [] and len(chunks) == 1 and chunks[0]["promptFeedback"]["blockReason"] == "SAFETY"


@pytest.mark.parametrize(("threshold", "blocked"), [("BLOCK_LOW_AND_ABOVE", True), ("BLOCK_MEDIUM_AND_ABOVE", False),
                                                    ("BLOCK_ONLY_HIGH", False), ("BLOCK_NONE", False)])
def test_each_threshold_blocks_from_its_level(threshold: str, blocked: bool) -> None:
    response, _, _ = run("Fine.", "meh", settings(threshold, ["HARM_CATEGORY_HARASSMENT"]))  # rated LOW
    assert ("blockReason" in response["promptFeedback"]) is blocked


def test_a_candidate_that_turns_harmful_stops_and_its_window_is_never_sent() -> None:
    harmless = "Sure, here is some text that is fine to read. " * 2  # more than a window
    script = harmless + "Now the bomb part, written at length so it fills a window........"
    chunks, _, classifier = run(script, "Write something", settings("BLOCK_MEDIUM_AND_ABOVE"), stream=True)
    sent = "".join(p.get("text", "") for c in chunks for cand in c["candidates"]
                   for p in (cand.get("content") or {}).get("parts", []))
    assert "bomb" not in sent
    assert len(sent) >= len(harmless) - WINDOW_TOKENS and script.startswith(sent)  # windows before it went out
    last = chunks[-1]["candidates"][0]
    assert last["finishReason"] == "SAFETY" and "content" not in last
    assert ratings(last["safetyRatings"])["HARM_CATEGORY_DANGEROUS_CONTENT"] == ("HIGH", True)
    assert chunks[0]["promptFeedback"]["safetyRatings"] and "promptFeedback" not in chunks[-1]
    # Held back at most a window: every chunk but the last ends within WINDOW_TOKENS tokens (bytes here).
    assert all(len(c["candidates"][0]["content"]["parts"][0]["text"]) <= 2 * WINDOW_TOKENS for c in chunks[:-1])

    response, _, _ = run(script, "Write something", settings("BLOCK_MEDIUM_AND_ABOVE"))
    candidate = response["candidates"][0]
    assert candidate["finishReason"] == "SAFETY" and "content" not in candidate  # none of it, as at Google
    assert candidate["tokenCount"] < len(script)  # generation stopped at the blocked window


def test_a_harmless_candidate_streams_whole_with_its_ratings() -> None:
    script = "A calm answer about gardening, long enough to take several windows of the stream. " * 3
    chunks, _, _ = run(script, "Tell me about gardens", settings("BLOCK_LOW_AND_ABOVE"), stream=True)
    text = "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks)
    assert text == script
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    assert all("safetyRatings" in c["candidates"][0] for c in chunks)


def test_block_none_output_is_not_held_back_and_is_rated_at_the_end() -> None:
    script = "An idiot of a story, " * 10
    chunks, _, classifier = run(script, "Tell me", settings("BLOCK_NONE"), stream=True)
    assert "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks) == script
    rated = [c for c in chunks if "safetyRatings" in c["candidates"][0]]
    assert rated == [chunks[-1]]
    assert ratings(rated[0]["candidates"][0]["safetyRatings"])["HARM_CATEGORY_HARASSMENT"] == ("MEDIUM", False)
    assert classifier.calls == 2  # the prompt, and the answer once, whole


def test_candidates_are_rated_each_on_their_own() -> None:
    scripts = ["A fine answer.", "A bomb answer, long enough to fill a window of its own.", "Another fine one."]
    response, _, _ = run(scripts, "hello", settings("BLOCK_ONLY_HIGH"), candidates=3)
    assert [c["finishReason"] for c in response["candidates"]] == ["STOP", "SAFETY", "STOP"]
    assert [c["content"]["parts"][0]["text"] for c in response["candidates"] if "content" in c] == [
        "A fine answer.", "Another fine one."]
    assert all(c["safetyRatings"] for c in response["candidates"])


@pytest.mark.parametrize(("safety", "field"), [
    ([{"category": "HARM_CATEGORY_TOXICITY", "threshold": "BLOCK_NONE"}], "safety_settings[0].category"),
    ([{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"},
      {"category": "HARM_CATEGORY_HARASSMENT", "threshold": "OFF"}], "safety_settings[1].category"),
    ([{"category": "HARM_CATEGORY_HARASSMENT"}], "safety_settings[0].threshold"),
    ([{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "HARM_BLOCK_THRESHOLD_UNSPECIFIED"}],
     "safety_settings[0].threshold"),
])
def test_bad_settings_are_a_400_naming_the_field(safety: list[dict[str, str]], field: str) -> None:
    with pytest.raises(ApiError) as caught:
        run("x", "hello", safety)
    assert caught.value.status == "INVALID_ARGUMENT" and field in str(caught.value)


def test_enums_as_numbers_as_google_generativeai_sends_them() -> None:
    policy = safety_policy(parse_model(GenerateContentRequest, {
        "contents": [], "safetySettings": [{"category": 7, "threshold": 1}, {"category": 10, "threshold": 4}]},
        "GenerateContentRequest").safety_settings)
    assert policy is not None
    assert dict(policy.thresholds) == {"HARM_CATEGORY_HARASSMENT": "BLOCK_LOW_AND_ABOVE",
                                       "HARM_CATEGORY_DANGEROUS_CONTENT": "BLOCK_NONE"}


def test_texts_are_rated_in_sentences_and_pairs_of_them_all_of_them() -> None:
    assert pieces("One. Two!\nThree?") == ["One.", "Two!", "Three?", "One. Two!", "Two! Three?"]
    text = " ".join(f"word{i}" for i in range(3000))  # one long sentence: cut at spaces, all of it kept
    cut = pieces(text)
    assert all(len(p) <= 2 * 400 + 1 for p in cut) and cut[0].startswith("word0 ") and "word2999" in cut[-1]
    assert set(" ".join(cut).split()) == set(text.split())


def test_harmless_text_around_a_harmful_sentence_does_not_hide_it() -> None:
    padding = "We talked about my garden and the tomatoes this spring. " * 10
    response, engine, _ = run("x", padding + "How do I build a bomb?", settings("BLOCK_ONLY_HIGH"),
                              classifier=KeywordClassifier(dilutes=True))
    assert response["promptFeedback"]["blockReason"] == "SAFETY" and engine.prompts == []
    script = padding + "Now the bomb part, written at length so it fills a window. " + padding
    chunks, _, _ = run(script, "Write", settings("BLOCK_ONLY_HIGH"), stream=True,
                       classifier=KeywordClassifier(dilutes=True))
    assert chunks[-1]["candidates"][0]["finishReason"] == "SAFETY"
    assert "bomb" not in str(chunks)


def test_output_that_piles_up_while_a_rating_runs_is_rated_whole() -> None:
    # A slow classifier: the model writes far more than a window while each rating runs.
    script = "All fine here. " * 60 + "Then a bomb. " + "All fine here. " * 20
    for stream in (True, False):
        got, _, _ = run(script, "Write", settings("BLOCK_ONLY_HIGH"), stream=stream,
                        classifier=KeywordClassifier(dilutes=True, delay=0.05))
        assert "bomb" not in str(got)
        last = got[-1] if stream else got
        assert last["candidates"][0]["finishReason"] == "SAFETY"


def test_a_candidate_reports_the_highest_rating_of_its_windows() -> None:
    script = "You idiot. " + "Here is a long and calm answer about gardens and tomatoes. " * 6
    for threshold in ("BLOCK_NONE", "BLOCK_ONLY_HIGH"):
        response, _, _ = run(script, "hi", settings(threshold))
        rated = ratings(response["candidates"][0]["safetyRatings"])
        assert rated["HARM_CATEGORY_HARASSMENT"] == ("MEDIUM", False)


def test_code_runs_only_once_its_window_is_rated() -> None:
    from tests.service.test_code_execution import CODE_TOOL, RecordingSandbox

    sandbox = RecordingSandbox()
    block = "Let me run it.\n```python\nprint('bomb')\n```\n"
    response, _, _ = run([block, "Done."], "Run code", settings("BLOCK_ONLY_HIGH"), tools=CODE_TOOL,
                         sandbox=sandbox)
    assert sandbox.codes == []  # rated first, blocked, never run
    assert response["candidates"][0]["finishReason"] == "SAFETY" and "content" not in response["candidates"][0]
    sandbox = RecordingSandbox()
    fine = "Let me run it.\n```python\nprint(6 * 7)\n```\n"
    response, _, _ = run([fine, "It is 42."], "Run code", settings("BLOCK_ONLY_HIGH"), tools=CODE_TOOL,
                         sandbox=sandbox)
    assert sandbox.codes == ["print(6 * 7)"]
    kinds = [next(iter(p)) for p in response["candidates"][0]["content"]["parts"]]
    assert "executableCode" in kinds and "codeExecutionResult" in kinds


@pytest.mark.parametrize(("failure", "status"), [(RuntimeError("model gone"), "UNAVAILABLE"),
                                                 (EngineBusy("queue full"), "RESOURCE_EXHAUSTED")])
def test_a_classifier_that_fails_is_a_clear_error(failure: BaseException, status: str) -> None:
    with pytest.raises(ApiError) as caught:
        run("x", "hello", settings("BLOCK_NONE"), classifier=KeywordClassifier(fails=failure))
    assert caught.value.status == status and "safety classifier" in str(caught.value)


def test_a_judge_that_ends_its_turn_at_once_gives_no_rating_rather_than_a_harmless_one() -> None:
    judge = JudgeClassifier(served(ScriptedEngine("<|im_end|>", chat_template=None)))
    with pytest.raises(EngineError):
        asyncio.run(judge.probabilities(["how to build a bomb"]))


def test_the_server_rates_with_its_classifier(tmp_path: Path) -> None:
    app = scripted_app(tmp_path)
    classifier = KeywordClassifier()

    async def go() -> tuple[httpx.Response, httpx.Response]:
        async with app.router.lifespan_context(app):
            app.state.safety._classifier = classifier
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
                body = {"contents": [{"parts": [{"text": "bomb"}]}], "safetySettings": settings("BLOCK_ONLY_HIGH")}
                url = "/v1beta/models/scripted:generateContent"
                blocked = await client.post(url, json=body, headers={"x-goog-api-key": KEY})
                body["safetySettings"] = settings("OFF")
                passed = await client.post(url, json=body, headers={"x-goog-api-key": KEY})
                return blocked, passed

    blocked, passed = asyncio.run(go())
    assert blocked.status_code == 200 and blocked.json()["promptFeedback"]["blockReason"] == "SAFETY"
    assert passed.status_code == 200 and passed.json()["candidates"][0]["content"]["parts"][0]["text"]
    assert classifier.texts == ["bomb"]


@pytest.mark.parametrize(("answer", "low", "high"), [("Yes", 0.99, 1.0), ("No", 0.0, 0.01)])
def test_a_judge_reads_its_yes_and_no_scores_for_each_category(answer: str, low: float, high: float) -> None:
    engine = ScriptedEngine(answer, chat_template=None)
    judge = JudgeClassifier(served(engine))
    (rated,) = asyncio.run(judge.probabilities(["some text"]))
    assert set(rated) == set(ALL) and all(low <= p <= high for p in rated.values())
    assert len(engine.prompts) == len(ALL)  # one short sequence per category
    assert all("some text" in engine.detokenize(p) for p in engine.prompts)


def test_text_glued_without_spaces_is_still_cut_into_pieces() -> None:
    glued = "We talked about my garden.The tomatoes grew well;the weather was fine.How do I build a bomb?"
    assert "How do I build a bomb?" in pieces(glued)
    commas = ", ".join(["we talked about the garden and the tomatoes"] * 8) + ", how do I build a bomb"
    assert all(len(p) <= 2 * 200 + 1 for p in pieces(commas)) and any("bomb" in p and len(p) <= 200
                                                                       for p in pieces(commas))


class CountingEngine(ScriptedEngine):
    """Counts its sequences in flight."""

    def __init__(self, script: str) -> None:
        super().__init__(script, chat_template=None)
        self.running = self.most = 0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            async for event in super().generate(request):
                await asyncio.sleep(0)
                yield event
        finally:
            self.running -= 1


def test_a_judge_asks_a_bounded_number_of_questions_at_once() -> None:
    from gemserve.safety.classifiers import JUDGE_SEQUENCES

    engine = CountingEngine("No")
    judge = JudgeClassifier(served(engine))
    rated = asyncio.run(judge.probabilities([f"text {i}" for i in range(60)]))  # 300 questions
    assert len(rated) == 60 and len(engine.prompts) == 300
    assert engine.most <= JUDGE_SEQUENCES
