"""The command line as a user meets it (issue #10, items 4 and 6): conventions (-h,
--version, python -m fedmosaic, a fast --help), one-line errors without tracebacks for user
mistakes, Ctrl-C, and what resume and report say. Real processes, real pipes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedmosaic.data.partition import IID, PartitionError, partition
from fedmosaic.runtime.checkpoint import load_checkpoint

CONFIG = """
name = "ux"
seed = 1
rounds = {rounds}

[data]
dataset = "digits"

[partition]
method = "iid"
clients = {clients}

[model]
kind = "mlp"
hidden = [16]

[train]
lr = {lr}
epochs = 1

[strategy]
name = "fedavg"
clients_per_round = {cohort}
{extra}"""


def _config(tmp: Path, name: str = "exp.toml", *, rounds: int = 2, clients: int = 10,
            lr: float = 0.05, cohort: int = 4, extra: str = "") -> Path:
    path = tmp / name
    path.write_text(CONFIG.format(rounds=rounds, clients=clients, lr=lr, cohort=cohort,
                                  extra=extra))
    return path


def _cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    # stdout and stderr are pipes, as in CI logs and `fedmosaic ... 2>&1 | tee`.
    return subprocess.run([sys.executable, "-m", "fedmosaic", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def _run_here(*args: str) -> Any:
    """The command in this process (torch is loaded already: no 3 s start per case); its
    stderr is not a terminal, as on a pipe."""
    from typer.testing import CliRunner

    from fedmosaic.cli import app

    return CliRunner().invoke(app, list(args))


def _error(proc: Any, message: str, code: int = 2) -> None:
    """Exactly one line on stderr, the whole message, no traceback."""
    code_of = proc.returncode if hasattr(proc, "returncode") else proc.exit_code
    assert code_of == code, proc.stderr
    assert proc.stderr == f"error: {message}\n"


# -- conventions -------------------------------------------------------------------------------
def test_help_short_and_long_version_and_python_dash_m(tmp_path):
    long, short = _cli("--help", cwd=tmp_path), _cli("-h", cwd=tmp_path)
    assert long.returncode == short.returncode == 0
    assert long.stdout == short.stdout and "Usage: python -m fedmosaic" in long.stdout
    for command in (("run", "-h"), ("certs", "init", "-h"), ("audit", "privacy", "-h"),
                    ("watermark", "verify", "-h"), ("client", "-h")):
        proc = _cli(*command, cwd=tmp_path)
        assert proc.returncode == 0 and "Usage:" in proc.stdout, command
    from fedmosaic import __version__

    for flag in ("--version", "-V"):
        proc = _cli(flag, cwd=tmp_path)
        assert (proc.returncode, proc.stdout) == (0, f"fedmosaic {__version__}\n")


def test_the_command_line_loads_no_heavy_module(tmp_path):
    """`fedmosaic --help` answers at once: importing the command line (every command group
    included) loads none of torch, gRPC, cryptography, scikit-learn, scipy or matplotlib."""
    heavy = ("torch", "grpc", "cryptography", "sklearn", "scipy", "matplotlib", "pandas",
             "opacus", "numpy")
    code = ("import sys, fedmosaic.cli; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# -- one-line errors ---------------------------------------------------------------------------
def test_unknown_table_is_named_with_its_brackets_on_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(_config(tmp_path).read_text().replace("[data]", "[dataa]"))
    proc = _cli("run", str(path), cwd=tmp_path)  # a real pipe: rich would wrap at 80 columns
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: config key 'dataa': got {'dataset': 'digits'}; "
                                  "allowed: one of the known keys: [anomaly], [attack], [clock], "
                                  "[data], ")
    assert proc.stderr.endswith(", [train], [watermark], eval_every, name, output, rounds, "
                                "seed, threads\n")
    assert proc.stderr.count("\n") == 1 and len(proc.stderr) > 200


def test_server_json_logs_carry_the_final_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(_config(tmp_path).read_text().replace("rounds = 2", "rounds = 0"))
    proc = _cli("server", str(path), "--json-logs", cwd=tmp_path)
    assert proc.returncode == 2
    json_line, plain, *rest = proc.stderr.splitlines()
    record = json.loads(json_line)
    assert record["level"] == "ERROR" and record["logger"] == "fedmosaic.cli"
    assert plain == f"error: {record['message']}" and not rest
    assert "rounds" in record["message"]


def test_more_clients_than_samples(tmp_path):
    proc = _run_here("run", str(_config(tmp_path, clients=2000)), "-o", str(tmp_path / "o"))
    _error(proc, "[partition] clients = 2000 but the data set has 1437 training samples: at "
                 "most 1437 clients")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda(tmp_path):
    proc = _run_here("run", str(_config(tmp_path, extra='\n[runtime]\ndevice = "cuda"\n')),
                     "-o", str(tmp_path / "o"))
    _error(proc, 'device = "cuda" but CUDA is not available on this machine; use device = "cpu"')


def test_clients_per_round_above_the_population(tmp_path):
    proc = _run_here("run", str(_config(tmp_path, cohort=12)), "-o", str(tmp_path / "o"))
    _error(proc, "[strategy] clients_per_round = 12 but the federation has 10 clients: at "
                 "most 10")


class _Samples:
    """A data set a user built without ArrayDataset (which refuses negative labels itself)."""

    def __init__(self, y: list[int]) -> None:
        self.x, self.y = np.zeros((len(y), 2), np.float32), np.array(y)

    def __len__(self) -> int:
        return len(self.y)


def test_negative_labels_are_refused_before_any_training():
    train, test = _Samples([0, 1, -1, 2, -1, 0]), _Samples([0, 1])
    with pytest.raises(PartitionError) as info:
        partition(train, IID(), 2, 0, test=test)  # type: ignore[arg-type]
    assert str(info.value) == ("the training set has a negative label (-1, 2 samples); labels "
                               "must be class indices 0, 1, ..., C-1")
    with pytest.raises(PartitionError, match=r"^the test set has a negative label \(-3, 1 "):
        partition(test, IID(), 2, 0, test=_Samples([-3]))  # type: ignore[arg-type]


# -- resume and report -------------------------------------------------------------------------
def test_resume_refusals_name_what_changed_and_report_shows_every_round(tmp_path):
    out = tmp_path / "out"
    assert _run_here("run", str(_config(tmp_path, rounds=3)), "-o", str(out)).exit_code == 0
    saved = (out / "experiment.toml").read_text()
    # Fewer rounds than were run.
    (out / "experiment.toml").write_text(saved.replace("rounds = 3", "rounds = 2"))
    _error(_run_here("resume", str(out)),
           f"the run already completed 3 rounds; rounds = 2 in {out}/experiment.toml is fewer "
           f"(raise it to train further; 'fedmosaic report {out}' shows the 3 rounds run)")
    # A changed key.
    (out / "experiment.toml").write_text(saved.replace("rounds = 3", "rounds = 4")
                                         .replace("lr = 0.05", "lr = 0.1"))
    _error(_run_here("resume", str(out)),
           f"cannot resume the run in {out}: the checkpoint was made with train.lr = 0.05; the "
           "experiment now says 0.1 (a different experiment)")
    # More rounds: trains on, and report shows all of them.
    (out / "experiment.toml").write_text(saved.replace("rounds = 3", "rounds = 4"))
    assert _run_here("resume", str(out)).exit_code == 0
    report = _run_here("report", str(out))
    assert report.exit_code == 0
    rows = [line.split("│")[1].strip() for line in report.stdout.splitlines()
            if line.startswith("│")]
    assert rows == ["1", "2", "3", "4"]


def test_report_prefers_the_checkpoint_when_it_holds_more_rounds(tmp_path):
    """A finished 2-round run resumed to 4 rounds and stopped after round 3: metrics.json
    still holds 2 rounds, the checkpoint 3; report shows the 3 rounds that were run."""
    import fedmosaic as fm
    from fedmosaic.models import MLP
    from tests.conftest import make_blobs

    fed = partition(make_blobs(120, 0), IID(), 4, 0, test=make_blobs(40, 1))
    trainer = fm.TorchTrainer(lambda: MLP(5, [4], 3))
    fm.simulate(trainer, fed, fm.FedAvg(), rounds=2, out_dir=tmp_path)
    metrics = (tmp_path / "metrics.json").read_text()
    fm.simulate(trainer, fed, fm.FedAvg(), rounds=4, out_dir=tmp_path, resume=True,
                stop_after=3)
    (tmp_path / "metrics.json").write_text(metrics)  # as a Ctrl-C after round 3 leaves it
    assert len(json.loads(metrics)) == 2
    report = _run_here("report", str(tmp_path))
    assert report.exit_code == 0
    rows = [line.split("│")[1].strip() for line in report.stdout.splitlines()
            if line.startswith("│")]
    assert rows == ["1", "2", "3"]


# -- Ctrl-C ------------------------------------------------------------------------------------
def test_ctrl_c_says_where_the_run_stopped_and_how_to_continue(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedmosaic", "run", str(_config(tmp_path, rounds=500)), "-o",
         str(out)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # one plain line per round off a terminal
            if line.startswith("round 1/500"):
                break
        proc.send_signal(signal.SIGINT)
        start = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert time.monotonic() - start < 10
    assert proc.returncode == 130
    done = int(load_checkpoint(out)["round"])
    assert 1 <= done < 500
    assert stderr == f"interrupted after round {done}; continue with: fedmosaic resume {out}\n"
    # That it does continue from there: test_resume_refusals_... and tests/runtime/test_cli_e2e.
