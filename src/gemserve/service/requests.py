"""Checking a GenerateContentRequest and turning it into a plan the engine can run.

Everything a client can get wrong is caught here with a 400 naming the field, before any engine work: roles and
parts (`service/conversation.py`), tools (`service/tools.py`), the answer format (`service/constraints.py`),
features this server does not offer yet, generation parameters out of range, a prompt longer than the model's
window. What is accepted becomes a `GenerationPlan`: prompt tokens plus per-candidate engine requests, each with
its own compiled constraint when the output has a required form.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, replace

from gemserve.engine.constraints import Constraint, ConstraintError
from gemserve.engine.types import GenerationRequest, SamplingParams
from gemserve.errors import ApiError, invalid_argument
from gemserve.models.chat_format import Message
from gemserve.models.registry import ServedModel
from gemserve.safety.policy import safety_policy
from gemserve.sandbox.bwrap import Sandbox, SandboxUnavailable
from gemserve.schema.content import GenerateContentRequest, GenerationConfig
from gemserve.schema.wire import collector_paused
from gemserve.service import code_execution
from gemserve.service.constraints import FREE_TEXT, Answer, answer_format, answer_hint, grammar
from gemserve.service.conversation import conversation
from gemserve.service.safety import Guard
from gemserve.service.tools import ToolPlan, answered_calls, tool_plan
from gemserve.service.tuned_models import Usable

MAX_STOP_SEQUENCES = 5
RETRY_HINT = "Answer the user's question in plain words, using the results above."
MAX_CANDIDATES = 8
MAX_LOGPROBS = 20
PENALTY_RANGE = 2.0


@dataclass(frozen=True)
class Defaults:
    """Sampling defaults of what the request names: a model's, or a tuned model's own."""

    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float = 1.0  # the model's own, never a request's


@dataclass(frozen=True)
class Target:
    """What a request generates with: a served base model, maybe a LoRA adapter on it, and what to call it."""

    model: ServedModel
    version: str  # the modelVersion responses report
    defaults: Defaults
    adapter: str | None = None
    scope: str | None = None  # the caller's owner id: computed prefixes are shared only within it


def base_target(model: ServedModel) -> Target:
    spec = model.spec
    return Target(model, spec.id, Defaults(spec.temperature, spec.top_p, spec.top_k, spec.repetition_penalty))


def tuned_target(model: ServedModel, tuned: Usable, scope: str) -> Target:
    """A tuned model on its base `model`: its own sampling defaults, the base model's where it set none."""
    spec = model.spec
    defaults = Defaults(spec.temperature if tuned.temperature is None else tuned.temperature,
                        spec.top_p if tuned.top_p is None else tuned.top_p,
                        spec.top_k if tuned.top_k is None else tuned.top_k, spec.repetition_penalty)
    return Target(model, tuned.name, defaults, str(tuned.adapter), scope=scope)


@dataclass(frozen=True)
class GenerationPlan:
    model: ServedModel
    version: str
    prompt: tuple[int, ...]
    candidates: tuple[GenerationRequest, ...]
    stop_sequences: tuple[str, ...]
    logprobs: int | None  # None: no logprobs in the response
    reads_calls: bool = False  # the output may hold function calls, to be returned as functionCall parts
    bare_calls: bool = False  # output beginning with "{" is calls (the answer is not JSON itself)
    answered: frozenset[str] = frozenset()  # calls (tools.call_key) the conversation holds the results of
    retries: tuple[GenerationRequest, ...] = ()  # per candidate: the same with calls ruled out
    cached_tokens: int = 0  # prompt tokens that come from the cachedContent the request names
    sandbox: Sandbox | None = None  # set when the model may run code (the codeExecution tool)
    rules: str | None = None  # the grammar the candidates' constraints were compiled from
    retry_rules: str | None = None  # and the retries' (calls ruled out)
    prompt_details: tuple[tuple[str, int], ...] = ()  # prompt tokens per modality (promptTokensDetails)
    safety: Guard | None = None  # set when the request's safety settings rate anything (service/safety.py)


