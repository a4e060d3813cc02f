"""tunedModels: creating tuning jobs, reporting them as TunedModel and Operation resources, and access rules.

A create request is checked completely, then becomes a record (owner, names, defaults) and a job directory for
the tuning worker (`gemserve.tuning.jobs`); the worker's progress file is read back whenever the model or its
operation is shown. The model's state follows the job: CREATING until it ends, then ACTIVE or FAILED.

Access: the API key that creates a model owns it. Keys whose project number is in `readerProjectNumbers` may
see and generate with it; only the owner may change or delete it (readers get 403). To any other key the model
does not exist: 404, so that ids do not leak.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemserve.errors import ApiError, invalid_argument
from gemserve.identity import Caller
from gemserve.models.catalog import Catalog, model_path
from gemserve.schema.tuning import Hyperparameters, TunedModelIn
from gemserve.store.tuned_models import TunedModelRecord, TunedModelStore
from gemserve.timestamps import utc_now
from gemserve.tuning import jobs
from gemserve.tuning.jobs import MAX_BATCH_SIZE

log = logging.getLogger("gemserve.tuning")

API_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1beta."
TUNED_MODEL_ID = re.compile(r"^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$")
MAX_DISPLAY_NAME = 40
MAX_EXAMPLES = 100_000
MAX_EXAMPLE_CHARS = 40_000
MAX_EPOCHS = 1000
LARGE_DATASET = 500  # from this many examples on, the larger batch and smaller learning rate are the defaults
DEFAULT_PAGE_SIZE = 10
MAX_PAGE_SIZE = 1000
# Per API key, as Google's quotas are per project. Each model is a tuning job too: this also bounds what one key
# can queue (and the worker takes the keys' jobs in turn: tuning/worker.py).
MAX_TUNED_MODELS_PER_KEY = 100
MUTABLE_FIELDS = {"displayName", "description", "temperature", "topP", "topK", "readerProjectNumbers"}
# gRPC codes used in Operation.error, as google.longrunning reports them.
GRPC_CANCELLED = 1
GRPC_INTERNAL = 13


@dataclass(frozen=True)
class Usable:
    """A tuned model ready for generation: its base model, adapter and sampling defaults."""

    name: str
    base_model: str
    adapter: Path
    temperature: float | None
    top_p: float | None
    top_k: int | None


class TunedModels:
    def __init__(self, store: TunedModelStore, catalog: Catalog, data_dir: Path, seed: int | None = None) -> None:
        self._seed = seed  # every job's, or None for a random one each
        self._store = store
        self._catalog = catalog
        self._data_dir = data_dir
        self._deleted_jobs: set[str] = set()  # job ids of models deleted while their job still ran

    # ---- create -------------------------------------------------------------------------------------------

    def create(self, caller: Caller, body: TunedModelIn, tuned_model_id: str | None) -> dict[str, Any]:
        examples = _examples(body)
        base_model, source, base_path, source_adapter = self._source(caller, body)
        spec = self._catalog.resolve(base_model)
        assert spec is not None
        hyper = _hyperparameters(body.tuning_task.hyperparameters if body.tuning_task else None, len(examples))
        display_name = body.display_name or ""
        if len(display_name) > MAX_DISPLAY_NAME:
            raise invalid_argument(f"display_name: must be at most {MAX_DISPLAY_NAME} characters, got "
                                   f"{len(display_name)}.", "display_name")
        _check_sampling(body, spec.max_temperature)
        model_id = tuned_model_id if tuned_model_id is not None else _generated_id(display_name)
        if not TUNED_MODEL_ID.fullmatch(model_id):
            raise invalid_argument(f"tuned_model_id: {model_id!r} must match [a-z]([a-z0-9-]{{0,38}}[a-z0-9])?: up "
                                   "to 40 lowercase letters, digits and hyphens, starting with a letter and not "
                                   "ending with a hyphen.", "tuned_model_id")
        self._check_quota(caller)
        created = utc_now()
        record = TunedModelRecord(
            id=model_id, owner=caller.owner, base_model=base_model, create_time=created, update_time=created,
            hyperparameters=hyper, operation_id=secrets.token_hex(6), example_count=len(examples),
            display_name=display_name, description=body.description or "", source_tuned_model=source,
            temperature=spec.temperature if body.temperature is None else body.temperature,
            top_p=spec.top_p if body.top_p is None else body.top_p,
            top_k=spec.top_k if body.top_k is None else body.top_k,
            reader_project_numbers=list(body.reader_project_numbers or []),
        )
        if not self._store.insert(record):
            raise ApiError("ALREADY_EXISTS", f"Tuned model with name tunedModels/{model_id} already exists.")
        job_dir = self._job_dir(record)
        try:
            if source_adapter is not None:
                # The job keeps its own copy, so deleting the source model cannot break it while it waits or
                # resumes. The worker ignores the directory until job.json appears.
                job_dir.mkdir(parents=True, exist_ok=True)
                source_adapter = Path(shutil.copytree(source_adapter, job_dir / "source_adapter"))
            jobs.write_job(self._data_dir, {
                "job_id": record.job_id, "created": created, "owner": caller.owner,
                "base_model": {"id": spec.id, "path": str(base_path)},
                "source_adapter": str(source_adapter) if source_adapter else None,
                "examples": examples,
                "hyperparameters": {k: hyper[k] for k in ("epoch_count", "batch_size", "learning_rate")},
                "lora": {"rank": 8, "alpha": 16},
                "seed": secrets.randbelow(2**31) if self._seed is None else self._seed,
            })
            return self.operation(record)
        except jobs.JobError as exc:
            self._store.delete(caller.owner, model_id)  # no record without its job
            shutil.rmtree(job_dir, ignore_errors=True)
            raise invalid_argument(f"The tuning job was refused: {exc}.") from exc
        except BaseException:
            self._store.delete(caller.owner, model_id)
            shutil.rmtree(job_dir, ignore_errors=True)
            raise

    def renumber_readers(self, numbers: dict[int, int]) -> int:
        """Readers listed by an old project number get the new one (`numbers`: old -> new); how many models
        changed. Idempotent: the server does it at every start for the keys it knows."""
        changed = 0
        for record in self._store.all():
            renumbered = [numbers.get(n, n) for n in record.reader_project_numbers]
            if renumbered != record.reader_project_numbers:
                record.reader_project_numbers = renumbered
                self._store.update(record)
                changed += 1
        return changed

    def _check_quota(self, caller: Caller) -> None:
        """One key may not fill the disk with models, nor the tuning worker's queue with jobs (429, as Google
        answers a quota that is used up)."""
        if sum(r.owner == caller.owner for r in self._store.all()) >= MAX_TUNED_MODELS_PER_KEY:
            raise ApiError("RESOURCE_EXHAUSTED", f"Quota exceeded: an API key may keep at most "
                           f"{MAX_TUNED_MODELS_PER_KEY} tuned models. Delete some to create more.")

    def _source(self, caller: Caller, body: TunedModelIn) -> tuple[str, str | None, Path, Path | None]:
        """(base model name, source tuned model name, base weights, source adapter) of a create request."""
        source = body.tuned_model_source.tuned_model if body.tuned_model_source else None
        if source and body.base_model:
            raise invalid_argument("base_model and tuned_model_source are mutually exclusive.", "base_model")
        if source:
            parent = self._visible(caller, source, "tuned_model_source.tuned_model")
            adapter = self._adapter_of(parent)
            if adapter is None:
                raise ApiError("FAILED_PRECONDITION", f"tuned_model_source.tuned_model: tunedModels/{parent.id} is "
                               f"not ACTIVE, so it cannot be tuned further.")
            spec = self._catalog.resolve(parent.base_model)
            if spec is None:
                raise invalid_argument(f"tuned_model_source.tuned_model: its base model {parent.base_model} is no "
                                       "longer served.", "tuned_model_source.tuned_model")
            return f"models/{spec.id}", f"tunedModels/{parent.id}", self._weights(spec.id), adapter[0]
        if not body.base_model:
            raise invalid_argument("base_model: a base model (or tuned_model_source) is required.", "base_model")
        spec = self._catalog.resolve(body.base_model)
        if spec is None:
            raise invalid_argument(f"base_model: {body.base_model} is not a model this server can tune. Call "
                                   "ListModels to see the available models.", "base_model")
        return f"models/{spec.id}", None, self._weights(spec.id), None

    def _weights(self, model_id: str) -> Path:
        spec = self._catalog.models[model_id]
        path = model_path(spec, self._data_dir)
        if path.suffix != ".gguf":
            raise invalid_argument(f"base_model: models/{model_id} is not a GGUF model; tuned models are served "
                                   "as llama.cpp LoRA adapters on a GGUF base.", "base_model")
        return path

    # ---- read ---------------------------------------------------------------------------------------------

    def get(self, caller: Caller, name: str) -> dict[str, Any]:
        return self.resource(self._visible(caller, name, "name"))

    def list(self, caller: Caller, page_size: int | None, page_token: str | None,
             filter_text: str | None) -> dict[str, Any]:
        size = page_size or DEFAULT_PAGE_SIZE
        if size < 0:
            raise invalid_argument("page_size must not be negative.", "page_size")
        size = min(size, MAX_PAGE_SIZE)
        query = filter_text or ""
        binding = hashlib.sha256(f"{caller.owner}\n{query}".encode()).hexdigest()[:16]
        start = _page_start(page_token, binding) if page_token else 0
        matches = [r for r in self._store.all() if _matches(r, caller, query)]
        page: dict[str, Any] = {"tunedModels": [r for r in map(self._listed, matches[start : start + size]) if r]}
        if start + size < len(matches):
            token = json.dumps({"o": start + size, "q": binding}).encode()
            page["nextPageToken"] = base64.urlsafe_b64encode(token).decode()
        return page

    def _listed(self, record: TunedModelRecord) -> dict[str, Any] | None:
        """The record's resource; a record that cannot be shown is logged and left out, never failing the list."""
        try:
            return self.resource(record)
        except Exception:
            log.exception("tuned model record cannot be shown", extra={"tuned_model": record.id})
            return None

    def usable(self, caller: Caller, name: str) -> Usable:
        record = self._visible(caller, name, "model")
        state = self._state(jobs.read_progress(self._job_dir(record)))
        adapter = self._adapter_of(record)
        if adapter is None or adapter[1] is None:
            raise ApiError("FAILED_PRECONDITION", f"Tuned model tunedModels/{record.id} is not ready for use: its "
                           f"state is {state}.")
        return Usable(f"tunedModels/{record.id}", record.base_model, adapter[1], record.temperature, record.top_p,
                      record.top_k)

    # ---- change -------------------------------------------------------------------------------------------

    def patch(self, caller: Caller, name: str, parsed: TunedModelIn, present: set[str],
              update_mask: str | None) -> dict[str, Any]:
        """Update mutable fields: those in `update_mask`, or without one those `present` in the body."""
        record = self._owned(caller, name)
        if update_mask:
            fields = {_camel_path(f.strip()) for f in update_mask.split(",") if f.strip()}
            bad = sorted(fields - MUTABLE_FIELDS)
            if bad:
                raise invalid_argument(f"update_mask: {', '.join(bad)} cannot be updated; mutable fields are "
                                       f"{', '.join(sorted(MUTABLE_FIELDS))}.", "update_mask")
        else:
            fields = present & MUTABLE_FIELDS
            current = self.resource(record)
            for key in sorted(present & {"baseModel", "tunedModelSource"}):
                given = getattr(parsed, "base_model" if key == "baseModel" else "tuned_model_source")
                given = given if isinstance(given, str) or given is None else given.to_wire()
                if given != current.get(key):
                    raise invalid_argument(f"{key} is immutable; mutable fields are "
                                           f"{', '.join(sorted(MUTABLE_FIELDS))}.", key)
            task = parsed.tuning_task
            if task is not None and (task.training_data is not None or task.hyperparameters is not None):
                raise invalid_argument("tuning_task is immutable; mutable fields are "
                                       f"{', '.join(sorted(MUTABLE_FIELDS))}.", "tuning_task")
        if parsed.name not in (None, f"tunedModels/{record.id}"):
            raise invalid_argument("name: does not match the tuned model in the URL.", "name")
        spec = self._catalog.resolve(record.base_model)
        _check_sampling(parsed, spec.max_temperature if spec else 2.0)
        if "displayName" in fields:
            if len(parsed.display_name or "") > MAX_DISPLAY_NAME:
                raise invalid_argument(f"display_name: must be at most {MAX_DISPLAY_NAME} characters.",
                                       "display_name")
            record.display_name = parsed.display_name or ""
        if "description" in fields:
            record.description = parsed.description or ""
        if "temperature" in fields:
            record.temperature = parsed.temperature
        if "topP" in fields:
            record.top_p = parsed.top_p
        if "topK" in fields:
            record.top_k = parsed.top_k
        if "readerProjectNumbers" in fields:
            record.reader_project_numbers = list(parsed.reader_project_numbers or [])
        record.update_time = utc_now()
        self._store.update(record)
        return self.resource(record)

    def delete(self, caller: Caller, name: str) -> tuple[str, Path] | None:
        """Cancel the model's job, forget the model, remove its files. Returns (base model, llama.cpp adapter)
        when the model was being served, so that the engine can free the adapter."""
        record = self._owned(caller, name)
        job_dir = self._job_dir(record)
        adapter = self._adapter_of(record)
        jobs.request_cancel(job_dir)
        self._store.delete(record.owner, record.id)
        self._deleted_jobs.add(record.job_id)
        self.sweep()
        return (record.base_model, adapter[1]) if adapter and adapter[1] else None

    def sweep(self) -> None:
        """Remove job directories whose model was deleted, once their job has stopped."""
        known = {r.job_id for r in self._store.all()}
        root = self._data_dir / "tuning" / "jobs"
        for job_dir in root.glob("*") if root.is_dir() else []:
            if job_dir.name not in known and jobs.read_progress(job_dir)["state"] in {"SUCCEEDED", "FAILED",
                                                                                     "CANCELLED"}:
                shutil.rmtree(job_dir, ignore_errors=True)
            elif job_dir.name not in known:
                jobs.request_cancel(job_dir)

    def sweep_deleted(self) -> None:
        """Remove the job directories of models this server deleted whose job has stopped since (run every
        minute; other directories are left to the start-up sweep)."""
        for job_id in list(self._deleted_jobs):
            job_dir = self._data_dir / "tuning" / "jobs" / job_id
            if not job_dir.is_dir():
                self._deleted_jobs.discard(job_id)
            elif jobs.read_progress(job_dir)["state"] in {"SUCCEEDED", "FAILED", "CANCELLED"}:
                shutil.rmtree(job_dir, ignore_errors=True)
                self._deleted_jobs.discard(job_id)

    # ---- operations ---------------------------------------------------------------------------------------

    def get_operation(self, caller: Caller, model: str, operation_id: str) -> dict[str, Any]:
        record = self._visible(caller, model, "name")
        if operation_id != record.operation_id:
            raise ApiError("NOT_FOUND", f"Operation tunedModels/{record.id}/operations/{operation_id} not found.")
        return self.operation(record)

    def list_operations(self, caller: Caller, model: str) -> dict[str, Any]:
        return {"operations": [self.operation(self._visible(caller, model, "name"))]}

    def cancel_operation(self, caller: Caller, model: str, operation_id: str) -> None:
        record = self._owned(caller, model)
        if operation_id != record.operation_id:
            raise ApiError("NOT_FOUND", f"Operation tunedModels/{record.id}/operations/{operation_id} not found.")
        jobs.request_cancel(self._job_dir(record))

    # ---- JSON ---------------------------------------------------------------------------------------------

    def resource(self, record: TunedModelRecord, progress: dict[str, Any] | None = None) -> dict[str, Any]:
        """The TunedModel JSON; `progress` is the job's, when the caller has read it already."""
        progress = progress or jobs.read_progress(self._job_dir(record))
        task: dict[str, Any] = {}
        if progress.get("start_time"):
            task["startTime"] = progress["start_time"]
        if progress.get("complete_time"):
            task["completeTime"] = progress["complete_time"]
        task["snapshots"] = [_snapshot(s) for s in progress.get("snapshots", [])]
        task["hyperparameters"] = {_camel(k): v for k, v in record.hyperparameters.items()}
        out: dict[str, Any] = {
            "name": f"tunedModels/{record.id}",
            "displayName": record.display_name,
            "description": record.description,
            "state": self._state(progress),
            "createTime": record.create_time,
            "updateTime": record.update_time,
            "tuningTask": task,
        }
        if record.source_tuned_model:
            out["tunedModelSource"] = {"tunedModel": record.source_tuned_model, "baseModel": record.base_model}
        else:
            out["baseModel"] = record.base_model
        for key, value in (("temperature", record.temperature), ("topP", record.top_p), ("topK", record.top_k)):
            if value is not None:
                out[key] = value
        if record.reader_project_numbers:
            out["readerProjectNumbers"] = [str(n) for n in record.reader_project_numbers]
        return out

    def operation(self, record: TunedModelRecord) -> dict[str, Any]:
        progress = jobs.read_progress(self._job_dir(record))
        total = int(progress.get("total_steps") or 0)
        completed = int(progress.get("completed_steps") or 0)
        metadata: dict[str, Any] = {
            "@type": API_TYPE + "CreateTunedModelMetadata",
            "tunedModel": f"tunedModels/{record.id}",
            "totalSteps": total,
            "completedSteps": completed,
            "completedPercent": round(100.0 * completed / total, 2) if total else 0.0,
            "snapshots": [_snapshot(s) for s in progress.get("snapshots", [])],
        }
        op: dict[str, Any] = {"name": f"tunedModels/{record.id}/operations/{record.operation_id}",
                              "metadata": metadata, "done": False}
        state = progress["state"]
        if state == "SUCCEEDED":
            op["done"] = True
            op["response"] = {"@type": API_TYPE + "TunedModel", **self.resource(record, progress)}
        elif state == "CANCELLED":
            op["done"] = True
            op["error"] = {"code": GRPC_CANCELLED, "message": "Operation cancelled."}
        elif state == "FAILED":
            op["done"] = True
            op["error"] = {"code": GRPC_INTERNAL, "message": f"Tuning failed: {progress.get('error') or 'unknown'}"}
        return op

    # ---- access -------------------------------------------------------------------------------------------

    def _visible(self, caller: Caller, name: str, field: str) -> TunedModelRecord:
        model_id = name.removeprefix("tunedModels/")
        # Ids are per owner: the caller's own model of that id, else the one shared with it. Two owners sharing
        # models of one id with the caller make the name ambiguous: neither is picked, or one owner could put a
        # model of its own in place of the other's by timing.
        found = self._store.with_id(model_id)
        record = next((r for r in found if r.owner == caller.owner), None)
        shared = [r for r in found if caller.project_number in r.reader_project_numbers]
        if record is None and len(shared) > 1:
            raise ApiError("FAILED_PRECONDITION", f"tunedModels/{model_id} names {len(shared)} tuned models shared "
                           "with you by different owners; ask them to give theirs other ids.")
        record = record or (shared[0] if shared else None)
        if record is None:
            raise ApiError("NOT_FOUND", f"Tuned model tunedModels/{model_id} does not exist.",
                           [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                             "fieldViolations": [{"field": field, "description": "no such tuned model"}]}])
        return record

    def _owned(self, caller: Caller, name: str) -> TunedModelRecord:
        record = self._visible(caller, name, "name")
        if record.owner != caller.owner:
            raise ApiError("PERMISSION_DENIED", f"Only the owner of tunedModels/{record.id} may change or delete it.")
        return record

    def _job_dir(self, record: TunedModelRecord) -> Path:
        return jobs.job_dir(self._data_dir, record.job_id)

    def _adapter_of(self, record: TunedModelRecord) -> tuple[Path, Path | None] | None:
        """(PEFT adapter directory, llama.cpp adapter file) of an ACTIVE model."""
        return jobs.adapter_paths(self._job_dir(record))

    @staticmethod
    def _state(progress: dict[str, Any]) -> str:
        return {"SUCCEEDED": "ACTIVE", "FAILED": "FAILED", "CANCELLED": "FAILED"}.get(progress["state"], "CREATING")


