"""A request's system instruction and turns as typed chat messages, every part checked.

Google's conversation is a list of Contents (role `user`, `model`, or `function` for function results), each a
list of typed Parts. Chat templates take messages in Hugging Face's shape: `system`, `user`, `assistant` with
`tool_calls`, and `tool` for a function's result; model contents in a row are one assistant message (a streamed
answer comes back as a content a chunk). The part types keep their meaning on the way:

- text -> the message's text (thought parts, the model's own reasoning, are left out of the prompt; so is an
  empty text in a model turn, which streams end with);
- functionCall -> a tool call of the model's message;
- functionResponse -> a `tool` message holding the response as JSON;
- executableCode / codeExecutionResult -> ```python and ```output blocks in the text, as the model writes them
  when it runs code (`service/code_execution.py`).

- inlineData / fileData -> the medium's rendering (`service/media.py`): a document's text by page, a transcript
  with times, the text in an image and what it shows, set on the part before the conversation is built.
"""

from __future__ import annotations

import json

from gemserve.errors import invalid_argument
from gemserve.models.chat_format import Message, ToolCall
from gemserve.schema.content import Content, GenerateContentRequest, Part
from gemserve.service.code_execution import code_block, output_block
from gemserve.service.tools import FUNCTION_NAME

ROLES = ("user", "model", "function")


def conversation(request: GenerateContentRequest) -> list[Message]:
    messages: list[Message] = []
    if request.system_instruction is not None:
        text = _system_text(request.system_instruction)
        if text:
            messages.append(Message("system", text))
    if not request.contents:
        raise invalid_argument("* GenerateContentRequest.contents: contents is not specified", "contents")
    for i, content in enumerate(request.contents):
        role = content.role or "user"
        if role not in ROLES:
            raise invalid_argument(
                f"Please use a valid role: user, model. (contents[{i}].role is {content.role!r})",
                f"contents[{i}].role",
            )
        for message in _messages_of(content, role, f"contents[{i}]"):
            if message.role == "assistant" and messages and messages[-1].role == "assistant":
                message = _joined(messages.pop(), message)
            messages.append(message)
    return messages


def _joined(first: Message, second: Message) -> Message:
    """Model contents that follow one another are one turn: a streamed answer sent back as history comes as a
    content a chunk (google-genai's chats keep it so), and the model must see the turn it wrote."""
    calls = first.tool_calls + second.tool_calls
    text = first.content + second.content
    return Message("assistant", text.strip() if calls else text, calls)


def _system_text(content: Content) -> str:
    where = "system_instruction"
    _check_parts(content, where)
    texts = []
    for j, part in enumerate(content.parts):
        if part.text is None:
            raise invalid_argument(f"{where}.parts[{j}]: a system instruction holds text parts only.",
                                   f"{where}.parts[{j}]")
        texts.append(_text(part, f"{where}.parts[{j}]"))
    return "".join(texts)


def _check_parts(content: Content, where: str) -> None:
    if not content.parts:
        raise invalid_argument(f"* GenerateContentRequest.{where}.parts: contents.parts must not be empty.",
                               f"{where}.parts")


def _messages_of(content: Content, role: str, where: str) -> list[Message]:
    """One Content as messages: a model turn is one assistant message; a user turn is a user message, with a
    tool message for each function response, in the order of the parts."""
    _check_parts(content, where)
    texts: list[str] = []
    calls: list[ToolCall] = []
    out: list[Message] = []

    def flush_user_text() -> None:
        if texts:
            out.append(Message("user", "".join(texts)))
            texts.clear()

    for j, part in enumerate(content.parts):
        field = f"{where}.parts[{j}]"
        if part.text is not None:
            if part.thought or (role == "model" and not part.text):
                continue  # an empty text of the model's: the last chunk of a stream, sent back as history
            texts.append(_text(part, field))
        elif part.function_call is not None:
            if role != "model":
                raise invalid_argument(f"{field}.function_call: function calls belong to the model's turns "
                                       f"(role 'model'), not to role '{role}'.", f"{field}.function_call")
            call = part.function_call
            _check_name(call.name, f"{field}.function_call.name")
            calls.append(ToolCall(call.name or "", dict(call.args or {})))
        elif part.function_response is not None:
            if role == "model":
                raise invalid_argument(f"{field}.function_response: function responses belong to the user's "
                                       "turns (role 'user' or 'function'), not to the model's.",
                                       f"{field}.function_response")
            response = part.function_response
            _check_name(response.name, f"{field}.function_response.name")
            flush_user_text()
            body = json.dumps(response.response or {}, ensure_ascii=False)
            out.append(Message("tool", body, name=response.name))
        elif part.executable_code is not None:
            texts.append(code_block(part.executable_code.code or ""))
        elif part.code_execution_result is not None:
            texts.append(output_block(part.code_execution_result.output or ""))
        elif part.inline_data is not None and role == "model":
            continue  # a figure that code made, sent back with the chat: a text model cannot look at it
        elif part.inline_data is not None or part.file_data is not None:
            if part.rendering is None:
                raise invalid_argument(f"{field}: media are not accepted here.", field)
            texts.append(part.rendering.text)
        else:
            raise invalid_argument(f"{field}: a part must contain data (set text, function_call or "
                                   "function_response).", field)
    if role == "model":
        return [Message("assistant", "".join(texts).strip() if calls else "".join(texts), tuple(calls))]
    flush_user_text()
    return out


def _text(part: Part, field: str) -> str:
    if not part.text:
        raise invalid_argument(f"{field}.text: Unable to submit request because it has an empty text "
                               "parameter. Add a value to the parameter and try again.", f"{field}.text")
    return part.text


def _check_name(name: str | None, field: str) -> None:
    # Templates write names into their markup as they are: only a valid name may get there.
    if not name or not FUNCTION_NAME.fullmatch(name):
        raise invalid_argument(f"{field}: Invalid function name {name!r}. Must start with a letter or an "
                               "underscore, and contain only a-z, A-Z, 0-9, underscores, dots, colons and dashes, "
                               "with a maximum length of 64.", field)
