"""The job directory contract: what the server writes, what it reads back, and how bad jobs are described."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from gemserve.tuning import jobs
from gemserve.tuning.jobs import JobError, parse_job
from tests.tuning import tiny


def job(**changes: Any) -> dict[str, Any]:
    return {**tiny.job_document("job-1", Path("/models/tiny.gguf"), tiny.MEMORY_TASK), **changes}


def test_write_job_creates_the_directory_with_job_json(tmp_path: Path) -> None:
    directory = jobs.write_job(tmp_path, job())
    assert directory == tmp_path / "tuning" / "jobs" / "job-1" == jobs.job_dir(tmp_path, "job-1")
    assert json.loads((directory / "job.json").read_text()) == job()
    assert [p.name for p in directory.iterdir()] == ["job.json"]  # no temporary file left behind
    with pytest.raises(JobError, match="already exists"):
        jobs.write_job(tmp_path, job())


def test_a_job_that_cannot_be_written_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        jobs.write_job(tmp_path, job())
    assert list((tmp_path / "tuning" / "jobs" / "job-1").iterdir()) == []


def test_invalid_job_is_refused_before_it_is_written(tmp_path: Path) -> None:
    with pytest.raises(JobError, match=r"examples\[0\].output must not be empty"):
        jobs.write_job(tmp_path, job(examples=[{"text_input": "a", "output": " "}]))
    assert not (tmp_path / "tuning" / "jobs" / "job-1").exists()


@pytest.mark.parametrize(("changes", "message"), [
    ({"job_id": "../escape"}, "job id '../escape' must be"),
    ({"examples": []}, "between 1 and 100000 examples"),
    ({"examples": [{"text_input": "a"}]}, r"examples\[0\].output must be a string, got None"),
    ({"examples": ["a"]}, r"examples\[0\] must be an object"),
    ({"hyperparameters": {"epoch_count": 0, "batch_size": 4, "learning_rate": 0.001}},
     "hyperparameters.epoch_count must be between 1 and 1000, got 0"),
    ({"hyperparameters": {"epoch_count": 1, "batch_size": True, "learning_rate": 0.001}},
     "hyperparameters.batch_size must be an integer, got True"),
    ({"hyperparameters": {"epoch_count": 1, "batch_size": 4, "learning_rate": -1}},
     "hyperparameters.learning_rate must be a positive number, got -1"),
    ({"base_model": {"id": "x", "path": "relative/model.gguf"}}, "base_model.path must be absolute"),
    ({"source_adapter": "relative"}, "source_adapter must be null or the absolute path"),
    ({"lora": {"rank": 0, "alpha": 16}}, "lora.rank must be between 1 and 256, got 0"),
    ({"seed": "7"}, "seed must be an integer, got '7'"),
])
def test_job_errors_name_the_field(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(JobError, match=message):
        parse_job(job(**changes))


def test_steps_are_epochs_times_batches_rounded_up() -> None:
    parsed = parse_job(job(hyperparameters={"epoch_count": 3, "batch_size": 4, "learning_rate": 1e-3}))
    assert (len(parsed.examples), parsed.steps_per_epoch, parsed.total_steps) == (6, 2, 6)
    assert (parsed.rank, parsed.alpha, parsed.seed) == (4, 8.0, 0)


def test_progress_defaults_to_queued_and_is_replaced_whole(tmp_path: Path) -> None:
    assert jobs.read_progress(tmp_path) == {"state": "QUEUED", "total_steps": 0, "completed_steps": 0,
                                            "snapshots": [], "start_time": None, "complete_time": None,
                                            "error": None}
    (tmp_path / "progress.json").write_text('{"state": "RUNN')  # never written by the worker; still no crash
    assert jobs.read_progress(tmp_path)["state"] == "QUEUED"
    jobs.write_progress(tmp_path, {**jobs.default_progress(), "state": "RUNNING", "total_steps": 5})
    assert jobs.read_progress(tmp_path)["total_steps"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["progress.json"]


def test_cancel_and_adapter_paths(tmp_path: Path) -> None:
    assert not jobs.cancel_requested(tmp_path)
    jobs.request_cancel(tmp_path)
    assert jobs.cancel_requested(tmp_path)
    assert jobs.adapter_paths(tmp_path) is None
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert jobs.adapter_paths(tmp_path) == (tmp_path / "adapter", None)
    (tmp_path / "adapter" / "adapter.gguf").write_bytes(b"GGUF")
    assert jobs.adapter_paths(tmp_path) == (tmp_path / "adapter", tmp_path / "adapter" / "adapter.gguf")
