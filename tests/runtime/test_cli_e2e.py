"""End-to-end: the real `fedmosaic` command in real processes, killed and resumed."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CONFIG = """
name = "e2e"
seed = 5
rounds = {rounds}

[data]
dataset = "digits"

[partition]
method = "dirichlet"
clients = 20
alpha = 0.5

[model]
kind = "mlp"
hidden = [32]

[train]
lr = 0.05
epochs = 2

[strategy]
name = "fedavg"
clients_per_round = 8

[server_opt]
name = "fedadam"
lr = 0.01
"""


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedmosaic.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _write(tmp: Path, name: str, rounds: int) -> Path:
    path = tmp / name
    path.write_text(CONFIG.format(rounds=rounds))
    return path


@pytest.mark.slow
def test_kill_minus_nine_then_resume_equals_uninterrupted_run(tmp_path):
    rounds = 150
    cfg = _write(tmp_path, "exp.toml", rounds)
    full = _cli("run", str(cfg), "-o", "full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr

    proc = subprocess.Popen([sys.executable, "-m", "fedmosaic.cli", "run", str(cfg), "-o", "cut"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("round 3/"):
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["round"]
    assert 3 <= done < rounds, f"kill came too late to test resume (round {done})"
    assert not (tmp_path / "cut" / "model.pt").exists()

    res = _cli("resume", "cut", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"resuming after round {done}" in res.stdout
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)

    rep = _cli("report", "cut", cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr
    assert "test acc" in rep.stdout
    assert (tmp_path / "cut" / "report.png").read_bytes()[:4] == b"\x89PNG"

    again = _cli("resume", "cut", cwd=tmp_path)
    assert again.returncode == 0 and "already complete" in again.stdout


@pytest.mark.slow
def test_cli_refuses_bad_config_and_overwriting(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(CONFIG.format(rounds=2).replace('kind = "mlp"', 'kind = "transformer"'))
    res = _cli("run", str(bad), cwd=tmp_path)
    assert res.returncode == 2
    assert "model.kind" in res.stderr and "transformer" in res.stderr and "'mlp'" in res.stderr
    assert "Traceback" not in res.stderr

    cfg = _write(tmp_path, "ok.toml", 1)
    assert _cli("run", str(cfg), "-o", "out", cwd=tmp_path).returncode == 0
    before = (tmp_path / "out" / "checkpoint.pt").read_bytes()
    res = _cli("run", str(cfg), "-o", "out", cwd=tmp_path)
    assert res.returncode == 2 and "already holds a run" in res.stderr
    assert (tmp_path / "out" / "checkpoint.pt").read_bytes() == before

    res = _cli("resume", "nowhere", cwd=tmp_path)
    assert res.returncode == 2 and "not a fedmosaic run directory" in res.stderr


@pytest.mark.slow
def test_every_transport_gives_the_same_model_from_the_cli(tmp_path):
    models = {}
    for transport in ("sequential", "batched", "ray"):
        cfg = tmp_path / f"{transport}.toml"
        extra = {"sequential": "", "batched": "", "ray": "workers = 2\n"}[transport]
        cfg.write_text(CONFIG.format(rounds=2) + f'\n[runtime]\ntransport = "{transport}"\n'
                       + extra)
        res = _cli("run", str(cfg), "-o", transport, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert f"transport {transport}" in res.stdout
        models[transport] = torch.load(tmp_path / transport / "model.pt", weights_only=True)
    for name in ("batched", "ray"):
        for key, value in models["sequential"].items():
            assert torch.allclose(value, models[name][key], atol=1e-5), (name, key)