def _examples(body: TunedModelIn) -> list[dict[str, str]]:
    data = body.tuning_task.training_data if body.tuning_task else None
    examples = data.examples.examples if data and data.examples else []
    if not examples:
        raise invalid_argument("tuning_task.training_data.examples.examples: training data is required and must "
                               "hold at least one example.", "tuning_task.training_data.examples.examples")
    if len(examples) > MAX_EXAMPLES:
        raise invalid_argument(f"tuning_task.training_data.examples.examples: at most {MAX_EXAMPLES} examples.",
                               "tuning_task.training_data.examples.examples")
    out = []
    for i, example in enumerate(examples):
        where = f"tuning_task.training_data.examples.examples[{i}]"
        if example.text_input is None:
            raise invalid_argument(f"{where}.text_input: every example needs a text input (all examples must be "
                                   "of the same type: text).", f"{where}.text_input")
        output = example.output or ""
        if not output.strip():
            raise invalid_argument(f"{where}.output: the expected output must not be empty.", f"{where}.output")
        if len(example.text_input) + len(output) > MAX_EXAMPLE_CHARS:
            raise invalid_argument(f"{where}: an example may hold at most {MAX_EXAMPLE_CHARS} characters.", where)
        out.append({"text_input": example.text_input, "output": output})
    return out


