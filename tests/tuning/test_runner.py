"""One job from job.json to its end state, in-process, on the tiny Gemma 3: success, cancel, failure, shutdown
and resume, tuning a tuned model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gemserve.tuning import jobs
from gemserve.tuning.runner import RunOptions, run_job
from tests.tuning import tiny


def submit(data_dir: Path, base: Path, job_id: str = "job-1", **kwargs) -> Path:
    return jobs.write_job(data_dir, tiny.job_document(job_id, base, tiny.MEMORY_TASK, **kwargs))


def test_a_job_runs_to_success_with_both_adapter_forms(tiny_gemma: Path, tmp_path: Path) -> None:
    directory = submit(tmp_path, tiny_gemma, epochs=3)
    assert run_job(tmp_path, directory) == jobs.SUCCEEDED
    progress = jobs.read_progress(directory)
    assert progress["state"] == "SUCCEEDED" and progress["error"] is None
    assert progress["total_steps"] == progress["completed_steps"] == 9  # 3 epochs of ceil(6 / 2)
    assert [s["step"] for s in progress["snapshots"]] == list(range(1, 10))
    assert [s["epoch"] for s in progress["snapshots"]] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert progress["start_time"] <= progress["complete_time"]
    paths = jobs.adapter_paths(directory)
    assert paths is not None and paths[1] is not None and paths[1].stat().st_size > 0
    assert json.loads((paths[0] / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    assert sorted(p.name for p in directory.iterdir()) == ["adapter", "job.json", "progress.json"]
    assert run_job(tmp_path, directory) == jobs.SUCCEEDED  # a finished job is left as it is


def test_cancel_file_stops_a_running_job(tiny_gemma: Path, tmp_path: Path) -> None:
    directory = submit(tmp_path, tiny_gemma, epochs=20)

    def cancel_at_step_3(step: int) -> None:
        if step == 3:
            jobs.request_cancel(directory)

    assert run_job(tmp_path, directory, RunOptions(on_step=cancel_at_step_3)) == jobs.CANCELLED
    progress = jobs.read_progress(directory)
    assert progress["state"] == "CANCELLED" and progress["completed_steps"] == 3
    assert progress["complete_time"] is not None
    assert jobs.adapter_paths(directory) is None
    assert not (directory / jobs.CHECKPOINT_FILE).exists()


def test_a_queued_job_cancelled_never_starts(tiny_gemma: Path, tmp_path: Path) -> None:
    directory = submit(tmp_path, tiny_gemma)
    jobs.request_cancel(directory)
    assert run_job(tmp_path, directory) == jobs.CANCELLED
    assert jobs.read_progress(directory)["start_time"] is None


@pytest.mark.parametrize(("document", "message"), [
    ({"job_id": "bad", "examples": "nope"}, "base_model must be an object, got None"),
    (None, "job.json cannot be read"),
])
def test_unreadable_jobs_fail_with_a_readable_error(tmp_path: Path, document: dict | None, message: str) -> None:
    directory = tmp_path / "tuning" / "jobs" / "bad"
    directory.mkdir(parents=True)
    (directory / "job.json").write_text(json.dumps(document) if document else "{not json")
    assert run_job(tmp_path, directory) == jobs.FAILED
    progress = jobs.read_progress(directory)
    assert progress["state"] == "FAILED" and message in progress["error"]


def test_missing_base_model_fails_the_job(tmp_path: Path) -> None:
    directory = submit(tmp_path, tmp_path / "nowhere.gguf")
    assert run_job(tmp_path, directory) == jobs.FAILED
    assert "is neither a GGUF file nor a Hugging Face model directory" in jobs.read_progress(directory)["error"]


def test_too_long_example_fails_the_job_naming_it(tiny_gemma: Path, tmp_path: Path) -> None:
    examples = [*tiny.MEMORY_TASK, {"text_input": "one two " * 1500, "output": "I"}]
    directory = jobs.write_job(tmp_path, tiny.job_document("long", tiny_gemma, examples))
    assert run_job(tmp_path, directory) == jobs.FAILED
    assert "examples[6] is" in jobs.read_progress(directory)["error"]


def test_shutdown_checkpoints_and_a_later_run_resumes_to_the_same_adapter(tiny_gemma: Path,
                                                                          tmp_path: Path) -> None:
    straight = submit(tmp_path, tiny_gemma, "straight", epochs=6, seed=5)
    assert run_job(tmp_path, straight) == jobs.SUCCEEDED

    resumed = submit(tmp_path, tiny_gemma, "resumed", epochs=6, seed=5)
    steps: list[int] = []
    options = RunOptions(checkpoint_every=4, should_stop=lambda: len(steps) >= 7, on_step=steps.append)
    assert run_job(tmp_path, resumed, options) == jobs.RUNNING
    assert jobs.read_progress(resumed)["state"] == "RUNNING"
    assert (resumed / jobs.CHECKPOINT_FILE).exists()
    assert run_job(tmp_path, resumed) == jobs.SUCCEEDED

    one, two = jobs.read_progress(straight), jobs.read_progress(resumed)
    assert two["completed_steps"] == two["total_steps"] == one["total_steps"] == 18
    assert [s["mean_loss"] for s in two["snapshots"]] == pytest.approx([s["mean_loss"] for s in one["snapshots"]])
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)


def test_tuning_a_tuned_model_starts_from_its_adapter(tiny_gemma: Path, tmp_path: Path) -> None:
    first = submit(tmp_path, tiny_gemma, "first", epochs=10)
    assert run_job(tmp_path, first) == jobs.SUCCEEDED
    second = submit(tmp_path, tiny_gemma, "second", epochs=1, source_adapter=first / "adapter")
    assert run_job(tmp_path, second) == jobs.SUCCEEDED
    first_losses = [s["mean_loss"] for s in jobs.read_progress(first)["snapshots"]]
    second_losses = [s["mean_loss"] for s in jobs.read_progress(second)["snapshots"]]
    assert second_losses[0] < first_losses[0] / 2  # it already knows the task


def test_missing_source_adapter_fails_the_job(tiny_gemma: Path, tmp_path: Path) -> None:
    directory = submit(tmp_path, tiny_gemma, source_adapter=tmp_path / "no-adapter")
    assert run_job(tmp_path, directory) == jobs.FAILED
    assert "is not an adapter directory" in jobs.read_progress(directory)["error"]


def test_a_job_whose_worker_keeps_dying_without_progress_fails(tiny_gemma: Path, tmp_path: Path) -> None:
    directory = submit(tmp_path, tiny_gemma)
    # Three attempts died, the last of them no further than step 4, where the one before it had got.
    jobs.write_progress(directory, {**jobs.default_progress(), "state": "RUNNING", "attempts": 3,
                                    "completed_steps": 4, "attempt_step": 4})
    assert run_job(tmp_path, directory) == jobs.FAILED
    assert "stopped 3 times in a row while running this job" in jobs.read_progress(directory)["error"]


def test_deaths_between_which_training_advanced_do_not_add_up(tiny_gemma: Path, tmp_path: Path) -> None:
    directory = submit(tmp_path, tiny_gemma)
    # Three attempts died, but the last got from step 4 to step 7 before it did.
    jobs.write_progress(directory, {**jobs.default_progress(), "state": "RUNNING", "attempts": 3,
                                    "completed_steps": 7, "attempt_step": 4})
    assert run_job(tmp_path, directory) == jobs.SUCCEEDED
    assert jobs.read_progress(directory)["attempts"] == 1


def test_clean_shutdowns_do_not_count_as_attempts(tiny_gemma: Path, tmp_path: Path) -> None:
    directory = submit(tmp_path, tiny_gemma, epochs=5)
    for _ in range(4):
        steps: list[int] = []
        options = RunOptions(should_stop=lambda steps=steps: len(steps) >= 2, on_step=steps.append)
        assert run_job(tmp_path, directory, options) == jobs.RUNNING
    assert jobs.read_progress(directory)["attempts"] == 0
    assert run_job(tmp_path, directory) == jobs.SUCCEEDED
    assert jobs.read_progress(directory)["completed_steps"] == 15


def test_a_job_directory_deleted_while_running_does_not_crash(tiny_gemma: Path, tmp_path: Path) -> None:
    import shutil

    directory = submit(tmp_path, tiny_gemma, epochs=5)

    def delete_at_step_2(step: int) -> None:
        if step == 2:
            shutil.rmtree(directory)

    assert run_job(tmp_path, directory, RunOptions(on_step=delete_at_step_2)) == jobs.FAILED
    assert not directory.exists()
