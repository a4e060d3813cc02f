"""Generation benchmark: gemserve over HTTP against llama-cpp-python in process, for one built-in model.

The server is started as the README's serve command starts it, with every default model loaded; `--model` picks
the one measured (models/gemma-3-270m by default), and the baseline loads that model's own GGUF file from the
server's data dir.

What one run measures (greedy decoding, temperature 0, on the same GGUF file and the same prompt tokens):

gemserve, a `gemserve serve` process this script starts on a free port of 127.0.0.1 and stops at the end:
  - start-up: from launching the process (model already assembled in the data dir) until GET /v1beta/models
    answers, and until the first token of a streamed request arrives (median of --runs cold starts);
  - single-stream decode tokens/s: streamGenerateContent?alt=sse with maxOutputTokens=128; the rate is
    (candidatesTokenCount - 1) / (time from the first to the last streamed chunk), median of --runs;
  - time to first token of a ~1000-token prompt (request sent -> first SSE chunk), median of --runs;
  - aggregate tokens/s of 8 concurrent streams of 128 tokens: all tokens produced divided by the time from
    sending the requests to the last chunk of the last stream (prompt processing included);
  - decode tokens/s under a JSON schema (responseMimeType application/json with a responseSchema), as the
    single-stream decode is measured, alternating with it: the ratio is the cost of constrained decoding; and
    under a second schema whose answer is mostly new prose (the first one's answer may repeat itself, which
    prompt lookup turns into several tokens a pass, as it does the free essay);
  - peak RSS of the server process (VmHWM in /proc/<pid>/status), read before it is stopped.

llama-cpp-python in this process, `Llama(n_ctx=4096, n_threads=2)`, as the baseline, and the same with
`flash_attn=True` (llama-cpp-python turns flash attention off by default; gemserve keeps llama.cpp's "auto"):
  - decode tokens/s: `Llama.generate` (token ids, greedy) until 128 tokens or an end-of-generation token;
    (tokens - 1) / (time from the first to the last token), median of --runs;
  - time to first token of the same ~1000-token prompt: `create_completion(stream=True)`, first chunk.

Decode and time-to-first-token runs alternate between gemserve and llama-cpp-python (the server idles while
the baseline runs), so background load on a shared machine hits both sides alike; the report also says how
much CPU other processes took during the run. Rates come from the tokens actually produced: a run that ends
early at an end-of-turn token is reported with its count. The prompt is rendered with gemserve's own chat
format (the model's chat template) so both sides decode the same token ids; the script checks the counts agree.
The baseline's KV cache is cleared before every run; gemserve's prefix reuse is defeated for the long
prompt by a run number at its start (the short decode prompt is reused, which only saves prefill time, outside
the decode window).

    python benchmarks/generation.py [--model qwen2.5-coder-0.5b-instruct] [--data-dir DIR] [--output F.md]
                                    [--runs 3] [--timeout 1500]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import httpx

GGUF_FILES = {"gemma-3-270m": "gemma-3-270m-q4_k_m.gguf",
              "qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"}
MODEL = "models/gemma-3-270m"  # set by --model
GGUF_NAME = GGUF_FILES["gemma-3-270m"]
NEW_TOKENS = 128
CONCURRENCY = 8
TTFT_NEW_TOKENS = 4
BASELINE_CONTEXT = 4096
BASELINE_THREADS = 2
START_TIMEOUT_S = 300.0  # the warm-up start may assemble the model (hashing 250 MB)
REQUEST_TIMEOUT_S = 300.0
POLL_INTERVAL_S = 0.02

# Greedy decoding of it runs to the 128-token limit with each built-in model (an instruction-tuned model answers
# a bare sentence to continue in a few words).
DECODE_PROMPT = "Write a long essay on the history of the printing press, from Gutenberg to the present day."
JSON_PROMPT = ("Describe the history of the printing press as a list of ten events, each with its year, place, "
               "the people involved and a detailed description.")
JSON_SCHEMA = {"type": "ARRAY", "items": {"type": "OBJECT", "properties": {
    "year": {"type": "INTEGER"}, "place": {"type": "STRING"}, "people": {"type": "ARRAY", "items": {"type": "STRING"}},
    "description": {"type": "STRING"}}, "required": ["year", "place", "people", "description"]}}
# A second schema whose answers are largely new prose (the first one's answer may repeat itself, which prompt lookup
# turns into several tokens a pass): decode under it against free decode is the harder figure. (Five inventors
# with long descriptions, tried first, Gemma 3 270M answered in 41 tokens over HTTP.)
PROSE_JSON_PROMPT = "Explain how a steam engine works, in detail. Answer as JSON with a topic and an explanation."
PROSE_JSON_SCHEMA = {"type": "OBJECT", "properties": {"topic": {"type": "STRING"}, "explanation": {"type": "STRING"}},
                     "required": ["topic", "explanation"]}

_LONG_PARAGRAPHS = (
    "Before the printing press, books in Europe were copied by hand, most often by monks working in the "
    "scriptoria of monasteries. A single Bible could take a scribe more than a year to complete, and the "
    "materials alone, parchment made from the skins of hundreds of animals, made every volume a costly "
    "object. Universities created a system of rented exemplars, divided into sections called peciae, so that "
    "students and stationers could copy parts of a text at the same time, yet books remained scarce and "
    "errors multiplied with every copy.",
    "Johannes Gutenberg, a goldsmith from Mainz, combined several existing technologies into a new system. "
    "He designed a hand mould that could cast large numbers of identical metal letters, developed an alloy "
    "of lead, tin and antimony that melted at a low temperature and cooled quickly, adapted the screw press "
    "used for wine and paper making, and prepared an oil-based ink that would cling to metal type. Around "
    "1455 his workshop finished the Bible that now bears his name, in an edition of perhaps one hundred and "
    "eighty copies.",
    "The new craft spread with remarkable speed. By 1500 presses were working in more than two hundred "
    "and fifty towns across Europe, and they had produced millions of copies of tens of thousands of "
    "editions. Venice became the capital of the trade, where Aldus Manutius published small, portable "
    "editions of the classics in italic type. Prices fell, literacy slowly rose, and printed pamphlets "
    "carried the arguments of the Reformation further and faster than any preacher could travel.",
)
# About 1000 tokens once rendered with the chat format (the script reports the exact count).
_LONG_TEXT = (
    "Notes for a lecture on the history of printing, prepared for first-year students of European history. "
    "The lecture returns to the same three themes several times, so that listeners who arrive late or lose "
    "the thread can follow the argument: the world of manuscripts, the invention itself, and its spread.\n\n"
    + "\n\n".join(_LONG_PARAGRAPHS * 3)
    + "\n\nIn summary, the printing press"
)


def long_prompt(run: int) -> str:
    """The ~1000-token prompt of one run. gemserve keeps finished sequences' caches and reuses a shared prefix
    of 8 tokens or more; the run number right after the chat turn's 4 opening tokens makes every run compute
    its whole prompt."""
    return f"{run + 1}. {_LONG_TEXT}"


# ---- small helpers -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peak_rss_mib(pid: int | str) -> float:
    """VmHWM (peak resident set size) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def model_cached(data_dir: Path) -> bool:
    """True when the server will reuse the assembled model (file and its verification marker agree)."""
    target = data_dir / "models" / GGUF_NAME
    marker = target.with_suffix(".verified.json")
    if not (target.is_file() and marker.is_file()):
        return False
    try:
        seen = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    stat = target.stat()
    return seen.get("size") == stat.st_size and seen.get("mtime_ns") == stat.st_mtime_ns