def check_unsupported(request: GenerateContentRequest) -> None:
    """Reject features this server does not offer yet, rather than silently answering without them."""
    if request.cached_content:  # one the route resolves is gone from the request by now
        raise invalid_argument("cached_content: a cachedContent can only be used with the base model it was "
                               "created for, not with a tuned model.", "cached_content")
    safety_policy(request.safety_settings)  # checked: a 400 names a bad setting
    config = request.generation_config
    if config is None:
        return
    if config.response_modalities and set(config.response_modalities) != {"TEXT"}:
        raise invalid_argument("generation_config.response_modalities: this model only produces TEXT.",
                               "generation_config.response_modalities")


def _check_range(value: float | None, name: str, low: float, high: float) -> None:
    if value is None:
        return
    if not math.isfinite(value) or not low <= value <= high:
        raise invalid_argument(f"generation_config.{name}: {value} is out of range; it must be between {low} "
                               f"and {high} (inclusive).", f"generation_config.{name}")


def sampling_settings(config: GenerationConfig | None, target: Target) -> tuple[SamplingParams, int, int | None]:
    """(sampling parameters, candidate count, logprobs setting) from a request's generation config."""
    config = config or GenerationConfig()
    spec = target.model.spec
    defaults = target.defaults
    _check_range(config.temperature, "temperature", 0.0, spec.max_temperature)
    _check_range(config.top_p, "top_p", 0.0, 1.0)
    _check_range(config.presence_penalty, "presence_penalty", -PENALTY_RANGE, PENALTY_RANGE)
    _check_range(config.frequency_penalty, "frequency_penalty", -PENALTY_RANGE, PENALTY_RANGE)
    if config.top_k is not None and config.top_k < 1:
        raise invalid_argument(f"generation_config.top_k: {config.top_k} is invalid; it must be a positive "
                               "integer.", "generation_config.top_k")
    count = 1 if config.candidate_count is None else config.candidate_count
    if not 1 <= count <= MAX_CANDIDATES:
        raise invalid_argument(f"generation_config.candidate_count: {count} is out of range; it must be between 1 "
                               f"and {MAX_CANDIDATES}.", "generation_config.candidate_count")
    logprobs: int | None = None
    if config.logprobs is not None and not config.response_logprobs:
        raise invalid_argument("generation_config.logprobs: logprobs is only valid if response_logprobs is true.",
                               "generation_config.logprobs")
    if config.response_logprobs:
        logprobs = config.logprobs or 0
        if not 0 <= logprobs <= MAX_LOGPROBS:
            raise invalid_argument(f"generation_config.logprobs: {logprobs} is out of range; it must be between 0 "
                                   f"and {MAX_LOGPROBS}.", "generation_config.logprobs")
    if config.seed is not None and not -(2**31) <= config.seed < 2**31:
        raise invalid_argument("generation_config.seed: must be a 32-bit integer.", "generation_config.seed")
    params = SamplingParams(
        temperature=defaults.temperature if config.temperature is None else config.temperature,
        top_p=defaults.top_p if config.top_p is None else config.top_p,
        top_k=defaults.top_k if config.top_k is None else config.top_k,
        presence_penalty=config.presence_penalty or 0.0,
        frequency_penalty=config.frequency_penalty or 0.0,
        seed=config.seed,
        logprobs=logprobs,
        repetition_penalty=defaults.repetition_penalty,
    )
    return params, count, logprobs


def stop_sequences(config: GenerationConfig | None) -> tuple[str, ...]:
    stops = tuple((config.stop_sequences if config else None) or ())
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid_argument(f"generation_config.stop_sequences: at most {MAX_STOP_SEQUENCES} stop sequences are "
                               f"allowed, got {len(stops)}.", "generation_config.stop_sequences")
    for i, stop in enumerate(stops):
        if not stop:
            raise invalid_argument(f"generation_config.stop_sequences[{i}]: a stop sequence must not be empty.",
                                   f"generation_config.stop_sequences[{i}]")
    return stops


