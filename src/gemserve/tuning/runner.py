"""Running one tuning job from its directory to SUCCEEDED, FAILED or CANCELLED (or to a checkpoint on shutdown).

    job.json -> base weights -> token ids -> LoRA trainer (resumed from checkpoint.pt if there is one)
             -> a step at a time: progress.json after each, checkpoint.pt every `checkpoint_every` steps and at
                each epoch's end, `cancel` and shutdown checked between steps
             -> adapter/ (PEFT + GGUF) -> progress SUCCEEDED

Any error a job can cause (bad job.json, an example too long, an unsupported base) ends it FAILED with a
readable message; nothing it does raises out of `run_job`. progress.json also counts `attempts`: a job whose
worker died MAX_ATTEMPTS times in a row without getting a step further fails instead of taking every new worker
down with it; deaths between which training advanced do not add up.
Log lines carry ids, counts and timings, never the examples' text.

Not here: picking jobs, locking, signals (`worker.py`).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemserve.timestamps import utc_now
from gemserve.tuning import jobs
from gemserve.tuning.checkpoint import load_checkpoint, save_checkpoint
from gemserve.tuning.jobs import CANCELLED, FAILED, FINISHED_STATES, RUNNING, SUCCEEDED, Job, JobError

log = logging.getLogger("gemserve.tuning")

CHECKPOINT_EVERY = 10  # steps
# A job whose worker died this many times while running it (killed for memory, say) is failed, not retried.
MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class RunOptions:
    checkpoint_every: int = CHECKPOINT_EVERY
    should_stop: Callable[[], bool] = lambda: False  # shutdown asked: checkpoint and return, job stays RUNNING
    on_step: Callable[[int], None] = lambda step: None  # called after each step (tests use it to interfere)


def run_job(data_dir: Path, job_dir: Path, options: RunOptions | None = None) -> str:
    """Run (or resume) the job in `job_dir`; returns its state afterwards (RUNNING if stopped for shutdown)."""
    options = options or RunOptions()
    progress = jobs.read_progress(job_dir)
    if progress["state"] in FINISHED_STATES:
        return str(progress["state"])
    job_id = job_dir.name
    try:
        job = jobs.read_job(job_dir)
        return _run(data_dir, job_dir, job, progress, options)
    except Exception as exc:
        expected = isinstance(exc, JobError | ValueError | FileNotFoundError)
        message = str(exc) if expected else f"internal error: {type(exc).__name__}: {exc}"
        log.error("tuning job failed", exc_info=not expected, extra={"job_id": job_id, "error": message})
        if not job_dir.is_dir():  # deleted under us (its tuned model was deleted): nothing to report to
            return FAILED
        _finish(job_dir, progress, FAILED, error=message)
        return FAILED


def _finish(job_dir: Path, progress: dict[str, Any], state: str, error: str | None = None) -> None:
    progress.update(state=state, complete_time=utc_now(), error=error)
    jobs.write_progress(job_dir, progress)
    (job_dir / jobs.CHECKPOINT_FILE).unlink(missing_ok=True)  # only a running job resumes
    shutil.rmtree(job_dir / f"{jobs.ADAPTER_DIR}.tmp", ignore_errors=True)


def _run(data_dir: Path, job_dir: Path, job: Job, progress: dict[str, Any], options: RunOptions) -> str:
    # Imported here: torch, transformers and PEFT take seconds to import, and job-file handling needs none.
    from gemserve.tuning.base_weights import prepare_base
    from gemserve.tuning.dataset import ExampleEncoder, text_tokenizer
    from gemserve.tuning.export import export_adapter, gguf_layout
    from gemserve.tuning.trainer import LoraSettings, LoraTrainer, TrainSettings

    extra: dict[str, Any] = {"job_id": job.job_id}
    if jobs.cancel_requested(job_dir):
        _finish(job_dir, progress, CANCELLED)
        log.info("tuning job cancelled before it started", extra=extra)
        return CANCELLED
    # Only attempts that died without getting further count against the job: `completed_steps` is as far as the
    # last attempt got, `attempt_step` as far as the one before it had got when the last one began.
    reached = int(progress.get("completed_steps") or 0)
    progressed = reached > int(progress.get("attempt_step", -1))
    attempts = 1 if progressed else int(progress.get("attempts") or 0) + 1  # a clean shutdown gives one back
    if attempts > MAX_ATTEMPTS:
        raise JobError(f"the tuning worker stopped {MAX_ATTEMPTS} times in a row while running this job without "
                       "getting further (killed, or out of memory?); it is not tried again")
    progress.update(state=RUNNING, total_steps=job.total_steps, start_time=progress["start_time"] or utc_now(),
                    attempts=attempts, attempt_step=reached)
    jobs.write_progress(job_dir, progress)
    log.info("tuning job started", extra={**extra, "base_model": job.base_model_id,
                                          "examples": len(job.examples), "total_steps": job.total_steps})

    base = prepare_base(data_dir, job.base_model_id, job.base_model_path)
    gguf_layout(base)  # an adapter llama.cpp could not load fails the job now, not after training
    if job.source_adapter is not None and not (job.source_adapter / "adapter_config.json").is_file():
        raise JobError(f"source_adapter {job.source_adapter} is not an adapter directory")
    encoder = ExampleEncoder(base, text_tokenizer(base))
    encoded = encoder.encode_all(job.examples)
    settings = TrainSettings(epoch_count=job.epoch_count, batch_size=job.batch_size,
                             learning_rate=job.learning_rate, seed=job.seed,
                             lora=LoraSettings(rank=job.rank, alpha=job.alpha))
    trainer = LoraTrainer(base.hf_dir, encoded, settings, pad_id=encoder.end_id, source_adapter=job.source_adapter)
    checkpoint_file = job_dir / jobs.CHECKPOINT_FILE
    state = load_checkpoint(checkpoint_file)
    if state is not None:
        trainer.load_state_dict(state)
        log.info("tuning job resumed from its checkpoint", extra={**extra, "step": trainer.step})

    def report() -> None:
        progress.update(completed_steps=trainer.step, snapshots=[s.to_json() for s in trainer.snapshots])
        jobs.write_progress(job_dir, progress)

    report()
    started, first_step = time.perf_counter(), trainer.step
    while not trainer.done:
        if jobs.cancel_requested(job_dir):
            _finish(job_dir, progress, CANCELLED)
            log.info("tuning job cancelled", extra={**extra, "step": trainer.step})
            return CANCELLED
        if options.should_stop():
            save_checkpoint(checkpoint_file, trainer.state_dict())
            progress["attempts"] = attempts - 1
            jobs.write_progress(job_dir, progress)
            log.info("tuning job checkpointed for shutdown", extra={**extra, "step": trainer.step})
            return RUNNING
        snapshot = trainer.train_step()
        report()
        if trainer.step % options.checkpoint_every == 0 or trainer.at_epoch_end:
            save_checkpoint(checkpoint_file, trainer.state_dict())
        log.debug("tuning step", extra={**extra, "step": snapshot.step, "loss": round(snapshot.mean_loss, 4)})
        options.on_step(trainer.step)

    seconds = time.perf_counter() - started
    export_adapter(trainer.model, base, job_dir)
    _finish(job_dir, progress, SUCCEEDED)
    log.info("tuning job succeeded", extra={
        **extra, "steps": trainer.step - first_step, "seconds": round(seconds, 1),
        "final_loss": round(trainer.snapshots[-1].mean_loss, 4) if trainer.snapshots else None})
    return SUCCEEDED
