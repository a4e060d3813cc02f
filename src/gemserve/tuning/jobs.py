"""The tuning job directory: the whole contract between the HTTP side and the tuning worker.

    <data_dir>/tuning/jobs/<job_id>/
        job.json        the request, written atomically by the server before the worker may see the job
        cancel          empty; the server creates it to ask for cancellation
        progress.json   written atomically by the worker only; missing means QUEUED (it also holds `attempts`,
                        the worker's own count of runs, which the server may ignore)
        checkpoint.pt   the worker's own resume point (private to the worker)
        adapter/        present only after success: adapter_config.json + adapter_model.safetensors (PEFT)
                        and adapter.gguf (llama.cpp LoRA)

The server imports `write_job`, `read_progress`, `request_cancel`, `job_dir` and `adapter_paths`; the worker
uses the rest. Every file either side writes goes through a temporary file and `os.replace`, so a reader never
sees half a file. Not here: running jobs (`runner.py`) or choosing which job runs (`worker.py`).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
FINISHED_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})

JOB_FILE = "job.json"
PROGRESS_FILE = "progress.json"
CANCEL_FILE = "cancel"
CHECKPOINT_FILE = "checkpoint.pt"
ADAPTER_DIR = "adapter"
GGUF_ADAPTER_FILE = "adapter.gguf"

# Limits on what a job may ask for; a job outside them fails with a message that names the field.
MAX_EXAMPLES = 100_000
MAX_EPOCHS = 1_000
MAX_BATCH_SIZE = 256
MAX_RANK = 256
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class JobError(ValueError):
    """job.json asks for something the worker cannot do; the job ends FAILED with this message."""


def jobs_root(data_dir: Path) -> Path:
    return Path(data_dir) / "tuning" / "jobs"


def job_dir(data_dir: Path, job_id: str) -> Path:
    if not _JOB_ID.fullmatch(job_id):
        raise JobError(f"job id {job_id!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a "
                       "letter or digit")
    return jobs_root(data_dir) / job_id


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: a temporary file beside it, flushed to disk, then renamed over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=1, allow_nan=False).encode("utf-8"))


def write_job(data_dir: Path, job: dict[str, Any]) -> Path:
    """Create a job's directory and its job.json (checked first, written atomically); returns the directory.

    The worker ignores a directory until its job.json exists, so the job becomes visible whole."""
    parse_job(job)
    directory = job_dir(data_dir, job["job_id"])
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / JOB_FILE).exists():
        raise JobError(f"job {job['job_id']!r} already exists")
    atomic_write_json(directory / JOB_FILE, job)
    return directory


def default_progress() -> dict[str, Any]:
    return {"state": QUEUED, "total_steps": 0, "completed_steps": 0, "snapshots": [], "start_time": None,
            "complete_time": None, "error": None}


def read_progress(directory: Path) -> dict[str, Any]:
    """The job's progress.json; a job without one (or with one not yet readable) is QUEUED."""
    try:
        progress = json.loads((Path(directory) / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return default_progress()
    return {**default_progress(), **progress} if isinstance(progress, dict) else default_progress()


def write_progress(directory: Path, progress: dict[str, Any]) -> None:
    atomic_write_json(Path(directory) / PROGRESS_FILE, progress)


def request_cancel(directory: Path) -> None:
    """Ask the worker to stop the job; it marks it CANCELLED within a step or two. No effect once finished."""
    (Path(directory) / CANCEL_FILE).touch()


def cancel_requested(directory: Path) -> bool:
    return (directory / CANCEL_FILE).exists()


def adapter_paths(directory: Path) -> tuple[Path, Path | None] | None:
    """(PEFT adapter directory, llama.cpp adapter.gguf) of a succeeded job, else None.

    The GGUF is None only for a base model whose architecture llama.cpp adapters are not exported for (a Hugging
    Face directory base served by transformers, which uses the PEFT adapter)."""
    adapter = Path(directory) / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        return None
    gguf_file = adapter / GGUF_ADAPTER_FILE
    return adapter, gguf_file if gguf_file.is_file() else None


@dataclass(frozen=True)
class Example:
    text_input: str
    output: str


@dataclass(frozen=True)
class Job:
    job_id: str
    created: str
    base_model_id: str
    base_model_path: Path
    source_adapter: Path | None
    examples: tuple[Example, ...]
    epoch_count: int
    batch_size: int
    learning_rate: float
    rank: int
    alpha: float
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.epoch_count * self.steps_per_epoch


def read_job(directory: Path) -> Job:
    try:
        raw = json.loads((directory / JOB_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise JobError(f"job.json cannot be read: {exc}") from exc
    return parse_job(raw)


def parse_job(raw: Any) -> Job:
    """Check a job.json document field by field; the first problem found is raised as a JobError."""
    if not isinstance(raw, dict):
        raise JobError("job.json must hold a JSON object")
    job_id = _field(raw, "job_id", str)
    job_dir(Path("."), job_id)  # checks the id's spelling
    base = _field(raw, "base_model", dict)
    base_path = Path(_field(base, "path", str, "base_model.path"))
    if not base_path.is_absolute():
        raise JobError(f"base_model.path must be absolute, got {str(base_path)!r}")
    source = raw.get("source_adapter")
    if source is not None and (not isinstance(source, str) or not Path(source).is_absolute()):
        raise JobError("source_adapter must be null or the absolute path of an adapter directory")
    examples = _field(raw, "examples", list)
    if not 1 <= len(examples) <= MAX_EXAMPLES:
        raise JobError(f"examples: between 1 and {MAX_EXAMPLES} examples are needed, got {len(examples)}")
    parsed = []
    for i, item in enumerate(examples):
        if not isinstance(item, dict):
            raise JobError(f"examples[{i}] must be an object with text_input and output")
        text_input = _field(item, "text_input", str, f"examples[{i}].text_input")
        output = _field(item, "output", str, f"examples[{i}].output")
        if not output.strip():
            raise JobError(f"examples[{i}].output must not be empty")
        parsed.append(Example(text_input, output))
    hyper = _field(raw, "hyperparameters", dict)
    lora = raw.get("lora") or {}
    if not isinstance(lora, dict):
        raise JobError("lora must be an object with rank and alpha")
    job = Job(
        job_id=job_id,
        created=_field(raw, "created", str),
        base_model_id=_field(base, "id", str, "base_model.id"),
        base_model_path=base_path,
        source_adapter=Path(source) if source else None,
        examples=tuple(parsed),
        epoch_count=_int_in(hyper, "epoch_count", 1, MAX_EPOCHS, "hyperparameters.epoch_count"),
        batch_size=_int_in(hyper, "batch_size", 1, MAX_BATCH_SIZE, "hyperparameters.batch_size"),
        learning_rate=_number(hyper, "learning_rate", "hyperparameters.learning_rate"),
        rank=_int_in({"rank": lora.get("rank", 8)}, "rank", 1, MAX_RANK, "lora.rank"),
        alpha=_number({"alpha": lora.get("alpha", 16)}, "alpha", "lora.alpha"),
        seed=_field(raw, "seed", int),
    )
    return job


_KIND_NAMES = {str: "a string", int: "an integer", dict: "an object", list: "a list"}


def _field(obj: dict[str, Any], key: str, kind: type, where: str | None = None) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise JobError(f"{where or key} must be {_KIND_NAMES[kind]}, got {value!r:.80}")
    return value


def _int_in(obj: dict[str, Any], key: str, low: int, high: int, where: str) -> int:
    value: int = _field(obj, key, int, where)
    if not low <= value <= high:
        raise JobError(f"{where} must be between {low} and {high}, got {value}")
    return value


def _number(obj: dict[str, Any], key: str, where: str) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise JobError(f"{where} must be a positive number, got {value!r:.80}")
    return float(value)
