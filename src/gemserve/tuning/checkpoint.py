"""A job's resume point: one file, `<job_dir>/checkpoint.pt`, replaced whole or not at all.

It holds the trainer's `state_dict()` (LoRA weights, optimizer and RNG state, data order, step, snapshots).
It is written to a temporary file in the same directory, flushed to disk, then renamed over the old one, so a
process killed at any moment leaves either the previous checkpoint or the new one, never a torn file. It is
loaded with `weights_only=True`: tensors and plain Python values, no pickled code.

Not here: deciding when to checkpoint (`runner.py`).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import torch

from gemserve.tuning.jobs import atomic_write_bytes

log = logging.getLogger("gemserve.tuning")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The saved state, or None when there is none. An unreadable file is reported and ignored: the job then
    starts over rather than failing."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a checkpoint from an incompatible version, or a damaged disk
        log.warning("ignoring an unreadable checkpoint", extra={"path": str(path), "error": str(exc)})
        return None
    return state if isinstance(state, dict) else None
