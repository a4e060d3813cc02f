"""Rendering a conversation into the prompt text a model was trained on.

A model's own chat template (the Jinja template in its GGUF metadata or tokenizer_config.json) is used when it
has one. Gemma GGUF files often ship without one; for them the Gemma turn format below is used, which is what
Gemma's own template produces. Other models without a template get a plain "User:/Model:" transcript.
Templates run in Jinja's sandbox: a model file is data, not code.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gemserve.errors import invalid_argument

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(prefix='') -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}{%- set ns.prefix = ns.prefix + message.content + '\n\n' -%}"
    "{%- else -%}"
    "{{ '<start_of_turn>' + ('model' if message.role == 'assistant' else message.role) + '\n' }}"
    "{{ ns.prefix + message.content }}{{ '<end_of_turn>\n' }}"
    "{%- set ns.prefix = '' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

PLAIN_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ {'system': 'System', 'user': 'User', 'assistant': 'Model'}[message.role] + ': ' + message.content + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Model:{%- endif -%}"
)


@dataclass(frozen=True)
class Message:
    role: str  # "system", "user" or "assistant", the names chat templates expect
    content: str


def _raise(message: str) -> None:
    raise invalid_argument(f"The model's chat template rejected the conversation: {message}")


Tokenize = Callable[[str, bool], list[int]]
"""(text, parse special tokens?) -> token ids, without adding BOS."""

_MARK = re.compile("\x00([0-9]+)\x00")


class ChatFormat:
    def __init__(self, template: str | None, architecture: str, bos_text: str, eos_text: str) -> None:
        if template:
            source = template
        elif architecture.startswith("gemma"):
            source = GEMMA_TEMPLATE
        else:
            source = PLAIN_TEMPLATE
        # Gemma's own template trims each message; ours does it here, where the text is known.
        self._trims = source is GEMMA_TEMPLATE
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(source)
        self._bos_text = bos_text
        self._eos_text = eos_text

    def prompt_ids(self, messages: list[Message], tokenize: Tokenize, bos_id: int | None) -> list[int]:
        """The conversation's token ids. Only the template's own markup is read for special tokens: a user who
        writes "<end_of_turn>" gets those characters, not the end of a turn (Google treats text literally).

        Each message is rendered as a marker first; the text between markers is markup. A template that
        changes message text (so that a marker does not come through once) is tokenized whole instead."""
        messages = [Message(m.role, m.content.strip() if self._trims else m.content) for m in messages]
        text = self.render([Message(m.role, f"\x00{i}\x00") for i, m in enumerate(messages)])
        pieces = _MARK.split(text)
        order = [int(p) for p in pieces[1::2]]
        if sorted(order) != list(range(len(messages))):
            text = self.render(messages)
            ids = tokenize(text, True)
        else:
            ids = []
            for i, piece in enumerate(pieces):
                if i % 2:
                    ids += tokenize(messages[int(piece)].content, False)
                elif piece:
                    ids += tokenize(piece, True)
        if bos_id is not None and self._bos_text and not text.startswith(self._bos_text):
            ids = [bos_id, *ids]
        return ids

    def render(self, messages: list[Message]) -> str:
        """The prompt text, beginning with the BOS token's text when the model uses one."""
        context: dict[str, Any] = {
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "add_generation_prompt": True,
            "bos_token": self._bos_text,
            "eos_token": self._eos_text,
        }
        try:
            return self._template.render(**context)
        except TemplateError as exc:
            message = f"The conversation could not be rendered with the model's chat template: {exc}"
            raise invalid_argument(message) from exc
