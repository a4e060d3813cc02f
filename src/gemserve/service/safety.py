"""Enforcing a request's safety settings (`safety/policy.py`) with the server's classifier.

- The prompt is rated before anything is generated: the text of the request's contents, media renderings
  included (the system instruction is the developer's, not rated). A blocked prompt gets a 200 with
  `promptFeedback.blockReason: SAFETY` and its ratings, and no candidates; otherwise the ratings come back in
  `promptFeedback.safetyRatings`.
- Each candidate is rated as it is written, in windows of `WINDOW_TOKENS` tokens (the first one
  `FIRST_WINDOW_TOKENS`, so that a stream's first text is not long in coming). When the policy can block, a
  window is held back until it is rated, with the `CONTEXT_CHARS` characters before it: rated above a
  threshold, the candidate stops there, ends with `finishReason: SAFETY` and ratings that mark `blocked`, and
  the window is never sent (generateContent then returns none of its content). When nothing can block
  (`BLOCK_NONE`), output is not held back: the whole answer is rated once it ends.
- Long texts are rated in pieces of `PIECE_CHARS` characters, the newest `MAX_PIECES` of them (the sentence
  encoder reads 256 tokens at most); each category takes its highest probability over the pieces.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from gemserve.safety.classifiers import Classifier
from gemserve.safety.policy import CATEGORIES, SafetyPolicy, Verdict
from gemserve.schema.content import GenerateContentRequest, Part

FIRST_WINDOW_TOKENS = 8
WINDOW_TOKENS = 32
CONTEXT_CHARS = 300
PIECE_CHARS = 800
MAX_PIECES = 8


class Guard:
    """One request's safety: its policy, the classifier, and the prompt's text."""

    def __init__(self, classifier: Classifier, policy: SafetyPolicy, prompt: str) -> None:
        self.classifier = classifier
        self.policy = policy
        self.prompt = prompt

    async def rate(self, text: str) -> Verdict:
        pieces = split(text)
        if not pieces:
            return self.policy.judge({})
        rated = await self.classifier.probabilities(pieces)
        return self.policy.judge({c: max(p.get(c, 0.0) for p in rated) for c in CATEGORIES})

    async def rate_prompt(self) -> Verdict:
        return await self.rate(self.prompt)


def split(text: str) -> list[str]:
    """The newest `MAX_PIECES` pieces of `text`, cut at whitespace where one is near."""
    text = text.strip()
    pieces: list[str] = []
    while text and len(pieces) < MAX_PIECES:
        if len(text) <= PIECE_CHARS:
            pieces.append(text)
            break
        cut = text.find(" ", len(text) - PIECE_CHARS, len(text) - PIECE_CHARS // 2)
        cut = len(text) - PIECE_CHARS if cut < 0 else cut + 1
        pieces.append(text[cut:])
        text = text[:cut].rstrip()
    return pieces[::-1]


def prompt_text(request: GenerateContentRequest) -> str:
    """What a request's contents say: text parts, media renderings, function results, newest last."""
    return "\n".join(filter(None, (parts_text(content.parts) for content in request.contents)))


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