def gemserve_command() -> list[str]:
    script = Path(sys.executable).with_name("gemserve")
    return [str(script)] if script.exists() else [shutil.which("gemserve") or "gemserve"]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024**2
    return 0.0


@dataclass(frozen=True)
class CpuClock:
    """Machine-wide busy and steal CPU-seconds, and CPU-seconds of our own: this process, its waited-for
    children and, when given, the running server."""

    wall: float
    busy: float
    steal: float
    ours: float

    @classmethod
    def now(cls, server_pid: int | None = None) -> CpuClock:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        tick = os.sysconf("SC_CLK_TCK")
        t = os.times()
        ours = t.user + t.system + t.children_user + t.children_system
        if server_pid is not None:  # utime and stime, fields 14 and 15 of /proc/<pid>/stat
            stat = Path(f"/proc/{server_pid}/stat").read_text().rsplit(")", 1)[1].split()
            ours += (int(stat[11]) + int(stat[12])) / tick
        return cls(time.perf_counter(), (user + nice + system + irq + softirq) / tick, steal / tick, ours)


def background_cores(start: CpuClock, end: CpuClock) -> float:
    """Cores other processes kept busy on average between two clocks."""
    return max(0.0, (end.busy - start.busy) - (end.ours - start.ours)) / (end.wall - start.wall)


