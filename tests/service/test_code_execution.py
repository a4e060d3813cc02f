"""The codeExecution tool in generation: code read out of the model's output, run, and the model continuing after
its output. A scripted model writes the text; a recording sandbox stands in for bubblewrap (the sandbox itself is
tested in tests/sandbox)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from gemserve.errors import ApiError
from gemserve.sandbox.bwrap import DEADLINE_EXCEEDED, FAILED, OK, Execution, SandboxUnavailable
from gemserve.service.code_execution import HINT, MAX_ROUNDS, Code, CodeReader, Forged, Prose
from tests.service.scripted import request_body, run

CODE_TOOL = [{"codeExecution": {}}]


class RecordingSandbox:
    """Answers each run with the next canned execution and records the code it was given."""

    def __init__(self, *executions: Execution, unavailable: str | None = None) -> None:
        self.executions = list(executions)
        self.codes: list[str] = []
        self.unavailable = unavailable

    async def ready(self) -> None:
        if self.unavailable:
            raise SandboxUnavailable(self.unavailable)

    async def run(self, code: str) -> Execution:
        self.codes.append(code)
        return self.executions.pop(0) if self.executions else Execution(OK, "")


def parts_of(response: dict[str, Any]) -> list[dict[str, Any]]:
    return response["candidates"][0]["content"]["parts"]


def test_reader_splits_prose_and_a_block_as_it_streams() -> None:
    reader = CodeReader()
    out: list[Prose | Code | Forged] = []
    for piece in ["Let me compute.\n", "``", "`pyt", "hon\nprint(", "1 + 1)\n", "``", "`\nafter"]:
        out += reader.push(piece)
    assert out == [Prose("Let me compute.\n"), Code("print(1 + 1)")]
    assert reader.closed
    assert reader.push("more") == []
    reader.reopen()
    assert reader.push("The answer is 2.") == [Prose("The answer is 2.")]


def test_reader_leaves_inline_backticks_and_other_languages_as_prose() -> None:
    reader = CodeReader()
    text = "Use `x` here.\n```bash\nls\n```\nand ```python inline``` too"
    out = reader.push(text) + reader.finish()
    assert "".join(p.text for p in out if isinstance(p, Prose)) == text
    assert not any(isinstance(p, Code) for p in out)


def test_reader_treats_an_output_block_the_model_writes_as_forged() -> None:
    reader = CodeReader()
    assert reader.push("The result:\n```output\n42\n```") == [Prose("The result:\n"), Forged()]


def test_unfinished_block_at_the_end_is_prose() -> None:
    reader = CodeReader()
    assert reader.push("```python\nprint(1") == []
    assert reader.finish() == [Prose("```python\nprint(1")]


def test_block_runs_and_the_model_goes_on_after_its_output() -> None:
    sandbox = RecordingSandbox(Execution(OK, "5117\n"))
    script = ["I will compute it.\n```python\nprint(sum(primes))\n```\nIGNORED", "The sum is 5117."]
    response, engine = run(script, request_body(tools=CODE_TOOL), sandbox=sandbox)
    assert sandbox.codes == ["print(sum(primes))"]
    assert parts_of(response) == [
        {"text": "I will compute it.\n"},
        {"executableCode": {"language": "PYTHON", "code": "print(sum(primes))"}},
        {"codeExecutionResult": {"outcome": "OUTCOME_OK", "output": "5117\n"}},
        {"text": "The sum is 5117."},
    ]
    assert response["candidates"][0]["finishReason"] == "STOP"
    first, continuation = engine.prompts
    written = engine.detokenize(continuation[len(first):])
    # The model goes on from its own tokens up to the closing fence, then the output block; nothing after it.
    assert written == "I will compute it.\n```python\nprint(sum(primes))\n```\n```output\n5117\n```\n"
    usage = response["usageMetadata"]
    assert usage["toolUsePromptTokenCount"] == len("\n```output\n5117\n```\n")  # one byte a token here
    assert usage["totalTokenCount"] == (usage["promptTokenCount"] + usage["candidatesTokenCount"]
                                        + usage["toolUsePromptTokenCount"])


def test_the_system_message_says_how_to_run_code() -> None:
    sandbox = RecordingSandbox()
    _, engine = run("Hi.", request_body(tools=CODE_TOOL), sandbox=sandbox)
    assert HINT in engine.detokenize(engine.prompts[0])
    _, plain = run("Hi.", request_body())
    assert HINT not in plain.detokenize(plain.prompts[0])


def test_failure_traceback_and_figures_come_back() -> None:
    png = b"\x89PNG\r\n\x1a\nfake"
    sandbox = RecordingSandbox(Execution(FAILED, "Traceback ...\nZeroDivisionError: division by zero\n"),
                               Execution(OK, "", (png,)))
    script = ["```python\n1/0\n```", "Oops.\n```python\nplot()\n```", "Done."]
    response, _ = run(script, request_body(tools=CODE_TOOL), sandbox=sandbox)
    parts = parts_of(response)
    assert parts[1] == {"codeExecutionResult": {"outcome": "OUTCOME_FAILED",
                                                "output": "Traceback ...\nZeroDivisionError: division by zero\n"}}
    assert parts[3] == {"executableCode": {"language": "PYTHON", "code": "plot()"}}
    assert parts[4] == {"codeExecutionResult": {"outcome": "OUTCOME_OK"}}
    assert parts[5] == {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(png).decode()}}
    assert parts[6] == {"text": "Done."}


def test_deadline_outcome_is_reported() -> None:
    sandbox = RecordingSandbox(Execution(DEADLINE_EXCEEDED, "[the code ran past its time limit and was stopped]"))
    response, _ = run(["```python\nwhile True: pass\n```", "It took too long."], request_body(tools=CODE_TOOL),
                      sandbox=sandbox)
    assert parts_of(response)[1]["codeExecutionResult"]["outcome"] == "OUTCOME_DEADLINE_EXCEEDED"


def test_a_repeated_block_is_not_run_again_and_ends_the_answer() -> None:
    sandbox = RecordingSandbox(Execution(FAILED, "NameError\n"))
    block = "```python\nprint(x)\n```"
    response, _ = run([block, f"Let me retry.\n{block}", "never"], request_body(tools=CODE_TOOL), sandbox=sandbox)
    assert sandbox.codes == ["print(x)"]
    assert parts_of(response)[-1] == {"text": "Let me retry.\n"}
    assert response["candidates"][0]["finishReason"] == "STOP"


def test_rounds_are_bounded() -> None:
    sandbox = RecordingSandbox()
    script = [f"```python\nprint({i})\n```" for i in range(MAX_ROUNDS + 3)]
    response, _ = run(script, request_body(tools=CODE_TOOL), sandbox=sandbox)
    assert len(sandbox.codes) == MAX_ROUNDS
    assert sum("executableCode" in p for p in parts_of(response)) == MAX_ROUNDS


def test_output_the_model_makes_up_is_cut() -> None:
    response, _ = run("The answer:\n```output\n42\n```\nso 42.", request_body(tools=CODE_TOOL),
                      sandbox=RecordingSandbox())
    assert parts_of(response) == [{"text": "The answer:\n"}]
    assert response["candidates"][0]["finishReason"] == "STOP"


def test_streaming_delivers_each_part_when_it_exists() -> None:
    sandbox = RecordingSandbox(Execution(OK, "4\n"))
    chunks, _ = run(["Compute:\n```python\nprint(2 + 2)\n```", "It is 4."], request_body(tools=CODE_TOOL),
                    sandbox=sandbox, stream=True)
    kinds = [next(iter(p)) for c in chunks for p in c["candidates"][0]["content"]["parts"]]
    assert kinds.index("executableCode") < kinds.index("codeExecutionResult")
    after = kinds[kinds.index("codeExecutionResult") + 1:]
    assert after and set(after) == {"text"}
    # The result is a chunk of its own: it goes out when the run ends, before the model writes again.
    result_chunk = next(c for c in chunks if "codeExecutionResult" in c["candidates"][0]["content"]["parts"][0])
    assert len(result_chunk["candidates"][0]["content"]["parts"]) == 1
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"


def test_function_calls_and_code_in_one_request() -> None:
    sandbox = RecordingSandbox(Execution(OK, "3\n"))
    tools = [{"codeExecution": {}}, {"functionDeclarations": [
        {"name": "get_time", "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"}}}}]}]
    script = ["```python\nprint(1 + 2)\n```", '<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n'
                                               "</tool_call>"]
    response, _ = run(script, request_body(tools=tools), sandbox=sandbox)
    parts = parts_of(response)
    assert parts[0] == {"executableCode": {"language": "PYTHON", "code": "print(1 + 2)"}}
    assert parts[1] == {"codeExecutionResult": {"outcome": "OUTCOME_OK", "output": "3\n"}}
    assert parts[2] == {"functionCall": {"name": "get_time", "args": {"city": "Oslo"}}}


def test_history_with_code_parts_renders_back_as_blocks() -> None:
    body = {"contents": [
        {"role": "user", "parts": [{"text": "Sum 1..10"}]},
        {"role": "model", "parts": [{"text": "Computing."},
                                    {"executableCode": {"language": "PYTHON", "code": "print(sum(range(11)))"}},
                                    {"codeExecutionResult": {"outcome": "OUTCOME_OK", "output": "55"}},
                                    {"text": "It is 55."}]},
        {"role": "user", "parts": [{"text": "Double it"}]},
    ], "tools": CODE_TOOL}
    _, engine = run("110", body, sandbox=RecordingSandbox())
    prompt = engine.detokenize(engine.prompts[0])
    assert "Computing.\n```python\nprint(sum(range(11)))\n```\n```output\n55\n```\nIt is 55." in prompt


@pytest.mark.parametrize("tools", [[{"code_execution": {}}], [{"codeExecution": {}}]])
def test_both_spellings_of_the_tool(tools: list[dict[str, Any]]) -> None:
    sandbox = RecordingSandbox(Execution(OK, "1\n"))
    run(["```python\nprint(1)\n```", "1"], request_body(tools=tools), sandbox=sandbox)
    assert sandbox.codes == ["print(1)"]


def test_unavailable_sandbox_fails_closed_naming_what_is_missing() -> None:
    sandbox = RecordingSandbox(unavailable="bubblewrap (bwrap) is not installed")
    with pytest.raises(ApiError) as caught:
        run("x", request_body(tools=CODE_TOOL), sandbox=sandbox)
    assert caught.value.status == "FAILED_PRECONDITION" and caught.value.code == 400
    assert "bubblewrap (bwrap) is not installed" in caught.value.message
    with pytest.raises(ApiError) as without:
        run("x", request_body(tools=CODE_TOOL))
    assert without.value.status == "FAILED_PRECONDITION"
    # Requests without the tool do not need the sandbox.
    response, _ = run("fine", request_body(), sandbox=sandbox)
    assert parts_of(response) == [{"text": "fine"}]


def test_code_execution_with_a_json_answer_is_a_400() -> None:
    with pytest.raises(ApiError) as caught:
        run("{}", request_body(tools=CODE_TOOL, generationConfig={"responseMimeType": "application/json"}),
            sandbox=RecordingSandbox())
    assert caught.value.code == 400 and "tools[0].code_execution" in caught.value.message


def test_no_room_left_after_a_run_ends_with_max_tokens() -> None:
    sandbox = RecordingSandbox(Execution(OK, "1\n"))
    block = "```python\nprint(1)\n```"
    response, engine = run([block, "never"], request_body(tools=CODE_TOOL,
                                                          generationConfig={"maxOutputTokens": len(block)}),
                           sandbox=sandbox)
    assert response["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert len(engine.prompts) == 1
    assert parts_of(response)[-1]["codeExecutionResult"]["output"] == "1\n"


def test_a_call_written_as_bare_json_after_a_run_is_a_call() -> None:
    sandbox = RecordingSandbox(Execution(OK, "3\n"))
    tools = [{"codeExecution": {}}, {"functionDeclarations": [
        {"name": "get_time", "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"}}}}]}]
    script = ["```python\nprint(1 + 2)\n```", '{"name": "get_time", "arguments": {"city": "Oslo"}}']
    response, _ = run(script, request_body(tools=tools), sandbox=sandbox)
    assert parts_of(response)[-1] == {"functionCall": {"name": "get_time", "args": {"city": "Oslo"}}}


def test_a_sandbox_that_cannot_start_a_run_is_a_503_not_a_500() -> None:
    class Broken(RecordingSandbox):
        async def run(self, code: str) -> Execution:
            raise SandboxUnavailable("the sandbox could not be started: [Errno 11] Resource temporarily unavailable")

    with pytest.raises(ApiError) as caught:
        run(["```python\nprint(1)\n```", "x"], request_body(tools=CODE_TOOL), sandbox=Broken())
    assert caught.value.status == "UNAVAILABLE" and "Resource temporarily unavailable" in caught.value.message


def test_a_chat_sends_back_figures_and_ids_as_the_response_had_them() -> None:
    png = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
    body = {"contents": [
        {"role": "user", "parts": [{"text": "Plot x squared"}]},
        {"role": "model", "parts": [{"executableCode": {"id": "c1", "language": "PYTHON", "code": "plot()"}},
                                    {"codeExecutionResult": {"id": "c1", "outcome": "OUTCOME_OK"}},
                                    {"inlineData": {"mimeType": "image/png", "data": png}},
                                    {"text": "Here it is."}]},
        {"role": "user", "parts": [{"text": "Thanks"}]},
    ], "tools": CODE_TOOL}
    response, engine = run("You are welcome.", body, sandbox=RecordingSandbox())
    assert parts_of(response) == [{"text": "You are welcome."}]
    assert "```python\nplot()\n```\n```output\n\n```\nHere it is." in engine.detokenize(engine.prompts[0])