def _hyperparameters(given: Hyperparameters | None, n_examples: int) -> dict[str, Any]:
    """The hyperparameters that apply, defaults filled in as the reference describes."""
    given = given or Hyperparameters()
    where = "tuning_task.hyperparameters"
    if given.learning_rate is not None and given.learning_rate_multiplier is not None:
        raise invalid_argument(f"{where}: learning_rate and learning_rate_multiplier are mutually exclusive.",
                               f"{where}.learning_rate")
    large = n_examples >= LARGE_DATASET
    epochs = 5 if given.epoch_count is None else given.epoch_count
    batch = (16 if large else 4) if given.batch_size is None else given.batch_size
    if not 1 <= epochs <= MAX_EPOCHS:
        raise invalid_argument(f"{where}.epoch_count: must be between 1 and {MAX_EPOCHS}, got {epochs}.",
                               f"{where}.epoch_count")
    if not 1 <= batch <= MAX_BATCH_SIZE:
        raise invalid_argument(f"{where}.batch_size: must be between 1 and {MAX_BATCH_SIZE}, got {batch}.",
                               f"{where}.batch_size")
    default_rate = 0.0002 if large else 0.001
    out: dict[str, Any] = {"epoch_count": epochs, "batch_size": batch}
    if given.learning_rate is not None:
        rate = given.learning_rate
        name = "learning_rate"
    else:
        multiplier = 1.0 if given.learning_rate_multiplier is None else given.learning_rate_multiplier
        rate = multiplier * default_rate
        name = "learning_rate_multiplier"
        if given.learning_rate_multiplier is not None:
            out["learning_rate_multiplier"] = multiplier
    if not (math.isfinite(rate) and 0 < rate <= 1):
        raise invalid_argument(f"{where}.{name}: the learning rate must be positive and at most 1.", f"{where}.{name}")
    out["learning_rate"] = rate
    return out


