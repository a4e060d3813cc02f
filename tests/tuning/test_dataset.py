"""Examples -> token ids: the prompt serving would build, the target with its end-of-turn token, the loss mask."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from gemserve.models.chat_format import GEMMA_TEMPLATE, ChatFormat, Message
from gemserve.tuning.base_weights import BaseModel, prepare_base
from gemserve.tuning.dataset import IGNORE, Encoded, ExampleEncoder, collate, text_tokenizer
from gemserve.tuning.jobs import Example, JobError
from tests.tuning import tiny


@pytest.fixture(scope="module")
def gemma_base(tiny_gemma: Path, tmp_path_factory: pytest.TempPathFactory) -> BaseModel:
    return prepare_base(tmp_path_factory.mktemp("data"), "tiny", tiny_gemma)


def test_prompt_is_the_served_gemma_turn_and_target_ends_the_turn(gemma_base: BaseModel) -> None:
    encoder = ExampleEncoder(gemma_base, text_tokenizer(gemma_base))
    encoded = encoder.encode(Example("one two", "IV"))
    hf = AutoTokenizer.from_pretrained(gemma_base.hf_dir)
    prompt_text = "<bos><start_of_turn>user\none two<end_of_turn>\n<start_of_turn>model\n"
    assert ChatFormat(None, "gemma3_text", "<bos>", "<eos>").render([Message("user", "one two")]) == prompt_text
    prompt = hf(prompt_text, add_special_tokens=False)["input_ids"]
    target = hf("IV", add_special_tokens=False)["input_ids"]
    assert encoded.input_ids == [*prompt, *target, tiny.END_OF_TURN_ID]
    assert encoded.input_ids[:2] == [tiny.BOS_ID, 4]  # one BOS (the template's), then <start_of_turn>
    assert encoded.input_ids.count(tiny.BOS_ID) == 1


def test_only_output_tokens_carry_labels(gemma_base: BaseModel) -> None:
    encoder = ExampleEncoder(gemma_base, text_tokenizer(gemma_base))
    encoded = encoder.encode(Example("a long input of several words", "VII"))
    n_prompt = len(encoder.prompt_ids("a long input of several words"))
    assert encoded.labels[:n_prompt] == [IGNORE] * n_prompt
    assert encoded.labels[n_prompt:] == encoded.input_ids[n_prompt:]
    assert encoded.labels[-1] == tiny.END_OF_TURN_ID
    assert encoded.n_target == len(encoded.input_ids) - n_prompt


def test_special_token_text_in_the_output_stays_text(gemma_base: BaseModel) -> None:
    encoder = ExampleEncoder(gemma_base, text_tokenizer(gemma_base))
    encoded = encoder.encode(Example("x", "<end_of_turn>"))
    assert encoded.input_ids[-encoded.n_target:].count(tiny.END_OF_TURN_ID) == 1  # only the real end of turn


def test_without_a_gemma_template_the_end_token_is_eos_and_bos_is_added(tiny_llama: Path, tmp_path: Path) -> None:
    base = prepare_base(tmp_path, "tiny-llama", tiny_llama)
    encoder = ExampleEncoder(base, text_tokenizer(base))
    encoded = encoder.encode(Example("one", "I"))
    assert encoded.input_ids[0] == tiny.BOS_ID and encoded.input_ids.count(tiny.BOS_ID) == 1
    assert encoded.labels[-1] == tiny.EOS_ID


def test_a_template_with_end_of_turn_uses_that_token(gemma_base: BaseModel) -> None:
    base = BaseModel(**{**gemma_base.__dict__, "architecture": "llama", "chat_template": GEMMA_TEMPLATE})
    encoder = ExampleEncoder(base, text_tokenizer(base))
    assert encoder.end_id == tiny.END_OF_TURN_ID


def test_too_long_example_fails_with_its_index(gemma_base: BaseModel) -> None:
    encoder = ExampleEncoder(gemma_base, text_tokenizer(gemma_base), max_tokens=40)
    examples = [Example("one", "I"), Example("one two three " * 10, "I")]
    with pytest.raises(JobError, match=r"examples\[1\] is \d+ tokens long; at most 40"):
        encoder.encode_all(examples)


def test_collate_right_pads_and_masks() -> None:
    items = [Encoded([7, 8, 9], [IGNORE, 8, 9]), Encoded([7, 8], [IGNORE, 8])]
    batch = collate(items, pad_id=0)
    assert batch.input_ids.tolist() == [[7, 8, 9], [7, 8, 0]]
    assert batch.labels.tolist() == [[IGNORE, 8, 9], [IGNORE, 8, IGNORE]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.n_tokens == 5
    assert batch.input_ids.dtype == torch.long
