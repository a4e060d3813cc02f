"""Tuning examples as token ids, with the loss on the output tokens only.

An example `{"text_input": t, "output": o}` becomes:

    prompt:  ChatFormat(...).render([Message("user", t)])  - exactly the prompt serving feeds the model
    target:  tokens of o, then the end-of-turn token        - so the tuned model learns to stop

The prompt is tokenized as serving tokenizes it: special tokens parsed, and a BOS added only when the model
uses one and the rendered text does not already start with it. For a GGUF base the tokenizer is llama.cpp's own
(the one that serves it, loaded vocabulary-only); for a Hugging Face directory it is the HF tokenizer, called as
the transformers engine calls it. Labels are -100 (ignored by the loss) on prompt tokens and padding.

Not here: batching order (`trainer.py`), and multi-turn or system-instruction examples (the tuning API has
only text_input/output pairs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from gemserve.models.chat_format import ChatFormat, Message
from gemserve.tuning.base_weights import BaseModel
from gemserve.tuning.gguf_vocab import GgufVocab
from gemserve.tuning.jobs import Example, JobError

IGNORE = -100  # label of tokens the loss skips (torch's cross_entropy default ignore_index)
MAX_EXAMPLE_TOKENS = 2048  # prompt + target; a longer example fails the job rather than being cut silently
# Tokens that end a model turn in common chat formats, preferred over EOS where the chat template uses them.
_END_OF_TURN = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>")


class TextTokenizer(Protocol):
    bos_id: int | None  # the BOS token serving adds to prompts, None for models without one
    eos_id: int

    def tokenize(self, text: str, *, parse_special: bool) -> list[int]:
        """Token ids of `text`, never adding BOS."""
        ...

    def special_token_id(self, text: str) -> int | None:
        """The id of the special token spelled `text`, None when the vocabulary has none."""
        ...


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken, else the token id at that position

    @property
    def n_target(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


class HFTextTokenizer:
    """A Hugging Face tokenizer, called as gemserve's transformers engine calls it."""

    def __init__(self, directory: Path) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        bos = self._tokenizer.bos_token_id
        # As the engine does: BOS only where the tokenizer itself would add one (Llama, Gemma), not Qwen's.
        self.bos_id: int | None = bos if bos is not None and self._tokenizer("")["input_ids"][:1] == [bos] else None
        if self._tokenizer.eos_token_id is None:
            raise JobError(f"the tokenizer in {directory} has no end-of-sequence token")
        self.eos_id: int = self._tokenizer.eos_token_id

    def tokenize(self, text: str, *, parse_special: bool) -> list[int]:
        encoded = self._tokenizer(text, add_special_tokens=False, split_special_tokens=not parse_special)
        return list(encoded["input_ids"])

    def special_token_id(self, text: str) -> int | None:
        for token_id, added in self._tokenizer.added_tokens_decoder.items():
            if added.content == text and added.special:
                return int(token_id)
        return None


def text_tokenizer(base: BaseModel) -> TextTokenizer:
    """The tokenizer serving uses for this base model."""
    if base.gguf_file is not None:
        return GgufVocab(base.gguf_file)
    return HFTextTokenizer(base.hf_dir)


def end_of_turn_id(tokenizer: TextTokenizer, base: BaseModel) -> int:
    """The token a model turn ends with: Gemma's <end_of_turn>, another chat format's end-of-turn token where
    the model's chat template uses one, else EOS."""
    for name in _END_OF_TURN:
        wanted = name == "<end_of_turn>" and base.architecture.startswith("gemma")
        if wanted or (base.chat_template and name in base.chat_template):
            token_id = tokenizer.special_token_id(name)
            if token_id is not None:
                return token_id
    return tokenizer.eos_id


class ExampleEncoder:
    """Turns examples into `Encoded` token ids for one base model."""

    def __init__(self, base: BaseModel, tokenizer: TextTokenizer, max_tokens: int = MAX_EXAMPLE_TOKENS) -> None:
        self._chat = ChatFormat(base.chat_template, base.architecture, base.bos_text, base.eos_text)
        self._tokenizer = tokenizer
        self.end_id = end_of_turn_id(tokenizer, base)
        self._max_tokens = max_tokens

    def prompt_ids(self, text_input: str) -> list[int]:
        """The token ids serving feeds the model for a single user turn (as service/requests.py builds them)."""
        def tokenize(text: str, special: bool) -> list[int]:
            return self._tokenizer.tokenize(text, parse_special=special)

        return self._chat.prompt_ids([Message("user", text_input)], tokenize, self._tokenizer.bos_id)

    def encode(self, example: Example, index: int = 0) -> Encoded:
        prompt = self.prompt_ids(example.text_input)
        # The output is data, not markup: text like "<end_of_turn>" in it stays text.
        target = [*self._tokenizer.tokenize(example.output, parse_special=False), self.end_id]
        if len(prompt) + len(target) > self._max_tokens:
            raise JobError(f"examples[{index}] is {len(prompt) + len(target)} tokens long; at most "
                           f"{self._max_tokens} tokens (prompt and output together) are allowed")
        return Encoded(input_ids=prompt + target, labels=[IGNORE] * len(prompt) + target)

    def encode_all(self, examples: Sequence[Example]) -> list[Encoded]:
        return [self.encode(example, i) for i, example in enumerate(examples)]


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (batch, length), right-padded
    attention_mask: torch.Tensor  # (batch, length): 1 on real tokens, 0 on padding
    labels: torch.Tensor  # (batch, length): IGNORE on prompt tokens and padding

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(items: Sequence[Encoded], pad_id: int) -> Batch:
    """Right-pad a batch to its longest example."""
    length = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        mask[row, :n] = 1
    return Batch(input_ids=input_ids, attention_mask=mask, labels=labels)
