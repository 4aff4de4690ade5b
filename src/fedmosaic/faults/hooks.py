"""Test hooks for fault injection, off by default: read only by ``python -m
fedmosaic.faults.launch`` (a ``fedmosaic`` command line with these hooks installed first) and
by the ``slow_trainer`` factory below. ``fedmosaic`` itself never reads these variables.

- ``FEDMOSAIC_FAULT_SLOW_FSYNC = "N:SECONDS"``: the N-th checkpoint this process writes sleeps
  SECONDS inside the fsync of its temporary file (after the data is written and synced, before
  the rename), so that a kill lands in the middle of the write and leaves the temporary file.
- ``FEDMOSAIC_FAULT_HOLD_AFTER_CHECKPOINT = "N:SECONDS"``: after the N-th checkpoint of this
  process is renamed into place, the writer sleeps SECONDS: the server has committed round N
  and told nobody yet (for a kill after the final round, before any client heard DONE).
- ``FEDMOSAIC_FAULT_MARKERS = DIR``: each hook, when it fires, first creates an empty file
  in DIR (``fsync-N``, ``checkpoint-N``) so the process driving the fault knows when to act.
- ``FEDMOSAIC_FAULT_FIT_DELAY = SECONDS`` with ``FEDMOSAIC_FAULT_EXPERIMENT = FILE``: the
  ``slow_trainer`` factory (``fedmosaic client --trainer fedmosaic.faults.hooks:slow_trainer``)
  builds the experiment's trainer and sleeps SECONDS before every local fit, results unchanged,
  so that a round is certainly in progress while the fault is injected.

The hooks wrap ``os.fsync`` and ``os.replace`` in the process and act only on fedmosaic's own
checkpoint files (``.checkpoint.pt.<8 random characters>.tmp`` and ``checkpoint.pt``), so they
keep working whatever code calls the atomic write.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

SLOW_FSYNC = "FEDMOSAIC_FAULT_SLOW_FSYNC"
HOLD_AFTER_CHECKPOINT = "FEDMOSAIC_FAULT_HOLD_AFTER_CHECKPOINT"
MARKERS = "FEDMOSAIC_FAULT_MARKERS"
FIT_DELAY = "FEDMOSAIC_FAULT_FIT_DELAY"
EXPERIMENT = "FEDMOSAIC_FAULT_EXPERIMENT"
ALL = (SLOW_FSYNC, HOLD_AFTER_CHECKPOINT, MARKERS, FIT_DELAY, EXPERIMENT)

_CHECKPOINT_TMP = re.compile(r"\.checkpoint\.pt\.[a-z0-9_]{8}\.tmp")
_CHECKPOINT = "checkpoint.pt"


def _nth_and_seconds(name: str, value: str) -> tuple[int, float]:
    try:
        nth, seconds = value.split(":")
        parsed = int(nth), float(seconds)
    except ValueError:
        raise ValueError(f"{name} must be 'N:SECONDS' (e.g. '2:30'), got {value!r}") from None
    if parsed[0] < 1 or parsed[1] < 0:
        raise ValueError(f"{name}: N must be >= 1 and SECONDS >= 0, got {value!r}")
    return parsed


def _mark(name: str) -> None:
    directory = os.environ.get(MARKERS)
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / name).touch()


def _fd_name(fd: int) -> str:
    try:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return ""


def install_from_environment(environ: dict[str, str] | None = None) -> list[str]:
    """Install the hooks the environment asks for; returns their variable names."""
    env = os.environ if environ is None else environ
    installed: list[str] = []
    if value := env.get(SLOW_FSYNC):
        nth, seconds = _nth_and_seconds(SLOW_FSYNC, value)
        real_fsync = os.fsync
        writes = [0]

        def slow_fsync(fd: Any) -> None:
            real_fsync(fd)
            if isinstance(fd, int) and _CHECKPOINT_TMP.fullmatch(_fd_name(fd)):
                writes[0] += 1
                if writes[0] == nth:
                    _mark(f"fsync-{nth}")
                    time.sleep(seconds)

        os.fsync = slow_fsync
        installed.append(SLOW_FSYNC)
    if value := env.get(HOLD_AFTER_CHECKPOINT):
        nth, seconds = _nth_and_seconds(HOLD_AFTER_CHECKPOINT, value)
        real_replace = os.replace
        renames = [0]

        def holding_replace(src: Any, dst: Any, **kwargs: Any) -> None:
            real_replace(src, dst, **kwargs)
            if os.path.basename(os.fspath(dst)) == _CHECKPOINT:
                renames[0] += 1
                if renames[0] == nth:
                    _mark(f"checkpoint-{nth}")
                    time.sleep(seconds)

        os.replace = holding_replace
        installed.append(HOLD_AFTER_CHECKPOINT)
    return installed


def slow_trainer() -> Any:
    """The trainer of ``$FEDMOSAIC_FAULT_EXPERIMENT``, each fit ``$FEDMOSAIC_FAULT_FIT_DELAY``
    seconds slower (default 1), results unchanged: a ``--trainer`` factory."""
    from fedmosaic.build import build_data, build_trainer
    from fedmosaic.config import load_experiment
    from fedmosaic.train.base import TrainerWrapper

    if EXPERIMENT not in os.environ:
        raise ValueError(f"slow_trainer needs {EXPERIMENT} (the experiment file)")
    delay = float(os.environ.get(FIT_DELAY, "1.0"))
    exp = load_experiment(os.environ[EXPERIMENT])

    class SlowTrainer(TrainerWrapper):
        def fit(self, weights: Any, data: Any, config: Any) -> Any:
            time.sleep(delay)
            return self.inner.fit(weights, data, config)

        def evaluate(self, weights: Any, data: Any) -> Any:
            return self.inner.evaluate(weights, data)

    return SlowTrainer(build_trainer(exp, build_data(exp)))