def prompt_tokens(model: ServedModel, messages: list[Message], tools: ToolPlan | None = None) -> list[int]:
    engine = model.engine
    bos = engine.tokenize("", add_bos=True, parse_special=False)

    def tokenize(text: str, special: bool) -> list[int]:
        return engine.tokenize(text, add_bos=False, parse_special=special)

    # Mode NONE still shows the declarations, as Google's models still see them; the grammar forbids calls.
    shown = tools.template_tools() if tools is not None else None
    return model.chat.prompt_ids(messages, tokenize, bos[0] if bos else None, shown)


@dataclass(frozen=True)
class Prompt:
    tokens: list[int]
    tools: ToolPlan | None
    answer: Answer
    messages: list[Message]
    code_execution: bool = False
    details: tuple[tuple[str, int], ...] = ()  # tokens per modality: media parts' renderings, and TEXT the rest
    largest_media: tuple[str, int] | None = None  # the media part whose rendering takes most tokens, and how many


def request_prompt(model: ServedModel, request: GenerateContentRequest) -> Prompt:
    """The prompt tokens of a request (its tools and the answer's form included), every part of it checked."""
    with collector_paused():  # a long conversation makes many objects, and full collections stall the loop
        return _request_prompt(model, request)


def _request_prompt(model: ServedModel, request: GenerateContentRequest) -> Prompt:
    check_unsupported(request)
    answer = answer_format(request.generation_config)
    tools = tool_plan(request)
    code = code_execution.wants_code_execution(request, answer)
    messages = conversation(request)
    for hint in (answer_hint(answer), code_execution.HINT if code else None):
        if hint is None:
            continue
        if messages[0].role == "system":
            messages[0] = Message("system", f"{messages[0].content}\n\n{hint}")
        else:
            messages.insert(0, Message("system", hint))
    tokens = prompt_tokens(model, messages, tools)
    details, largest = modality_counts(model, request, len(tokens))
    return Prompt(tokens, tools, answer, messages, code, details, largest)


def modality_counts(model: ServedModel, request: GenerateContentRequest,
                    total: int) -> tuple[tuple[tuple[str, int], ...], tuple[str, int] | None]:
    """Prompt tokens per modality (each media part's rendering counted alone, the rest TEXT), and the media part
    whose rendering takes most of them, with its count."""
    counts: dict[str, int] = {}
    largest: tuple[str, int] | None = None
    for i, content in enumerate(request.contents):
        for j, part in enumerate(content.parts):
            if part.rendering is None:
                continue
            n = len(model.engine.tokenize(part.rendering.text, add_bos=False, parse_special=False))
            if largest is None or n > largest[1]:
                largest = f"contents[{i}].parts[{j}]", n
            if part.rendering.modality != "TEXT":  # text files count as TEXT
                counts[part.rendering.modality] = counts.get(part.rendering.modality, 0) + n
    media = sum(counts.values())
    return (("TEXT", max(0, total - media)), *sorted(counts.items())), largest


