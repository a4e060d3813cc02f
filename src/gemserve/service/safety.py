"""Enforcing a request's safety settings (`safety/policy.py`) with the server's classifier.

- The prompt is rated before anything is generated: the text of the request's contents, media renderings
  included (the system instruction is the developer's, not rated). A blocked prompt gets a 200 with
  `promptFeedback.blockReason: SAFETY` and its ratings, and no candidates; otherwise the ratings come back in
  `promptFeedback.safetyRatings`.
- Each candidate is rated as it is written, in windows of `WINDOW_TOKENS` tokens (the first one
  `FIRST_WINDOW_TOKENS`, so that a stream's first text is not long in coming). When the policy can block, a
  window is held back until all of it is rated, with the `CONTEXT_CHARS` characters before it: rated above a
  threshold, the candidate stops there, ends with `finishReason: SAFETY` and ratings that mark `blocked`, and
  the window is never sent (generateContent then returns none of its content). When nothing can block
  (`BLOCK_NONE`), output is not held back: the whole answer is rated once it ends. A candidate's ratings are
  the highest of all its windows'.
- Texts are rated in sentence-sized pieces, as the classifier was trained: each sentence (or line, or clause
  after a semicolon; long ones cut at a comma or space every `PIECE_CHARS`) alone and with the next one, each
  turn of the prompt apart; each category takes its highest probability over the
  pieces, so harmless text around a harmful sentence does not water its rating down. Every piece is rated.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence

from gemserve.engine.types import EngineBusy
from gemserve.errors import RETRY_AFTER_SECONDS, ApiError
from gemserve.safety.classifiers import Classifier
from gemserve.safety.policy import CATEGORIES, SafetyPolicy, Verdict
from gemserve.schema.content import GenerateContentRequest, Part

log = logging.getLogger("gemserve.safety")

FIRST_WINDOW_TOKENS = 8
WINDOW_TOKENS = 32
CONTEXT_CHARS = 300
PIECE_CHARS = 200  # a sentence longer than this is cut at a space or comma
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s*|\n+")  # with or without a space after it

Probabilities = dict[str, float]


class Guard:
    """One request's safety: its policy, the classifier, and the prompt's turns."""

    def __init__(self, classifier: Classifier, policy: SafetyPolicy, prompt: Sequence[str]) -> None:
        self.classifier = classifier
        self.policy = policy
        self.prompt = list(prompt)
        self._prompt_verdict: Verdict | None = None

    async def probabilities(self, texts: Sequence[str]) -> Probabilities:
        """Each category's highest probability over the pieces of `texts` (each text cut apart)."""
        found = [piece for text in texts for piece in pieces(text)]
        if not found:
            return {}
        try:
            rated = await self.classifier.probabilities(found)
        except ApiError:
            raise
        except EngineBusy as exc:
            raise ApiError("RESOURCE_EXHAUSTED", f"The safety classifier is busy: {exc}. Try again later.",
                           retry_after=RETRY_AFTER_SECONDS) from exc
        except Exception as exc:
            log.warning("the safety classifier failed", exc_info=exc)
            raise ApiError("UNAVAILABLE", f"The safety classifier failed: {exc}") from exc
        return {c: max(p.get(c, 0.0) for p in rated) for c in CATEGORIES}

    def judge(self, probabilities: Mapping[str, float]) -> Verdict:
        return self.policy.judge(probabilities)

    async def rate_prompt(self) -> Verdict:
        """The prompt's verdict (rated once: the route asks before a stream starts, the stream again)."""
        if self._prompt_verdict is None:
            self._prompt_verdict = self.judge(await self.probabilities(self.prompt))
        return self._prompt_verdict


def highest(a: Mapping[str, float], b: Mapping[str, float]) -> Probabilities:
    return {c: max(a.get(c, 0.0), b.get(c, 0.0)) for c in {*a, *b}}


def pieces(text: str) -> list[str]:
    """Each sentence (or line) of `text`, and each with the next, cut to PIECE_CHARS; no duplicates."""
    sentences: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        sentence = sentence.strip()
        while len(sentence) > PIECE_CHARS:
            cut = max(sentence.rfind(" ", PIECE_CHARS // 2, PIECE_CHARS),
                      sentence.rfind(",", PIECE_CHARS // 2, PIECE_CHARS) + 1)
            cut = PIECE_CHARS if cut <= 0 else cut
            sentences.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if sentence:
            sentences.append(sentence)
    found = dict.fromkeys(sentences)
    for first, then in zip(sentences, sentences[1:], strict=False):
        found[f"{first} {then}"] = None
    return list(found)


def prompt_turns(request: GenerateContentRequest) -> list[str]:
    """What each of a request's contents says: text parts, media renderings, function results."""
    return [text for text in (parts_text(content.parts) for content in request.contents) if text]


def parts_text(parts: Sequence[Part]) -> str:
    texts = []
    for part in parts:
        if part.thought:
            continue
        if part.text is not None:
            texts.append(part.text)
        elif part.rendering is not None:
            texts.append(part.rendering.text)
        elif part.function_call is not None:
            texts.append(json.dumps(part.function_call.args or {}, ensure_ascii=False))
        elif part.function_response is not None:
            texts.append(json.dumps(part.function_response.response or {}, ensure_ascii=False))
        elif part.executable_code is not None:
            texts.append(part.executable_code.code or "")
        elif part.code_execution_result is not None:
            texts.append(part.code_execution_result.output or "")
    return "\n".join(texts)
