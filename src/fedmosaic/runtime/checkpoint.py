"""Checkpoints: everything needed to continue a run exactly where it stopped."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from fedmosaic.core.errors import CheckpointError

FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
#: What a run writes into its output directory (``overwrite`` removes exactly these).
RUN_FILES = (CHECKPOINT_NAME, "metrics.json", "guarantees.json", "model.pt", "report.png")


def holds_run(directory: str | Path) -> bool:
    """Whether ``directory`` holds a run (a checkpoint) that a fresh run would overwrite."""
    return (Path(directory) / CHECKPOINT_NAME).is_file()


def clear_run(directory: str | Path) -> None:
    """Remove a run's files from ``directory`` (nothing else: it may hold the user's files)."""
    for name in RUN_FILES:
        (Path(directory) / name).unlink(missing_ok=True)


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):  # an empty table sets nothing: as if absent
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix and key else prefix or key, out)
    else:
        out[prefix] = value


def _show(value: Any) -> str:
    """A value as the experiment file writes it (strings quoted); long lists summarized."""
    if value is None:
        return "None"  # only Python-built strategies have unset values (TOML has no null)
    if isinstance(value, list) and len(str(value)) > 200:
        return f"a list of {len(value)}"
    return json.dumps(value)


def describe_identity_change(saved: dict[str, Any], current: dict[str, Any],
                             limit: int = 3) -> str | None:
    """What differs between the identity a checkpoint was made with and the current one,
    in the experiment file's terms: "the checkpoint was made with train.lr = 0.05; the
    experiment now says 0.1". ``None`` when nothing differs that can be named.

    An identity has the user's part (the experiment file's tables, keyed "train.lr"), the seed,
    the strategy as built and the model's parameter layout; when the user's part names the
    change, the strategy's echo of it is not repeated.
    """
    names = {"user": "", "seed": "seed", "strategy": "strategy", "spec": "the model layout"}
    diffs: list[tuple[str, Any, Any]] = []
    for part in ("user", "seed", "strategy", "spec"):
        if part == "strategy" and diffs:
            break  # the strategy mirrors the experiment file: its change is already named
        old: dict[str, Any] = {}
        new: dict[str, Any] = {}
        if part == "spec":  # a list of tensors: one change, not one per entry
            old["the model layout"], new["the model layout"] = saved.get(part), current.get(part)
        else:
            _flatten(saved.get(part), names[part], old)
            _flatten(current.get(part), names[part], new)
        for key in sorted(set(old) | set(new)):
            if old.get(key, _MISSING) != new.get(key, _MISSING):
                diffs.append((key, old.get(key, _MISSING), new.get(key, _MISSING)))
    if not diffs:
        return None
    phrases = []
    for key, was, now in diffs[:limit]:
        if key == "the model layout":
            phrases.append("the model's parameter layout differs (another architecture or "
                           "data shape)")
        elif was is _MISSING:
            phrases.append(f"the checkpoint was made without {key}; the experiment now says "
                           f"{_show(now)}")
        elif now is _MISSING:
            phrases.append(f"the checkpoint was made with {key} = {_show(was)}; the experiment "
                           "now does not set it")
        else:
            phrases.append(f"the checkpoint was made with {key} = {_show(was)}; the experiment "
                           f"now says {_show(now)}")
    more = len(diffs) - limit
    return "; ".join(phrases) + (f" (and {more} more difference{'s' * (more > 1)})"
                                 if more > 0 else "")


_MISSING = object()


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write a file so that a crash at any moment leaves either the old or the new file.

    The data is fsynced before the rename, and the directory after it (POSIX), so that after
    a power loss too the file found is a complete one; a process killed before the rename
    leaves its temporary file (``remove_stale_temporaries`` clears it at the next start)."""
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
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable; a no-op where directories cannot be opened or
    synced (Windows, some network file systems): the rename is still atomic there."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary_pattern(names: tuple[str, ...]) -> re.Pattern[str]:
    """The names ``atomic_write_bytes`` gives its temporary files for ``names``: exactly
    ``tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp")``, whose random part is 8 characters
    of ``[a-z0-9_]`` (CPython's ``tempfile._RandomNameSequence``)."""
    alternatives = "|".join(re.escape(n) for n in names)
    return re.compile(rf"\.(?:{alternatives})\.[a-z0-9_]{{8}}\.tmp")


def remove_stale_temporaries(directory: str | Path,
                             names: tuple[str, ...] = RUN_FILES) -> list[Path]:
    """Remove the temporary files that a process killed inside ``atomic_write_bytes`` left in
    ``directory`` for the files ``names`` (``.checkpoint.pt.x8abc_2q.tmp`` and the like), and
    return them. Only those exact names are touched, never the user's files, and only call
    this where no other process is writing into ``directory`` (a server owns its output
    directory): a temporary file being written at that moment would be removed too."""
    pattern = _temporary_pattern(tuple(names))
    removed: list[Path] = []
    try:
        entries = list(Path(directory).iterdir())
    except FileNotFoundError:
        return removed
    for path in sorted(entries):
        if pattern.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


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