async def plan_generation(target: Target, request: GenerateContentRequest, cached_tokens: int = 0,
                          sandbox: Sandbox | None = None) -> GenerationPlan:
    model = target.model
    config = request.generation_config
    parts = sum(len(c.parts) for c in request.contents)
    if parts >= model.input_token_limit:  # every part takes a token at least: no need to render them to know
        raise invalid_argument(f"The input token count (at least {parts}) exceeds the maximum number of tokens "
                               f"allowed ({model.input_token_limit}).", "contents")
    built = await asyncio.to_thread(request_prompt, model, request)  # templates and tokenizing: off the loop
    prompt, tools, answer = built.tokens, built.tools, built.answer
    if built.code_execution:
        sandbox = await _usable(sandbox)
    params, count, logprobs = sampling_settings(config, target)
    stops = stop_sequences(config)
    limit = model.input_token_limit
    if len(prompt) >= limit:
        message = f"The input token count ({len(prompt)}) exceeds the maximum number of tokens allowed ({limit})."
        if built.largest_media is not None:  # say which medium made it too long
            part, tokens = built.largest_media
            raise invalid_argument(f"{part}: {message} This part's contents take {tokens} tokens (docs/media.md).",
                                   part)
        raise invalid_argument(message, "contents")
    if count * (len(prompt) + 1) > limit:
        raise invalid_argument(f"generation_config.candidate_count: {count} candidates of a {len(prompt)}-token "
                               f"prompt do not fit the model's context of {limit} tokens.",
                               "generation_config.candidate_count")
    requested = config.max_output_tokens if config else None  # 0 is proto3's "unset"
    if requested is not None and not 0 <= requested <= model.output_token_limit:
        raise invalid_argument(f"generation_config.max_output_tokens: {requested} is out of range; it must be "
                               f"between 1 and {model.output_token_limit}.", "generation_config.max_output_tokens")
    max_new = min(requested or model.output_token_limit, limit - len(prompt))
    rules = grammar(answer, tools, model.special_call_tags)
    constraints: list[Constraint | None] = [None] * count
    if rules is not None:
        constraints = await _compile(model, rules, count, answer_field(request, tools))
    candidates = tuple(
        GenerationRequest(
            prompt=tuple(prompt),
            # Each candidate draws from its own stream: seed, seed + 1, ... keeps the whole answer reproducible.
            sampling=params if params.seed is None else replace(params, seed=params.seed + i),
            max_new_tokens=max_new,
            adapter=target.adapter,
            constraint=constraints[i],
            scope=target.scope,
        )
        for i in range(count)
    )
    reads_calls = tools is not None and tools.may_call
    # Mode ANY must call: a repeated call is an answer there, and no second attempt could do better.
    answered = answered_calls(request) if reads_calls and tools is not None and tools.mode != "ANY" else frozenset()
    retries: tuple[GenerationRequest, ...] = ()
    text_only: str | None = None
    if answered and tools is not None:
        # The model answers from the results, told so at the end of the conversation: the prompt begins as the
        # first attempt's did, so the engine reuses that attempt's cache.
        text_only = FREE_TEXT if answer.free else grammar(answer, None, model.special_call_tags)
        assert text_only is not None
        constraints = await _compile(model, text_only, count, "tools")
        hinted = tuple(prompt_tokens(model, [*built.messages, Message("system", RETRY_HINT)], tools))
        retries = tuple(replace(c, prompt=hinted, constraint=constraints[i]) for i, c in enumerate(candidates))
    bare_calls = reads_calls and (answer.free or (tools is not None and tools.mode == "ANY"))
    return GenerationPlan(model, target.version, tuple(prompt), candidates, stops, logprobs, reads_calls,
                          bare_calls, answered, retries, cached_tokens,
                          sandbox if built.code_execution else None, rules, text_only, tuple(built.details))


async def _usable(sandbox: Sandbox | None) -> Sandbox:
    """The sandbox, checked; code execution fails closed with a 400 naming what is missing."""
    try:
        if sandbox is None:
            raise SandboxUnavailable("this server was started without a sandbox.")
        await sandbox.ready()
    except SandboxUnavailable as exc:
        raise ApiError("FAILED_PRECONDITION", f"tools.code_execution: code execution is not available on this "
                       f"server: {exc}") from None
    return sandbox


def answer_field(request: GenerateContentRequest, tools: ToolPlan | None) -> str:
    """The field a grammar that does not compile is blamed on."""
    if tools is not None and tools.may_call:
        return "tools"
    config = request.generation_config
    if config is not None and config.response_json_schema is not None:
        return "generation_config.response_json_schema"
    return "generation_config.response_schema"


async def _compile(model: ServedModel, rules: str, count: int, field: str) -> list[Constraint | None]:
    """One constraint per candidate, compiled in a worker thread (the first one waits for the vocabulary)."""

    def compile_all() -> list[Constraint | None]:
        return [model.engine.compile_grammar(rules) for _ in range(count)]

    try:
        return await asyncio.to_thread(compile_all)
    except ConstraintError as exc:
        raise invalid_argument(f"{field}: the schema cannot be enforced: {exc}", field) from None
