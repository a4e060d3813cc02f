"""Rendering a conversation into the prompt text a model was trained on.

A model's own chat template (the Jinja template in its GGUF metadata or tokenizer_config.json) is used when it
has one, rendered as Hugging Face's `apply_chat_template` renders it: `tojson` keeps key order and does not
escape HTML, `{% break %}`/`{% continue %}` work, `strftime_now` is there, and tools are passed as `tools`.
Gemma GGUF files often ship without one; for them the Gemma turn format below is used, which is what Gemma's own
template produces. Other models without a template get a plain "User:/Model:" transcript.
Templates run in Jinja's sandbox: a model file is data, not code.

Tools reach a model through its template when the template knows them (it mentions `tools`, as Qwen 2.5's
does). For any other template, gemserve writes them into the system message in the same format, the one
described in docs/function-calling.md: the declarations as JSON lines inside `<tools></tools>`, calls as
`<tool_call>{"name": ..., "arguments": ...}</tool_call>` in the model's turn, results as
`<tool_response>...</tool_response>` in a user turn.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jinja2 import TemplateError, pass_context
from jinja2.runtime import Context
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
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Message:
    role: str  # "system", "user", "assistant" or "tool", the names chat templates expect
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    name: str | None = None  # a tool message: the function whose result it carries


def _raise(message: str) -> None:
    raise invalid_argument(f"The model's chat template rejected the conversation: {message}")


Tokenize = Callable[[str, bool], list[int]]
"""(text, parse special tokens?) -> token ids, without adding BOS."""

# Data in the rendered text stands in as markers: "\x00i\x00" is message i's content, "\x01k\x01" the k-th
# value the template turned into JSON (tools, call arguments). Neither byte survives json.dumps unescaped.
_MARK = re.compile("([\x00\x01])([0-9]+)[\x00\x01]")
_SINK = "_gemserve_json_values"

TOOLS_PREAMBLE = (
    "# Tools\n\nYou can call functions to help with the user's request. Their signatures are listed within "
    "<tools></tools>:\n<tools>\n{tools}\n</tools>\n\nTo call a function, write a JSON object with its name and "
    "arguments within <tool_call></tool_call> tags, one call per block:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <arguments-object>}}\n</tool_call>'
)


@pass_context
def _tojson(context: Context, value: Any, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    text = json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    sink = context.get(_SINK)
    if sink is None:
        return text
    sink.append(text)
    return f"\x01{len(sink) - 1}\x01"


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def call_text(call: ToolCall) -> str:
    """A call as the tool format writes it (for templates without tools of their own)."""
    arguments = json.dumps(call.arguments, ensure_ascii=False)
    return f'<tool_call>\n{{"name": {json.dumps(call.name)}, "arguments": {arguments}}}\n</tool_call>'


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
        self.template_knows_tools = "tools" in source
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = _strftime_now
        self._template = env.from_string(source)
        self._bos_text = bos_text
        self._eos_text = eos_text

    def prompt_ids(self, messages: list[Message], tokenize: Tokenize, bos_id: int | None,
                   tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The conversation's token ids. Only the template's own markup is read for special tokens: a user who
        writes "<end_of_turn>" gets those characters, not the end of a turn (Google treats text literally), and
        so does text inside tool declarations and call arguments.

        Each message's text and each JSON value is rendered as a marker first; the text between markers is markup,
        and each marker is replaced by its data, tokenized as plain text (also where a template writes a message
        twice). Nothing a client sends is written into the markup as it is: function names are checked first."""
        messages, tools = self._prepared(messages, tools)
        markers = [Message(m.role, f"\x00{i}\x00" if m.content else "", m.tool_calls, m.name)
                   for i, m in enumerate(messages)]
        values: list[str] = []
        text = self._render(markers, tools, values)
        pieces = _MARK.split(text)
        ids: list[int] = []
        for i in range(0, len(pieces), 3):
            if pieces[i]:
                ids += tokenize(pieces[i], True)
            if i + 2 < len(pieces):
                kind, n = pieces[i + 1], int(pieces[i + 2])
                data = messages if kind == "\x00" else values
                if n >= len(data):  # only a template that writes such bytes itself could make one
                    raise invalid_argument("The conversation could not be rendered with the model's chat template.")
                ids += tokenize(messages[n].content if kind == "\x00" else values[n], False)
        if bos_id is not None and self._bos_text and not text.startswith(self._bos_text):
            ids = [bos_id, *ids]
        return ids

    def render(self, messages: list[Message], tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text, beginning with the BOS token's text when the model uses one."""
        messages, tools = self._prepared(messages, tools)
        return self._render(messages, tools, None)

    def _prepared(self, messages: list[Message], tools: list[dict[str, Any]] | None,
                  ) -> tuple[list[Message], list[dict[str, Any]] | None]:
        if self._trims:
            messages = [Message(m.role, m.content.strip(), m.tool_calls, m.name) for m in messages]
        if self.template_knows_tools:
            return messages, tools or None
        return _inline_tools(messages, tools), None

    def _render(self, messages: list[Message], tools: list[dict[str, Any]] | None, sink: list[str] | None) -> str:
        context: dict[str, Any] = {
            "messages": [_message_dict(m) for m in messages],
            "add_generation_prompt": True,
            "bos_token": self._bos_text,
            "eos_token": self._eos_text,
            _SINK: sink,
        }
        if tools:
            context["tools"] = tools
        try:
            return self._template.render(**context)
        except TemplateError as exc:
            message = f"The conversation could not be rendered with the model's chat template: {exc}"
            raise invalid_argument(message) from exc


def _message_dict(message: Message) -> dict[str, Any]:
    """A message as Hugging Face chat templates take it."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in message.tool_calls]
    if message.name is not None:
        out["name"] = message.name
    return out


def _inline_tools(messages: list[Message], tools: list[dict[str, Any]] | None) -> list[Message]:
    """The conversation for a template that knows no tools: declarations in the system message, calls in the
    model's text, results in user turns."""
    out: list[Message] = []
    if tools:
        listing = TOOLS_PREAMBLE.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if messages and messages[0].role == "system":
            messages = [Message("system", f"{messages[0].content}\n\n{listing}"), *messages[1:]]
        else:
            messages = [Message("system", listing), *messages]
    for message in messages:
        if message.role == "assistant" and message.tool_calls:
            text = "\n".join([message.content, *map(call_text, message.tool_calls)] if message.content
                             else map(call_text, message.tool_calls))
            out.append(Message("assistant", text))
        elif message.role == "tool":
            block = f"<tool_response>\n{message.content}\n</tool_response>"
            if out and out[-1].role == "user" and out[-1].content.endswith("</tool_response>"):
                out[-1] = Message("user", f"{out[-1].content}\n{block}")
            else:
                out.append(Message("user", block))
        else:
            out.append(message)
    return out