def background_load(start: CpuClock, end: CpuClock) -> str:
    """How much CPU others took during the run: the noise figure to read the results with."""
    wall, cores = end.wall - start.wall, background_cores(start, end)
    return (f"other processes used {cores * wall:.0f} CPU-s in {wall:.0f} s ({cores:.2f} cores on average); "
            f"hypervisor steal {end.steal - start.steal:.0f} CPU-s")


# ---- the server --------------------------------------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    launched: float  # perf_counter() just before the process was started

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def launch_server(data_dir: Path, log: Path) -> Server:
    port = free_port()
    command = [*gemserve_command(), "serve", "--host", "127.0.0.1", "--port", str(port),
               "--data-dir", str(data_dir), "--log-level", "warning"]
    env = {**os.environ, "GEMSERVE_API_KEYS": ""}  # open local mode: loopback only, no key needed
    with log.open("ab") as stderr:  # the child keeps its own copy of the descriptor
        launched = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    return Server(process, f"http://127.0.0.1:{port}", log, launched)


def wait_until_listed(server: Server, client: httpx.Client) -> float:
    """Poll GET /v1beta/models until it answers 200; seconds since launch."""
    deadline = time.perf_counter() + START_TIMEOUT_S
    while time.perf_counter() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if client.get(f"{server.url}/v1beta/models", timeout=1.0).status_code == 200:
                return time.perf_counter() - server.launched
        except httpx.TransportError:
            pass
        time.sleep(POLL_INTERVAL_S)
    raise TimeoutError(f"the server did not answer within {START_TIMEOUT_S:.0f} s:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=10)


@contextmanager
def running_server(data_dir: Path, log: Path) -> Iterator[Server]:
    server = launch_server(data_dir, log)
    try:
        yield server
    finally:
        stop_server(server)


# ---- streaming over HTTP -----------------------------------------------------------------------------------


@dataclass
class Stream:
    """One streamed generation: perf_counter() times, and the usage the server reported in its last chunk."""

    sent: float
    chunk_times: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    tokens: int = 0
    finish: str | None = None
    background: float = float("nan")  # cores other processes used meanwhile (set by `noted`)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.sent

    @property
    def decode_rate(self) -> float:
        """Tokens per second after the first chunk: (tokens - 1) over the first-to-last chunk time."""
        span = self.chunk_times[-1] - self.chunk_times[0]
        return (self.tokens - 1) / span if span > 0 and self.tokens > 1 else float("nan")


def stream_generate(client: httpx.Client, url: str, prompt: str, max_tokens: int,
                    schema: dict[str, object] | None = None) -> Stream:
    config: dict[str, object] = {"temperature": 0, "maxOutputTokens": max_tokens}
    if schema is not None:
        config.update(responseMimeType="application/json", responseSchema=schema)
    body = {"contents": [{"role": "user", "parts": [{"text": prompt}]}], "generationConfig": config}
    endpoint = f"{url}/v1beta/{MODEL}:streamGenerateContent?alt=sse"
    result = Stream(sent=time.perf_counter())
    with client.stream("POST", endpoint, json=body, timeout=REQUEST_TIMEOUT_S) as response:
        if response.status_code != 200:
            raise RuntimeError(f"streamGenerateContent answered {response.status_code}: {response.read()!r}")
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            result.chunk_times.append(time.perf_counter())
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(f"the stream failed: {chunk['error']}")
            usage = chunk.get("usageMetadata", {})
            result.prompt_tokens = usage.get("promptTokenCount", result.prompt_tokens)
            result.tokens = usage.get("candidatesTokenCount", result.tokens)
            result.finish = chunk["candidates"][0].get("finishReason", result.finish)
    if not result.chunk_times:
        raise RuntimeError("the stream ended without a chunk")
    return result


# ---- gemserve measurements ---------------------------------------------------------------------------------


@dataclass
class StartUp:
    listed_s: float
    first_token_s: float


def measure_cold_start(server: Server, client: httpx.Client) -> StartUp:
    listed = wait_until_listed(server, client)
    first = stream_generate(client, server.url, DECODE_PROMPT, TTFT_NEW_TOKENS)
    return StartUp(listed, first.chunk_times[0] - server.launched)


def warm_up_start(data_dir: Path, log: Path, client: httpx.Client) -> None:
    """Start once so that the server assembles the model into the data dir; not measured."""
    print(f"model not cached in {data_dir}: one warm-up start to assemble it", flush=True)
    with running_server(data_dir, log) as server:
        wait_until_listed(server, client)


@dataclass
class Concurrent:
    streams: list[Stream]
    wall_s: float
    background: float = float("nan")

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.streams)

    @property
    def aggregate_rate(self) -> float:
        return self.tokens / self.wall_s


