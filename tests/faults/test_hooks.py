"""The fault-injection test hooks (``fedmosaic.faults.hooks``): off unless asked for, acting
only on fedmosaic's checkpoint files, at the N-th write, with a marker first."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedmosaic.faults import hooks

_WRITER = textwrap.dedent("""
    import os, sys, time
    from fedmosaic.faults.hooks import install_from_environment
    print(",".join(install_from_environment()))
    import torch
    from fedmosaic.runtime.checkpoint import atomic_write_bytes, save_checkpoint
    from pathlib import Path
    out = Path(sys.argv[1])
    for n in (1, 2, 3):
        t0 = time.monotonic()
        atomic_write_bytes(out / "metrics.json", b"[]")  # not a checkpoint
        save_checkpoint(out, {"round": n, "weights": torch.zeros(2)})
        print(n, round(time.monotonic() - t0, 2), sorted(os.listdir(out / "m")))
""")


def _run(tmp_path: Path, **env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k not in hooks.ALL}
    proc = subprocess.run([sys.executable, "-c", _WRITER, str(tmp_path)], capture_output=True,
                          text=True, timeout=120,
                          env={**base, hooks.MARKERS: str(tmp_path / "m"), **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.rstrip("\n").splitlines()


def test_slow_fsync_slows_only_the_nth_checkpoint_write(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    lines = _run(tmp_path, **{hooks.SLOW_FSYNC: "2:1.0"})
    assert lines[0] == hooks.SLOW_FSYNC
    timings = [float(line.split()[1]) for line in lines[1:]]
    assert timings[1] >= 1.0 and timings[0] < 1.0 and timings[2] < 1.0
    assert lines[1].endswith("[]") and lines[2].endswith("['fsync-2']")


def test_hold_after_the_nth_checkpoint_rename(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    lines = _run(tmp_path, **{hooks.HOLD_AFTER_CHECKPOINT: "1:1.0"})
    assert lines[0] == hooks.HOLD_AFTER_CHECKPOINT
    assert float(lines[1].split()[1]) >= 1.0 and lines[1].endswith("['checkpoint-1']")
    assert float(lines[2].split()[1]) < 1.0


def test_off_by_default(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    lines = _run(tmp_path)
    assert lines[0] == "" and all(line.endswith("[]") for line in lines[1:])


def test_bad_values_are_refused_with_the_variable_name() -> None:
    for bad in ("2", "x:1", "0:1", "1:-1"):
        with pytest.raises(ValueError, match=hooks.SLOW_FSYNC):
            hooks.install_from_environment({hooks.SLOW_FSYNC: bad})