def _check_sampling(body: TunedModelIn, max_temperature: float) -> None:
    if body.temperature is not None and not 0 <= body.temperature <= max_temperature:
        raise invalid_argument(f"temperature: must be between 0 and {max_temperature}.", "temperature")
    if body.top_p is not None and not 0 <= body.top_p <= 1:
        raise invalid_argument("top_p: must be between 0 and 1.", "top_p")
    if body.top_k is not None and not 1 <= body.top_k < 2**31:
        raise invalid_argument("top_k: must be a positive 32-bit integer.", "top_k")
    for i, number in enumerate(body.reader_project_numbers or []):
        if not 0 < number < 2**63:
            raise invalid_argument(f"reader_project_numbers[{i}]: {number} is not a project number.",
                                   f"reader_project_numbers[{i}]")


def _generated_id(display_name: str) -> str:
    """`Sentence Translator` -> `sentence-translator-u3b7m`; a random id when there is no usable name."""
    suffix = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(5))
    words = re.findall(r"[a-z0-9]+", display_name.lower())
    stem = "-".join(words)[: 40 - len(suffix) - 1].strip("-")
    if stem and stem[0].isalpha():
        return f"{stem}-{suffix}"
    return secrets.choice("abcdefghijklmnopqrstuvwxyz") + "".join(
        secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(10))


