"""Files the worker writes are whole or absent: checkpoints, progress, the exported adapter."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from gemserve.tuning import export, jobs
from gemserve.tuning.checkpoint import load_checkpoint, save_checkpoint
from gemserve.tuning.runner import run_job
from tests.tuning import tiny


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 10, "weights": torch.ones(3)})

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("killed mid-rename")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        save_checkpoint(path, {"step": 20, "weights": torch.zeros(3)})
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state is not None and state["step"] == 10
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_damaged_checkpoint_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"PK\x03\x04 not a whole zip")
    assert load_checkpoint(path) is None
    assert load_checkpoint(tmp_path / "missing.pt") is None


def test_a_failed_export_leaves_no_adapter(tiny_gemma: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_gguf(peft_dir: Path, out_file: Path, *args: object) -> None:
        out_file.write_bytes(b"GGUF half")
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_gguf_adapter", failing_gguf)
    directory = jobs.write_job(tmp_path, tiny.job_document("job-1", tiny_gemma, tiny.MEMORY_TASK, epochs=1))
    assert run_job(tmp_path, directory) == jobs.FAILED
    progress = jobs.read_progress(directory)
    assert progress["error"] == "internal error: OSError: disk full"
    assert progress["completed_steps"] == 3  # what was done is still reported
    assert jobs.adapter_paths(directory) is None
    assert sorted(p.name for p in directory.iterdir()) == ["job.json", "progress.json"]
