"""The codeExecution tool: how the model is told it can run Python, how its code is read out of its output, and
how a run's result goes back to it.

The format is markdown, which code models write anyway (docs/code-execution.md):

    ```python
    print(sum(primes[:50]))
    ```
    ```output
    5117
    ```

The system message says that a ```python block is run as soon as it ends and that its output follows in an
```output block. When the model closes a python block, its generation is cut there; the code runs in the
sandbox (`sandbox/bwrap.py`); the model's turn goes on from its own tokens plus the output block. A request runs
at most `MAX_ROUNDS` blocks per candidate; later blocks stay text. History renders the same way
(`service/conversation.py`), so a chat that continues shows the model what it ran before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gemserve.errors import invalid_argument
from gemserve.schema.content import GenerateContentRequest
from gemserve.service.constraints import Answer

MAX_ROUNDS = 5
OPENERS = ("```python\n", "```py\n", "```Python\n")
OUTPUT_OPENER = "```output\n"
CLOSER = "\n```"
_ALL_OPENERS = (*OPENERS, OUTPUT_OPENER)
_OPENER = re.compile("|".join(f"(?:^|(?<=\n)){re.escape(o)}" for o in _ALL_OPENERS))
HINT = ("You can run Python code: write it in a ```python code block, and it runs as soon as the block ends "
        "(numpy, sympy, pandas and matplotlib are installed; there is no network). Its output is then shown to "
        "you in an ```output block. Use print() to show results, and use the output in your answer.")


def code_block(code: str) -> str:
    return f"\n```python\n{code}\n```\n"


def output_block(output: str) -> str:
    return f"```output\n{output.rstrip()}\n```\n"


def wants_code_execution(request: GenerateContentRequest, answer: Answer) -> bool:
    """Whether the request offers the codeExecution tool (checked: it cannot be combined with a fixed answer
    form, which leaves the model no room to write code)."""
    where = next((i for i, tool in enumerate(request.tools or []) if tool.code_execution is not None), None)
    if where is None:
        return False
    if not answer.free:
        raise invalid_argument(f"tools[{where}].code_execution: code execution cannot be combined with a JSON or "
                               "enum response (generation_config.response_mime_type) on this server.",
                               f"tools[{where}].code_execution")
    return True


@dataclass(frozen=True)
class Code:
    code: str


@dataclass(frozen=True)
class Prose:
    text: str


@dataclass(frozen=True)
class Forged:
    """The model began an output block itself: it would make up what its code printed."""


class CodeReader:
    """Splits streamed text into prose and python blocks. Prose goes out as it becomes final; a block goes out
    whole when its closing fence arrives, and nothing after it (the generation is cut there). An output block
    the model opens itself ends the reading with `Forged`."""

    def __init__(self) -> None:
        self._pending = ""
        self._in_code = False
        self.closed = False  # a block ended (or output was forged): nothing more is read until `reopen`

    def push(self, text: str) -> list[Prose | Code | Forged]:
        if self.closed:
            return []
        self._pending += text
        out: list[Prose | Code | Forged] = []
        if not self._in_code:
            start, opener = _find_opener(self._pending)
            if start < 0:
                cut = len(self._pending) - _partial_opener(self._pending)
                if cut > 0:
                    out.append(Prose(self._pending[:cut]))
                    self._pending = self._pending[cut:]
                return out
            if start > 0:
                out.append(Prose(self._pending[:start]))
            self._pending = self._pending[start + len(opener):]
            if opener == OUTPUT_OPENER:
                self._pending = ""
                self.closed = True
                return [*out, Forged()]
            self._in_code = True
        end = ("\n" + self._pending).find(CLOSER)
        if end >= 0:
            out.append(Code(self._pending[:max(end - 1, 0)]))
            self._pending = ""
            self._in_code = False
            self.closed = True
        return out

    def finish(self) -> list[Prose]:
        """What is held back, as prose: at the end of the generation, or before a function call. An unfinished
        block is prose too (it never ran)."""
        if self.closed or not (self._pending or self._in_code):
            return []
        text, self._pending = self._pending, ""
        opened, self._in_code = self._in_code, False
        return [Prose(f"```python\n{text}" if opened else text)]

    def reopen(self) -> None:
        """After a block ran, the continuation is read afresh."""
        self.closed = False


def _find_opener(text: str) -> tuple[int, str]:
    """The first fence at the start of a line that opens a python (or output) block, and which one."""
    found = _OPENER.search(text)
    return (found.start(), found.group()) if found else (-1, "")


def _partial_opener(text: str) -> int:
    """Length of the end of `text` that could still grow into an opening fence at a line start."""
    for size in range(min(max(map(len, _ALL_OPENERS)) - 1, len(text)), 0, -1):
        tail = text[-size:]
        if any(opener.startswith(tail) for opener in _ALL_OPENERS) and (size == len(text) or text[-size - 1] == "\n"):
            return size
    return 0