def _matches(record: TunedModelRecord, caller: Caller, query: str) -> bool:
    owned = record.owner == caller.owner
    reader = caller.project_number in record.reader_project_numbers and not owned
    words = []
    for token in query.split():
        lowered = token.lower()
        if lowered in ("owner:me", "writers:me"):
            if not owned:
                return False
        elif lowered == "readers:me":
            if not reader:
                return False
        elif lowered == "readers:everyone":
            return False  # this server has no sharing with everyone
        else:
            words.append(lowered)
    if not (owned or reader):
        return False
    text = f"{record.display_name}\n{record.description}".lower()
    return all(word in text for word in words)


def _page_start(token: str, binding: str) -> int:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        if data.get("q") == binding and isinstance(data.get("o"), int) and data["o"] >= 0:
            return int(data["o"])
    except (ValueError, TypeError, AttributeError):
        pass
    raise invalid_argument("page_token is not valid for this caller and query; a token only works with the "
                           "list call that returned it.", "page_token")


def _snapshot(snapshot: dict[str, Any]) -> dict[str, Any]:
    return {"step": snapshot["step"], "epoch": snapshot["epoch"], "meanLoss": snapshot["mean_loss"],
            "computeTime": snapshot["compute_time"]}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.capitalize() for word in rest)


def _camel_path(path: str) -> str:
    return _camel(path.split(".")[-1]) if "_" in path else path.split(".")[-1]
