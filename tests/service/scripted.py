"""A scripted engine for service tests: a byte-level vocabulary with a few special tokens, and a "model" that
wants to write a given text. It decodes through the engines' own `advance()`, so sampling and constraints are
the real ones; only the logits are made up. No weights, no threads, no server.

The model prefers the script's next token strongly; where a constraint rules it out, it takes the best allowed
token by a fixed order of preference (`FALLBACK`), so constrained output is deterministic and checkable.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llguidance
import numpy as np

from gemserve.engine.constraints import Constraint
from gemserve.engine.sequences import Message, Outbox, Sequence, advance, rng_for
from gemserve.engine.types import EngineError, Event, FinishEvent, GenerationRequest, ModelMetadata
from gemserve.models.catalog import ModelSpec
from gemserve.models.chat_format import ChatFormat
from gemserve.models.registry import ServedModel
from gemserve.schema.content import GenerateContentRequest
from gemserve.schema.wire import parse_model
from gemserve.service import generation
from gemserve.service.requests import base_target, plan_generation

SPECIAL = ["<eos>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
EOS = 256
END_OF_TURN = 258  # <|im_end|>
_SPECIAL_IDS = {name: 256 + i for i, name in enumerate(SPECIAL)}
_SPLIT = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL) + ")")
# Where the script's token is not allowed, the model's next choices, best first: closing a string or a
# structure, then digits, letters, punctuation.
FALLBACK = b'"}]0123456789abcdefghijklmnopqrstuvwxyz {[,:.-_\n'

# A chat template in Qwen 2.5's shape: tools in the system turn, calls and results in their tags.
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{%- elif message.role == 'assistant' %}<|im_start|>assistant{% if message.content %}\n{{ message.content }}"
    "{% endif %}{%- for call in message.tool_calls %}\n<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- elif message.role == 'system' and not loop.first %}<|im_start|>system\n{{ message.content }}<|im_end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class _ByteVocab:
    """What llguidance needs to know of a vocabulary (see llguidance.TokenizerWrapper)."""

    eos_token_id: int = EOS
    bos_token_id: int | None = None
    tokens: list[bytes] = field(default_factory=lambda: [bytes([b]) for b in range(256)]
                                + [b"\xff" + s.encode() for s in SPECIAL])
    special_token_ids: list[int] = field(default_factory=lambda: list(range(256, 256 + len(SPECIAL))))

    def __call__(self, text: bytes) -> list[int]:
        return list(text)


def grammar_tokenizer() -> llguidance.LLTokenizer:
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteVocab()), eos_token=[EOS, END_OF_TURN])


class ScriptedEngine:
    """Writes `script` (special tokens by name), whatever the prompt; records the prompts it was given. With a
    list of scripts, each generation takes the next one (the last one repeats)."""

    def __init__(self, script: str | list[str] = "", chat_template: str | None = TOOLS_TEMPLATE) -> None:
        self.scripts = script if isinstance(script, list) else [script]
        self.prompts: list[tuple[int, ...]] = []
        self.pinned: dict[str, tuple[int, ...]] = {}
        self.reused = 0  # prompt tokens each generation says it took from a kept cache
        self.metadata = ModelMetadata(context_length=8192, vocab_size=256 + len(SPECIAL), bos_text="",
                                      eos_text="<eos>", chat_template=chat_template, architecture="scripted")
        self._lltokenizer = grammar_tokenizer()

    def tokenize(self, text: str, *, add_bos: bool, parse_special: bool) -> list[int]:
        if not parse_special:
            return list(text.encode())
        ids: list[int] = []
        for piece in _SPLIT.split(text):
            ids += [_SPECIAL_IDS[piece]] if piece in _SPECIAL_IDS else list(piece.encode())
        return ids

    def token_bytes(self, token: int) -> bytes:
        return bytes([token]) if token < 256 else SPECIAL[token - 256].encode()

    def is_end_of_generation(self, token: int) -> bool:
        return token in (EOS, END_OF_TURN)

    def prepare_grammar(self) -> None:
        pass

    def compile_grammar(self, grammar: str) -> Constraint:
        return Constraint(self._lltokenizer, grammar)

    def forget_adapter(self, path: str) -> None:
        pass

    def pin(self, key: str, prefix: tuple[int, ...], adapter: str | None = None, saved: Path | None = None,
            scope: str | None = None) -> None:
        self.pinned[key] = prefix

    def unpin(self, key: str) -> None:
        self.pinned.pop(key, None)

    def close(self) -> None:
        pass

    def detokenize(self, ids: tuple[int, ...] | list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in ids).decode()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        text = self.scripts[min(len(self.prompts), len(self.scripts) - 1)]
        self.prompts.append(request.prompt)
        script = self.tokenize(text, add_bos=False, parse_special=True)
        queue: asyncio.Queue[Message] = asyncio.Queue()
        seq = Sequence(request=request, loop=asyncio.get_running_loop(), queue=queue,
                       rng=rng_for(request.sampling.seed))
        seq.cached_tokens = min(self.reused, len(request.prompt))  # as if a kept cache held that much
        outbox = Outbox()
        while True:
            n = seq.n_generated
            wanted = script[n] if n < len(script) else EOS
            if advance(seq, self._logits(wanted), self.is_end_of_generation, outbox):
                outbox.flush()
                break
            outbox.flush()
            await asyncio.sleep(0)
        while True:
            message = await queue.get()
            if isinstance(message, BaseException):
                raise message
            yield message
            if isinstance(message, FinishEvent | EngineError):
                return

    def _logits(self, wanted: int) -> np.ndarray:
        logits = np.zeros(self.metadata.vocab_size, dtype=np.float32)
        for rank, byte in enumerate(FALLBACK):
            logits[byte] = 4.0 - rank * 0.05
        logits[wanted] = 10.0
        return logits


def served(engine: ScriptedEngine, model_id: str = "scripted") -> ServedModel:
    spec = ModelSpec(id=model_id, display_name=model_id, description="", path=None, temperature=0.0, top_k=1,
                     top_p=1.0)
    meta = engine.metadata
    return ServedModel(spec, engine, ChatFormat(meta.chat_template, meta.architecture, meta.bos_text,
                                                meta.eos_text))


def run(script: str | list[str], body: dict[str, Any], template: str | None = TOOLS_TEMPLATE, stream: bool = False,
        sandbox: Any = None, reused: int = 0) -> tuple[Any, ScriptedEngine]:
    """A generateContent request (streamed: the list of chunks) answered by a model that wants to write `script`
    (`reused`: prompt tokens the engine says a kept cache held)."""
    engine = ScriptedEngine(script, chat_template=template)
    engine.reused = reused
    model = served(engine)

    async def go() -> Any:
        parsed = parse_model(GenerateContentRequest, body, "GenerateContentRequest")
        plan = await plan_generation(base_target(model), parsed, sandbox=sandbox)
        if stream:
            return [chunk async for chunk in generation.stream(plan)]
        return await generation.generate(plan)

    return asyncio.run(go()), engine


def request_body(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": "Hello"}]}]}
    body.update(fields)
    return body
