"""The worker as a process: it survives SIGKILL (the next one resumes from the checkpoint), stops cleanly on
SIGTERM, waits while another worker holds the lock, picks the oldest job first, and logs JSON lines only."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gemserve.tuning import jobs
from gemserve.tuning.checkpoint import load_checkpoint
from gemserve.tuning.runner import run_job
from gemserve.tuning.worker import job_owner, pending_jobs, serve
from tests.tuning import tiny

SECRET = [{"text_input": f"secret-input-{i}", "output": f"secret-output-{i}"} for i in range(6)]


def start_worker(data_dir: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "gemserve.tuning.worker", "--data-dir", str(data_dir), "--threads", "1",
           "--checkpoint-every", "10", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log.open("ab"))


def wait_for(condition, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def test_killed_worker_is_resumed_from_its_checkpoint(tiny_gemma: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    directory = jobs.write_job(data, tiny.job_document("job-1", tiny_gemma, SECRET, epochs=100, seed=9))
    log = tmp_path / "worker.log"
    worker = start_worker(data, log, "--once")
    try:
        wait_for(lambda: jobs.read_progress(directory)["completed_steps"] >= 25, what="25 steps")
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    finally:
        stop(worker)
    before = jobs.read_progress(directory)
    checkpoint = load_checkpoint(directory / jobs.CHECKPOINT_FILE)
    assert before["state"] == "RUNNING" and checkpoint is not None
    resume_step = checkpoint["step"]
    assert 20 <= resume_step <= before["completed_steps"] < 300

    seen: list[int] = []
    worker = start_worker(data, log, "--once")
    try:
        while worker.poll() is None:
            seen.append(jobs.read_progress(directory)["completed_steps"])
            time.sleep(0.01)
    finally:
        stop(worker)
    assert worker.returncode == 0
    assert min(seen) >= resume_step  # progress never went back past the checkpoint
    after = jobs.read_progress(directory)
    assert after["state"] == "SUCCEEDED"
    assert after["completed_steps"] == after["total_steps"] == 300
    assert [s["step"] for s in after["snapshots"]] == list(range(1, 301))
    assert after["snapshots"][:resume_step] == before["snapshots"][:resume_step]  # kept from before the kill

    # The same job run straight through in this process gives the same adapter.
    straight = jobs.write_job(data, tiny.job_document("straight", tiny_gemma, SECRET, epochs=100, seed=9))
    assert run_job(data, straight) == jobs.SUCCEEDED
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(directory / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)

    lines = log.read_text().splitlines()
    assert lines and all(json.loads(line)["logger"] for line in lines)  # JSON lines only
    assert "secret" not in log.read_text()  # never the examples' text
    assert any(json.loads(line)["message"] == "tuning job resumed from its checkpoint" for line in lines)


def test_sigterm_checkpoints_and_exits(tiny_gemma: Path, tmp_path: Path) -> None:
    directory = jobs.write_job(tmp_path, tiny.job_document("job-1", tiny_gemma, SECRET, epochs=200))
    worker = start_worker(tmp_path, tmp_path / "worker.log")
    try:
        wait_for(lambda: jobs.read_progress(directory)["completed_steps"] >= 5, what="5 steps")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    finally:
        stop(worker)
    progress = jobs.read_progress(directory)
    checkpoint = load_checkpoint(directory / jobs.CHECKPOINT_FILE)
    assert progress["state"] == "RUNNING"
    assert checkpoint is not None and checkpoint["step"] == progress["completed_steps"]


def test_a_second_worker_waits_for_the_lock(tmp_path: Path) -> None:
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = start_worker(tmp_path, first_log)
    second = None
    try:
        wait_for(lambda: "tuning worker ready" in first_log.read_text(), what="the first worker")
        second = start_worker(tmp_path, second_log)
        wait_for(lambda: "holds the lock" in second_log.read_text(), what="the second worker to wait")
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
        assert "tuning worker ready" not in second_log.read_text()
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0
    finally:
        stop(first)
        if second is not None:
            stop(second)


def test_a_worker_stops_when_the_server_that_started_it_dies(tmp_path: Path) -> None:
    """A server killed with SIGKILL must not leave its worker holding the lock for the next server's worker."""
    log = tmp_path / "worker.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    worker_cmd = [sys.executable, "-m", "gemserve.tuning.worker", "--data-dir", str(tmp_path), "--threads", "1"]
    # A stand-in server: starts the worker as the supervisor does, prints its pid, then waits to be killed.
    server = subprocess.Popen([sys.executable, "-c", (
        "import os, subprocess, sys, time\n"
        f"cmd = {worker_cmd!r} + ['--parent-pid', str(os.getpid())]\n"
        f"worker = subprocess.Popen(cmd, stderr=open({str(log)!r}, 'ab'))\n"
        "print(worker.pid, flush=True)\n"
        "time.sleep(600)\n")], env=env, stdout=subprocess.PIPE)
    assert server.stdout is not None
    worker_pid = int(server.stdout.readline())
    try:
        wait_for(lambda: "tuning worker ready" in log.read_text(), what="the worker")
        server.kill()
        server.wait()
        wait_for(lambda: "tuning worker stopped" in log.read_text(), timeout=30, what="the orphaned worker to stop")
        successor = start_worker(tmp_path, tmp_path / "successor.log")
        try:
            wait_for(lambda: "tuning worker ready" in (tmp_path / "successor.log").read_text(), what="the lock")
        finally:
            stop(successor)
    finally:
        server.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker_pid, signal.SIGKILL)


