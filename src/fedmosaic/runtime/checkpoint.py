"""Checkpoints: everything needed to continue a run exactly where it stopped."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from fedmosaic.core.errors import CheckpointError

FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write a file so that a crash at any moment leaves either the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(directory: Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` (round, weights, optimizer and RNG state, history)."""
    import io

    buf = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buf)
    path = Path(directory) / CHECKPOINT_NAME
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_checkpoint(directory: Path) -> dict[str, Any]:
    """Read a checkpoint; a missing, corrupt or foreign file raises ``CheckpointError``."""
    path = Path(directory) / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        # weights_only: a checkpoint is data, never code to run.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from exc
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a fedmosaic v{FORMAT_VERSION} checkpoint")
    return state
