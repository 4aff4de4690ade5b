"""The temporary files of atomic writes (issue #18): a process killed inside
``save_checkpoint`` leaves ``.checkpoint.pt.XXXXXXXX.tmp`` next to an intact checkpoint, and
``remove_stale_temporaries`` removes exactly such files, nothing of the user's."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from fedmosaic.runtime.checkpoint import (
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)

# Writes round 1, then is SIGKILLed inside the write of round 2: after the temporary file is
# written and synced, just before the rename (the moment a kill leaves the most behind).
_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from fedmosaic.runtime.checkpoint import save_checkpoint
    out = sys.argv[1]
    save_checkpoint(out, {"round": 1, "weights": torch.zeros(3)})
    os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
    save_checkpoint(out, {"round": 2, "weights": torch.ones(3)})
""")


def test_a_kill_during_the_write_leaves_a_temporary_file_that_start_up_removes(
        tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)],
                          capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "checkpoint.pt")
    assert len(left) == 1 and left[0].startswith(".checkpoint.pt.") and left[0].endswith(".tmp")
    assert int(load_checkpoint(tmp_path)["round"]) == 1  # the old checkpoint, intact

    removed = remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert remove_stale_temporaries(tmp_path) == []  # nothing left to remove


def test_only_fedmosaics_own_temporary_files_are_removed(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, {"round": 1, "weights": torch.zeros(2)})
    ours = [".checkpoint.pt.k2x9_q0a.tmp", ".metrics.json.abcd1234.tmp", ".model.pt.zzzzzzzz.tmp"]
    theirs = [".checkpoint.pt.tmp", ".checkpoint.pt.abc.tmp", ".checkpoint.pt.ABCD1234.tmp",
              ".checkpoint.pt.abcd12345.tmp", "checkpoint.pt.abcd1234.tmp",
              ".other.pt.abcd1234.tmp", ".checkpoint.pt.abcd1234.tmp.bak", "notes.tmp"]
    for name in ours + theirs:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".model.pt.dir12345.tmp").mkdir()  # a directory: never removed
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["checkpoint.pt", ".model.pt.dir12345.tmp", *theirs])
    # Only the names asked for: endpoint.json's temporary file is the server's to name.
    (tmp_path / ".endpoint.json.abcd1234.tmp").write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == []
    assert [p.name for p in remove_stale_temporaries(tmp_path, ("endpoint.json",))] == [
        ".endpoint.json.abcd1234.tmp"]
    assert remove_stale_temporaries(tmp_path / "missing") == []
