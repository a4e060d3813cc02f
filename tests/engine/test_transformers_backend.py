"""TransformersEngine against tiny randomly initialized models built here: no downloaded weights.

The reference for every generation is the model itself, run in the test without a KV cache: the whole sequence
through `forward` at each step, argmax of the last row.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from gemserve.engine.backends.transformers import TransformersEngine
from gemserve.engine.types import (
    EngineError,
    Event,
    FinishEvent,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)

SPECIALS = ["<pad>", "<bos>", "<eos>", "<end_of_turn>"]  # ids 0-3
TEXT = "the quick brown fox jumps over the lazy dog. héllo wörld ✓ naïve café, 東京"
CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}<end_of_turn>{% endfor %}"
GREEDY = SamplingParams(temperature=0.0)


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE, trained here; its post-processor adds <bos> as Llama's and Gemma's do."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", chat_template=CHAT_TEMPLATE)


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style (Gemma, Llama 2): U+2581 for spaces, <0xNN> for bytes the vocabulary lacks."""
    pieces = [*SPECIALS, *(f"<0x{b:02X}>" for b in range(256)), *"\u2581abcdefghijklmnopqrstuvwxyz.,"]
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], byte_fallback=True))
    tok.add_special_tokens(SPECIALS)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")


def save_model(directory: Path, tokenizer: PreTrainedTokenizerFast, architecture: str = "llama",
               eos: list[int] | None = None) -> Path:
    torch.manual_seed(0)
    common: dict[str, Any] = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
        initializer_range=0.2,  # larger than the default, so the greedy path has clear winners
    )
    model: PreTrainedModel
    if architecture == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        # A sliding window shorter than the prompts exercises the windowed KV cache. Untied embeddings: with
        # Gemma's scaled input embeddings, tied ones make a random model just repeat its last token.
        config = Gemma3TextConfig(**common, head_dim=16, sliding_window=4, tie_word_embeddings=False,
                                  layer_types=["sliding_attention", "full_attention"])
        model = Gemma3ForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    GenerationConfig(bos_token_id=1, eos_token_id=eos or [2, 3]).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("llama"), byte_level_tokenizer())


@pytest.fixture(scope="module")
def engine(llama_dir: Path):
    engine = TransformersEngine(llama_dir, prefill_chunk=4)  # prompts longer than 4 arrive in several chunks
    yield engine
    engine.close()