def measure_concurrent(client: httpx.Client, url: str) -> Concurrent:
    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        started = time.perf_counter()
        futures = [pool.submit(stream_generate, client, url, DECODE_PROMPT, NEW_TOKENS)
                   for _ in range(CONCURRENCY)]
        streams = [f.result(timeout=REQUEST_TIMEOUT_S) for f in futures]
    wall = max(s.chunk_times[-1] for s in streams) - started
    return Concurrent(streams, wall)


# ---- llama-cpp-python baseline -----------------------------------------------------------------------------


@dataclass
class BaselineRun:
    tokens: int
    started: float
    first: float  # perf_counter() of the first token / chunk
    last: float
    background: float = float("nan")

    @property
    def ttft(self) -> float:
        return self.first - self.started

    @property
    def decode_rate(self) -> float:
        span = self.last - self.first
        return (self.tokens - 1) / span if span > 0 and self.tokens > 1 else float("nan")




class Baseline:
    """llama-cpp-python in this process on the same GGUF file, fed the same prompt tokens as gemserve."""

    def __init__(self, gguf: Path, *, flash_attn: bool = False) -> None:
        import llama_cpp

        started = time.perf_counter()
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=BASELINE_CONTEXT, n_threads=BASELINE_THREADS,
                                   flash_attn=flash_attn, verbose=False)
        self.load_s = time.perf_counter() - started
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self.decode_prompt = self.tokens(DECODE_PROMPT)

    def tokens(self, text: str) -> list[int]:
        """The prompt's tokens exactly as gemserve builds them for a single user turn of this model."""
        from gemserve.models.chat_format import ChatFormat, Message

        meta = self.llm.metadata

        def special(token: int) -> str:
            return self.llm.detokenize([token], special=True).decode(errors="replace")

        chat = ChatFormat(meta.get("tokenizer.chat_template"), meta.get("general.architecture", ""),
                          special(self.llm.token_bos()), special(self.llm.token_eos()))
        return self.llm.tokenize(chat.render([Message("user", text)]).encode(), add_bos=False, special=True)

    def decode(self) -> BaselineRun:
        """Greedy tokens of the decode prompt until NEW_TOKENS or an end-of-generation token."""
        self.llm.reset()  # no reuse of the previous run's KV cache
        started = time.perf_counter()
        times = []
        for token in self.llm.generate(self.decode_prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
            if self._is_eog(self._vocab, token):
                break
            times.append(time.perf_counter())
            if len(times) >= NEW_TOKENS:
                break
        if not times:  # the very first token ended the generation
            return BaselineRun(0, started, started, started)
        return BaselineRun(len(times), started, times[0], times[-1])

    def ttft(self, prompt: list[int]) -> BaselineRun:
        """Time to the first streamed chunk of `create_completion(stream=True)` for a prompt."""
        self.llm.reset()
        started = time.perf_counter()
        chunks = self.llm.create_completion(prompt, max_tokens=TTFT_NEW_TOKENS, temperature=0.0, stream=True)
        try:
            next(chunks)
            first = time.perf_counter()
        finally:
            chunks.close()
        return BaselineRun(1, started, first, first)

    def close(self) -> None:
        self.llm.close()


@dataclass
class BaselineFigures:
    label: str
    load_s: float
    prompt_tokens: tuple[int, int]  # decode prompt, long prompt
    decode: list[BaselineRun] = field(default_factory=list)
    ttft: list[BaselineRun] = field(default_factory=list)


# ---- one run: gemserve and the baselines, interleaved ------------------------------------------------------


@dataclass
class Results:
    starts: list[StartUp] = field(default_factory=list)
    server_decode: list[Stream] = field(default_factory=list)
    server_json: list[Stream] = field(default_factory=list)
    server_json_prose: list[Stream] = field(default_factory=list)
    server_ttft: list[Stream] = field(default_factory=list)
    concurrent: list[Concurrent] = field(default_factory=list)
    baselines: list[BaselineFigures] = field(default_factory=list)
    server_rss_mib: float = 0.0
    base_rss_mib: float = 0.0


# The baseline as specified (llama-cpp-python's defaults, flash attention off), and the same with flash
# attention on, which is what llama.cpp's own default ("auto") picks on this CPU and so what gemserve runs.
BASELINES = (("llama-cpp-python", False), ("llama-cpp-python, flash_attn=True", True))


Measured = TypeVar("Measured", Stream, BaselineRun, Concurrent)


def noted(server: Server, measure: Callable[[], Measured]) -> Measured:
    """Run one measurement and note how many cores other processes took meanwhile."""
    start = CpuClock.now(server.process.pid)
    result = measure()
    result.background = background_cores(start, CpuClock.now(server.process.pid))
    return result


def measure_pairs(results: Results, client: httpx.Client, server: Server, baselines: list[Baseline],
                  runs: int) -> None:
    """Decode and TTFT figures, alternating gemserve and the baselines so that all see the same noise."""
    url = server.url
    stream_generate(client, url, DECODE_PROMPT, 16)  # warm-ups, not counted
    for baseline in baselines:
        baseline.decode()
    stream_generate(client, url, JSON_PROMPT, 16, schema=JSON_SCHEMA)  # compiles the schemas' grammars once
    stream_generate(client, url, PROSE_JSON_PROMPT, 16, schema=PROSE_JSON_SCHEMA)
    for _ in range(runs):
        results.server_decode.append(noted(server, partial(stream_generate, client, url, DECODE_PROMPT, NEW_TOKENS)))
        results.server_json.append(noted(server, partial(stream_generate, client, url, JSON_PROMPT, NEW_TOKENS,
                                                         schema=JSON_SCHEMA)))
        results.server_json_prose.append(noted(server, partial(stream_generate, client, url, PROSE_JSON_PROMPT,
                                                               NEW_TOKENS, schema=PROSE_JSON_SCHEMA)))
        for baseline, figures in zip(baselines, results.baselines, strict=True):
            figures.decode.append(noted(server, baseline.decode))
    for run in range(runs):
        prompt = long_prompt(run)
        results.server_ttft.append(noted(server, partial(stream_generate, client, url, prompt, TTFT_NEW_TOKENS)))
        for baseline, figures in zip(baselines, results.baselines, strict=True):
            figures.ttft.append(noted(server, partial(baseline.ttft, baseline.tokens(prompt))))
    print("decode tok/s, gemserve:", _fmt_list(s.decode_rate for s in results.server_decode), flush=True)
    print("JSON-schema decode tok/s, gemserve:", _fmt_list(s.decode_rate for s in results.server_json), flush=True)
    print("JSON-schema (prose) decode tok/s, gemserve:", _fmt_list(s.decode_rate for s in results.server_json_prose),
          flush=True)
    print("long-prompt TTFT s, gemserve:", _fmt_list(s.ttft for s in results.server_ttft), flush=True)
    for figures in results.baselines:
        print(f"decode tok/s, {figures.label}:", _fmt_list(b.decode_rate for b in figures.decode), flush=True)
        print(f"long-prompt TTFT s, {figures.label}:", _fmt_list(b.ttft for b in figures.ttft), flush=True)


def load_baselines(gguf: Path, results: Results) -> list[Baseline]:
    baselines = []
    for label, flash_attn in BASELINES:
        baseline = Baseline(gguf, flash_attn=flash_attn)
        baselines.append(baseline)
        prompts = (len(baseline.decode_prompt), len(baseline.tokens(long_prompt(0))))
        results.baselines.append(BaselineFigures(label, baseline.load_s, prompts))
    return baselines


def benchmark(data_dir: Path, log: Path, runs: int) -> Results:
    results = Results()
    with httpx.Client(limits=httpx.Limits(max_connections=CONCURRENCY * 2)) as client:
        if not model_cached(data_dir):
            warm_up_start(data_dir, log, client)
        for _ in range(runs - 1):
            with running_server(data_dir, log) as server:
                results.starts.append(measure_cold_start(server, client))
        with running_server(data_dir, log) as server:  # the last cold start stays up for the other figures
            results.starts.append(measure_cold_start(server, client))
            print("cold start s, listed / first token:",
                  ", ".join(f"{s.listed_s:.2f} / {s.first_token_s:.2f}" for s in results.starts), flush=True)
            baselines = load_baselines(data_dir / "models" / GGUF_NAME, results)
            try:
                measure_pairs(results, client, server, baselines, runs)
            finally:
                for baseline in baselines:
                    baseline.close()
            for _ in range(runs):
                results.concurrent.append(noted(server, partial(measure_concurrent, client, server.url)))
            print(f"{CONCURRENCY}-concurrent aggregate tok/s, gemserve:",
                  _fmt_list(c.aggregate_rate for c in results.concurrent), flush=True)
            results.server_rss_mib = peak_rss_mib(server.process.pid)
    results.base_rss_mib = peak_rss_mib("self")
    return results


# ---- the report --------------------------------------------------------------------------------------------


def _fmt_list(values: Iterator[float] | list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def _fmt_runs(runs: list[Stream] | list[BaselineRun] | list[Concurrent], figure: str) -> str:
    """Each run's `figure` (an attribute) with, in brackets, the cores other processes used during it."""
    return ", ".join(f"{getattr(run, figure):.2f} [{run.background:.2f}]" for run in runs)


def _median(values: Iterator[float] | list[float]) -> float:
    return statistics.median(list(values))


def _tokens_note(counts: list[int]) -> str:
    short = [c for c in counts if c < NEW_TOKENS]
    return "" if not short else f" (runs ended early: {', '.join(map(str, counts))} tokens)"


def report(r: Results, runs: int) -> str:
    s_decode = _median(s.decode_rate for s in r.server_decode)
    s_json = _median(s.decode_rate for s in r.server_json)
    s_prose = _median(s.decode_rate for s in r.server_json_prose)
    s_ttft = _median(s.ttft for s in r.server_ttft)
    agg = _median(c.aggregate_rate for c in r.concurrent)
    per_stream = _median(s.decode_rate for c in r.concurrent for s in c.streams)
    b_decode = [_median(b.decode_rate for b in f.decode) for f in r.baselines]
    b_ttft = [_median(b.ttft for b in f.ttft) for f in r.baselines]
    server_prompts = (r.server_decode[0].prompt_tokens, r.server_ttft[0].prompt_tokens)
    base_counts = [b.tokens for f in r.baselines for b in f.decode]

    def versus(ours: float, theirs: list[float], fmt: str, note: str = "") -> list[str]:
        cells = [format(ours, fmt)]
        for value in theirs:
            cells += [format(value, fmt) + note, f"{ours / value:.2f}"]
        return cells

    blank = [""] * (2 * len(r.baselines))
    rows = [
        ["cold start to GET /v1beta/models answered (s)", f"{_median(s.listed_s for s in r.starts):.2f}", *blank],
        ["cold start to first streamed token (s)", f"{_median(s.first_token_s for s in r.starts):.2f}",
         *[c for f in r.baselines for c in (f"{f.load_s:.2f} (`Llama()` load only)", "")]],
        [f"single-stream decode, {NEW_TOKENS} tokens (tokens/s)"
         + _tokens_note([s.tokens for s in r.server_decode] + base_counts), *versus(s_decode, b_decode, ".1f")],
        [f"decode under a JSON schema, {NEW_TOKENS} tokens (tokens/s)"
         + _tokens_note([s.tokens for s in r.server_json]),
         f"{s_json:.1f} ({s_json / s_decode:.2f} of free decode)", *blank],
        [f"decode under the second JSON schema (a steam engine explained), {NEW_TOKENS} tokens (tokens/s)"
         + _tokens_note([s.tokens for s in r.server_json_prose]),
         f"{s_prose:.1f} ({s_prose / s_decode:.2f} of free decode)", *blank],
        [f"time to first token, {server_prompts[1]}-token prompt (s)", *versus(s_ttft, b_ttft, ".3f")],
        [f"{CONCURRENCY} concurrent streams, aggregate (tokens/s)"
         + _tokens_note([s.tokens for c in r.concurrent for s in c.streams]),
         *versus(agg, b_decode, ".1f", " (single stream)")],
        [f"{CONCURRENCY} concurrent streams, per-stream decode (tokens/s)", f"{per_stream:.1f}", *blank],
        ["peak RSS (MiB)", f"{r.server_rss_mib:.0f} (server)",
         f"{r.base_rss_mib:.0f} (benchmark process, both baselines loaded)", *blank[1:]],
    ]
    header = ["measure", "gemserve (HTTP)"] + [c for f in r.baselines for c in (f.label, "ratio")]
    lines = [
        f"Median of {runs} runs each. Ratio = gemserve / the baseline to its left (for tokens/s higher favours "
        "gemserve, for times lower does).",
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        "Every run, in brackets the cores that other processes kept busy during it (gemserve and baseline runs "
        "alternate):",
        "",
        f"- cold start to models listed (s): {_fmt_list(s.listed_s for s in r.starts)}; to first token (s): "
        f"{_fmt_list(s.first_token_s for s in r.starts)}",
        f"- JSON-schema decode (tokens/s): gemserve {_fmt_runs(r.server_json, 'decode_rate')}; second schema "
        f"{_fmt_runs(r.server_json_prose, 'decode_rate')}",
        f"- decode (tokens/s): gemserve {_fmt_runs(r.server_decode, 'decode_rate')}; "
        + "; ".join(f"{f.label} {_fmt_runs(f.decode, 'decode_rate')}" for f in r.baselines),
        f"- long-prompt TTFT (s): gemserve {_fmt_runs(r.server_ttft, 'ttft')}; "
        + "; ".join(f"{f.label} {_fmt_runs(f.ttft, 'ttft')}" for f in r.baselines),
        f"- {CONCURRENCY}-concurrent aggregate (tokens/s): "
        f"{_fmt_runs(r.concurrent, 'aggregate_rate')}",
        f"- prompt tokens, decode / long prompt: gemserve {server_prompts[0]} / {server_prompts[1]}; "
        + "; ".join(f"{f.label} {f.prompt_tokens[0]} / {f.prompt_tokens[1]}" for f in r.baselines),
    ]
    if any(f.prompt_tokens != server_prompts for f in r.baselines):
        lines.append("- WARNING: gemserve and the baseline did not see the same number of prompt tokens")
    return "\n".join(lines)


def source_version() -> str:
    """The gemserve commit measured, and whether src/ had uncommitted changes."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        return done.stdout.strip()

    try:
        commit, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--", "src")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit or 'unknown'}{' with uncommitted changes in src/' if dirty else ''}"


def environment(version: str) -> str:
    import llama_cpp

    return (f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; gemserve {version}; "
            f"{cpu_model()}, {os.cpu_count()} cores, {memory_gib():.0f} GiB RAM; Python "
            f"{platform.python_version()}, llama-cpp-python {llama_cpp.__version__}")


# ---- main --------------------------------------------------------------------------------------------------


def _on_alarm(signum: int, frame: object) -> None:
    raise TimeoutError("the benchmark ran past --timeout")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(GGUF_FILES), default="gemma-3-270m", help="the model measured")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="gemserve data dir (default: a temporary one, removed at the end)")
    parser.add_argument("--output", type=Path, default=None, help="write the results table here (markdown)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions of each measurement (median)")
    parser.add_argument("--timeout", type=int, default=1500, help="give up after this many seconds")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    global MODEL, GGUF_NAME
    MODEL, GGUF_NAME = f"models/{args.model}", GGUF_FILES[args.model]

    clock = CpuClock.now()
    version = source_version()  # before the run: the code the server starts with
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(args.timeout)
    with tempfile.TemporaryDirectory(prefix="gemserve-bench-") as scratch:
        data_dir = (args.data_dir or Path(scratch) / "data").expanduser().resolve()
        log = Path(scratch) / "server.log"
        try:
            results = benchmark(data_dir, log, args.runs)
        except BaseException:
            if log.exists():
                print(f"server log (last lines):\n{log.read_text(errors='replace')[-4000:]}", file=sys.stderr)
            raise
    signal.alarm(0)

    table = report(results, args.runs)
    header = (f"gemserve generation benchmark, {MODEL}: {environment(version)}.\n"
              f"Background load during the run: {background_load(clock, CpuClock.now())}.")
    print(f"\n{header}\n\n{table}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(f"{header}\n\n{table}\n")


if __name__ == "__main__":
    main()
