"""The built-in instruct model under llama.cpp: its tool-call tags, literal text, and decoding under a grammar."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from gemserve.engine.backends.llamacpp import LlamaCppEngine
from gemserve.engine.lookup import PassCosts
from gemserve.engine.types import FinishEvent, GenerationRequest, SamplingParams, TokenEvent
from gemserve.models.catalog import INSTRUCT_MODEL_ID, ModelSpec, packaged_gguf
from gemserve.models.chat_format import ChatFormat
from gemserve.models.registry import ServedModel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def qwen(data_dir: Path) -> Iterator[LlamaCppEngine]:
    engine = LlamaCppEngine(packaged_gguf(INSTRUCT_MODEL_ID, data_dir), context_size=2048, max_sequences=2)
    yield engine
    engine.close()


def test_call_tags_are_tokens_of_their_own_but_never_read_out_of_plain_text(qwen: LlamaCppEngine) -> None:
    meta = qwen.metadata
    model = ServedModel(ModelSpec(id="q", display_name="q", description="", path=None), qwen,
                        ChatFormat(meta.chat_template, meta.architecture, meta.bos_text, meta.eos_text))
    assert model.special_call_tags
    tag = qwen.tokenize("<tool_call>", add_bos=False, parse_special=True)
    literal = qwen.tokenize("see <tool_call> and <|im_end|>", add_bos=False, parse_special=False)
    assert tag[0] not in literal and qwen.tokenize("<|im_end|>", add_bos=False, parse_special=True)[0] not in literal
    assert b"".join(qwen.token_bytes(t) for t in literal) == b"see <tool_call> and <|im_end|>"


def test_decoding_under_a_json_schema_gives_valid_json(qwen: LlamaCppEngine) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    prompt = qwen.tokenize("<|im_start|>user\nThe largest city of France, as JSON.<|im_end|>\n<|im_start|>assistant\n",
                           add_bos=False, parse_special=True)
    request = GenerationRequest(tuple(prompt), SamplingParams(temperature=0.7, seed=1), 60,
                                constraint=qwen.compile_grammar("start: %json " + json.dumps(schema)))

    async def run() -> tuple[str, str]:
        pieces, reason = [], ""
        async for event in qwen.generate(request):
            if isinstance(event, TokenEvent):
                pieces.append(qwen.token_bytes(event.token))
            else:
                assert isinstance(event, FinishEvent)
                reason = event.reason
        return b"".join(pieces).decode(), reason

    text, reason = asyncio.run(run())
    assert reason == "STOP"
    value = json.loads(text)
    assert set(value) == {"city", "population"} and isinstance(value["population"], int)


def test_tokens_a_grammar_forces_are_fed_ahead_and_the_greedy_output_stays_the_same(data_dir: Path) -> None:
    schema = {"type": "object", "properties": {
        "name_of_the_largest_city_of_the_country": {"type": "string"},
        "number_of_people_living_there_in_millions": {"type": "number"}},
        "required": ["name_of_the_largest_city_of_the_country", "number_of_people_living_there_in_millions"],
        "additionalProperties": False}
    # The key names and choices are in no text the model sees, so only the grammar can propose them.
    cases = [("The largest city of Japan, as JSON.", "start: %json " + json.dumps(schema), 60),
             ("Pick one.", 'start: "extraordinarily_long_choice_alpha" | "extraordinarily_long_choice_beta"', 40),
             ("Pick one.", 'start: "extraordinarily_long_choice_alpha" | "extraordinarily_long_choice_beta"', 3)]
    path = packaged_gguf(INSTRUCT_MODEL_ID, data_dir)
    outputs: dict[bool, list[tuple[list[int], str]]] = {}
    for lookup in (False, True):
        engine = LlamaCppEngine(path, context_size=1024, max_sequences=1, lookup=lookup,
                                pass_costs=PassCosts.guessed(0.1))  # fed whatever passes cost here
        try:
            for question, grammar, budget in cases:
                prompt = engine.tokenize(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
                                         add_bos=False, parse_special=True)
                request = GenerationRequest(tuple(prompt), SamplingParams(temperature=0.0), budget,
                                            constraint=engine.compile_grammar(grammar))
                outputs.setdefault(lookup, []).append(asyncio.run(_tokens(engine, request)))
            if lookup:
                assert engine.forced_tokens >= 10 and engine.forced_accepted >= engine.forced_tokens - 3
            texts = [b"".join(engine.token_bytes(t) for t in tokens).decode() for tokens, _ in outputs[lookup]]
        finally:
            engine.close()
    assert outputs[False] == outputs[True]
    assert "number_of_people_living_there_in_millions" in json.loads(texts[0])
    assert texts[1].startswith("extraordinarily_long_choice_") and outputs[True][1][1] == "STOP"
    assert len(outputs[True][2][0]) == 3 and outputs[True][2][1] == "MAX_TOKENS"  # the budget cut a forced run


async def _tokens(engine: LlamaCppEngine, request: GenerationRequest) -> tuple[list[int], str]:
    tokens: list[int] = []
    async for event in engine.generate(request):
        if isinstance(event, TokenEvent):
            tokens.append(event.token)
        else:
            assert isinstance(event, FinishEvent)
            return tokens, event.reason
    raise AssertionError("no finish event")


def test_text_a_grammar_forces_stays_text_where_it_spells_a_special_token(qwen: LlamaCppEngine) -> None:
    # An enum value, a key or a literal written like Qwen's `<tool_call>` token: llama.cpp's tokenizer would read
    # the token out of the text, and the constraint would then allow a token that the grammar's text cannot match.
    prompt = qwen.tokenize("<|im_start|>user\nPick one.<|im_end|>\n<|im_start|>assistant\n", add_bos=False,
                           parse_special=True)
    special = qwen.tokenize("<tool_call>", add_bos=False, parse_special=True)[0]
    for grammar in ('start: "say <tool_call> now"', 'start: "<tool_call>" | "</tool_call>"',
                    'start: %json {"type": "object", "properties": {"<tool_call>": {"type": "boolean"}}, '
                    '"required": ["<tool_call>"], "additionalProperties": false}'):
        request = GenerationRequest(tuple(prompt), SamplingParams(temperature=0.0), 30,
                                    constraint=qwen.compile_grammar(grammar))
        tokens, reason = asyncio.run(_tokens(qwen, request))
        assert reason == "STOP" and special not in tokens
        assert "<tool_call>" in b"".join(qwen.token_bytes(t) for t in tokens).decode()