def reference(directory: Path, prompt: list[int],
              steps: int) -> tuple[list[int], list[float], list[torch.Tensor]]:
    """Greedy decoding by whole forward passes: tokens, their log-probabilities, each step's log-softmax."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = list(prompt)
    tokens, logprobs, rows = [], [], []
    with torch.inference_mode():
        for _ in range(steps):
            row = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), dim=-1)
            token = int(row.argmax())
            tokens.append(token)
            logprobs.append(float(row[token]))
            rows.append(row)
            ids.append(token)
    return tokens, logprobs, rows


def request(prompt: list[int], max_new: int, sampling: SamplingParams = GREEDY) -> GenerationRequest:
    return GenerationRequest(prompt=tuple(prompt), sampling=sampling, max_new_tokens=max_new)


async def collect(engine: TransformersEngine, req: GenerationRequest) -> list[Event]:
    return [event async for event in engine.generate(req)]


def tokens_of(events: list[Event]) -> list[int]:
    return [e.token for e in events if isinstance(e, TokenEvent)]


@pytest.mark.parametrize("architecture", ["llama", "gemma3_text"])
def test_greedy_output_is_the_models_argmax(tmp_path: Path, architecture: str) -> None:
    directory = save_model(tmp_path, byte_level_tokenizer(), architecture)
    engine = TransformersEngine(directory, prefill_chunk=3)
    try:
        prompt = engine.tokenize("the lazy dog jumps", add_bos=True, parse_special=False)
        expected, _, _ = reference(directory, prompt, 10)
        assert not any(map(engine.is_end_of_generation, expected)), "the greedy path must not end early"
        events = asyncio.run(collect(engine, request(prompt, 10)))
    finally:
        engine.close()
    assert tokens_of(events) == expected
    assert events[-1] == FinishEvent("MAX_TOKENS")


def test_max_new_tokens_ends_with_max_tokens(engine: TransformersEngine) -> None:
    prompt = engine.tokenize("the fox", add_bos=True, parse_special=False)
    for n in (1, 5):
        events = asyncio.run(collect(engine, request(prompt, n)))
        assert len(tokens_of(events)) == n
        assert events[-1] == FinishEvent("MAX_TOKENS")
        assert len(events) == n + 1


def test_end_of_generation_token_stops(tmp_path: Path, llama_dir: Path) -> None:
    prompt = [1, 10, 20, 30]
    expected, _, _ = reference(llama_dir, prompt, 6)
    # The same weights with the greedy path's fourth token declared end-of-sequence.
    directory = save_model(tmp_path, byte_level_tokenizer(), eos=[2, expected[3]])
    engine = TransformersEngine(directory)
    try:
        assert engine.is_end_of_generation(expected[3]) and engine.is_end_of_generation(3)
        events = asyncio.run(collect(engine, request(prompt, 6)))
    finally:
        engine.close()
    stop = expected.index(expected[3])
    assert tokens_of(events) == expected[:stop]
    assert events[-1] == FinishEvent("STOP")


def test_logprobs_are_the_models_log_softmax(engine: TransformersEngine, llama_dir: Path) -> None:
    prompt = engine.tokenize("quick brown", add_bos=True, parse_special=False)
    tokens, logprobs, rows = reference(llama_dir, prompt, 6)
    sampling = SamplingParams(temperature=0.0, logprobs=3)
    *events, finish = asyncio.run(collect(engine, request(prompt, 6, sampling)))
    assert finish == FinishEvent("MAX_TOKENS")
    steps = [e for e in events if isinstance(e, TokenEvent)]
    assert [e.token for e in steps] == tokens
    for event, logprob, row in zip(steps, logprobs, rows, strict=True):
        assert event.logprob == pytest.approx(logprob, abs=1e-4)
        best = torch.topk(row, 3)
        assert [t for t, _ in event.top] == best.indices.tolist()
        assert [lp for _, lp in event.top] == pytest.approx(best.values.tolist(), abs=1e-4)


def test_concurrent_generations_both_complete_with_their_own_output(engine: TransformersEngine,
                                                                      llama_dir: Path) -> None:
    prompts = [engine.tokenize("the lazy dog", add_bos=True, parse_special=False),
               engine.tokenize("café naïve ✓ over the fox", add_bos=True, parse_special=False)]

    async def both() -> list[list[Event]]:
        return list(await asyncio.gather(*(collect(engine, request(p, 8)) for p in prompts)))

    results = asyncio.run(both())
    for prompt, events in zip(prompts, results, strict=True):
        assert tokens_of(events) == reference(llama_dir, prompt, 8)[0]
        assert events[-1] == FinishEvent("MAX_TOKENS")


def test_seed_reproduces_sampling_at_temperature_one(engine: TransformersEngine) -> None:
    prompt = engine.tokenize("the", add_bos=True, parse_special=False)

    def run(seed: int) -> list[int]:
        sampling = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, seed=seed)
        return tokens_of(asyncio.run(collect(engine, request(prompt, 12, sampling))))

    first = run(7)
    assert run(7) == first
    assert run(8) != first


def test_closing_the_iterator_cancels_the_sequence(llama_dir: Path) -> None:
    engine = TransformersEngine(llama_dir, max_sequences=1)  # a second request runs once the first is gone

    async def scenario() -> list[Event]:
        events = engine.generate(request([1, 10, 20], 100))
        assert isinstance(await anext(events), TokenEvent)
        await events.aclose()  # type: ignore[attr-defined]
        return await asyncio.wait_for(collect(engine, request([1, 30], 3)), timeout=30)

    try:
        events = asyncio.run(scenario())
    finally:
        engine.close()
    assert len(tokens_of(events)) == 3 and events[-1] == FinishEvent("MAX_TOKENS")


def test_unservable_requests_raise_engine_error(engine: TransformersEngine) -> None:
    adapter = GenerationRequest(prompt=(1, 10), sampling=GREEDY, max_new_tokens=2, adapter="tunedModels/x")
    with pytest.raises(EngineError, match="LoRA adapters"):
        asyncio.run(collect(engine, adapter))
    with pytest.raises(EngineError, match="tokens of context"):
        asyncio.run(collect(engine, request([1] * 100, 100)))
    with pytest.raises(EngineError, match="no tokens"):
        asyncio.run(collect(engine, request([], 1)))


def test_metadata_comes_from_config_and_tokenizer(engine: TransformersEngine) -> None:
    meta = engine.metadata
    assert meta.context_length == 128
    assert meta.vocab_size == 320
    assert (meta.bos_text, meta.eos_text) == ("<bos>", "<eos>")
    assert meta.chat_template == CHAT_TEMPLATE
    assert meta.architecture == "llama"


def test_tokenize_adds_bos_and_parses_special_tokens_on_request(engine: TransformersEngine) -> None:
    plain = engine.tokenize("the fox", add_bos=False, parse_special=False)
    assert engine.tokenize("the fox", add_bos=True, parse_special=False) == [1, *plain]
    assert engine.tokenize("fox<end_of_turn>", add_bos=False, parse_special=True)[-1] == 3
    assert 3 not in engine.tokenize("fox<end_of_turn>", add_bos=False, parse_special=False)


@pytest.mark.parametrize("make_tokenizer", [byte_level_tokenizer, byte_fallback_tokenizer])
def test_token_bytes_reassemble_the_text(tmp_path: Path, make_tokenizer) -> None:  # type: ignore[no-untyped-def]
    engine = TransformersEngine(save_model(tmp_path, make_tokenizer()))
    try:
        tokens = engine.tokenize(TEXT, add_bos=False, parse_special=False)
        pieces = [engine.token_bytes(t) for t in tokens]
        special = [engine.token_bytes(t) for t in (1, 2, 3)]
    finally:
        engine.close()
    assert b"".join(pieces) == TEXT.encode("utf-8")
    assert any(len(p) == 1 and p[0] >= 0x80 for p in pieces), "some characters must be split into bytes"
    assert special == [b"", b"", b""]