def test_oldest_unfinished_job_first(tiny_gemma: Path, tmp_path: Path) -> None:
    for job_id, created in [("b", "2025-01-02T00:00:00Z"), ("a", "2025-01-03T00:00:00Z"),
                            ("c", "2025-01-01T00:00:00Z"), ("d", "2025-01-01T00:00:00Z")]:
        jobs.write_job(tmp_path, tiny.job_document(job_id, tiny_gemma, SECRET, created=created))
    jobs.write_progress(jobs.job_dir(tmp_path, "d"), {**jobs.default_progress(), "state": "FAILED"})
    (jobs.jobs_root(tmp_path) / "e").mkdir()  # job.json not written yet: not a job
    assert [p.name for p in pending_jobs(tmp_path)] == ["c", "b", "a"]


def test_keys_take_turns_and_a_running_job_resumes_first(tiny_gemma: Path, tmp_path: Path) -> None:
    # Key a queued three jobs before key b's one: b's waits for one of a's, not for all three.
    for job_id, owner, created in [("a1", "a", "2025-01-01T00:00:00Z"), ("a2", "a", "2025-01-02T00:00:00Z"),
                                   ("a3", "a", "2025-01-03T00:00:00Z"), ("b1", "b", "2025-01-04T00:00:00Z"),
                                   ("c1", "c", "2025-01-05T00:00:00Z")]:
        jobs.write_job(tmp_path, {**tiny.job_document(job_id, tiny_gemma, SECRET, created=created), "owner": owner})
    assert [p.name for p in pending_jobs(tmp_path)] == ["a1", "b1", "c1", "a2", "a3"]
    jobs.write_progress(jobs.job_dir(tmp_path, "a3"), {**jobs.default_progress(), "state": "RUNNING"})
    # The running job is a's turn: the other keys come before a's next one.
    assert [p.name for p in pending_jobs(tmp_path)] == ["a3", "b1", "c1", "a1", "a2"]


def test_the_worker_serves_keys_in_turn_over_many_jobs(tiny_gemma: Path, tmp_path: Path) -> None:
    # As serve() does: take the first, count it for its owner, finish it, ask again.
    for i in range(4):
        jobs.write_job(tmp_path, {**tiny.job_document(f"a{i}", tiny_gemma, SECRET, created=f"2025-01-0{i + 1}"),
                                  "owner": "a"})
    jobs.write_job(tmp_path, {**tiny.job_document("b0", tiny_gemma, SECRET, created="2025-02-01"), "owner": "b"})
    served: Counter[str] = Counter()
    order = []
    while waiting := pending_jobs(tmp_path, served):
        served[job_owner(waiting[0])] += 1
        order.append(waiting[0].name)
        jobs.write_progress(waiting[0], {**jobs.default_progress(), "state": "SUCCEEDED"})
    assert order == ["a0", "b0", "a1", "a2", "a3"]


def test_serve_runs_queued_jobs_one_at_a_time_until_stopped(tiny_gemma: Path, tmp_path: Path) -> None:
    first = jobs.write_job(tmp_path, tiny.job_document("first", tiny_gemma, SECRET, epochs=1))
    bad = tmp_path / "tuning" / "jobs" / "bad"
    bad.mkdir()
    (bad / "job.json").write_text("[]")
    stop_event = threading.Event()
    serve(tmp_path, stop_event, once=True)
    assert jobs.read_progress(first)["state"] == "SUCCEEDED"
    assert jobs.read_progress(bad)["error"] == "job.json must hold a JSON object"
    assert pending_jobs(tmp_path) == []


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
