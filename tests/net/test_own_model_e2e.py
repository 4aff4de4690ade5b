"""Issue #10 acceptance: a user's own module (a custom ``nn.Module`` that is not in
``fedmosaic.models``) and one CSV per client run with ``fedmosaic run``, then, unchanged, with
``fedmosaic server`` and three ``fedmosaic client`` processes over mutual TLS on loopback, and
the deployment reaches the simulation's accuracy with the same seed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedmosaic.net.certs import create_federation
from tests.net.conftest import REPO, Processes, wait_for_endpoint

pytestmark = pytest.mark.slow

HOSPITALS = ["hospital_a", "hospital_b", "hospital_c"]

TASK = textwrap.dedent('''
    """A user's task module: its own model, nothing from fedmosaic.models."""
    import torch
    from torch import nn

    import fedmosaic as fm


    class GatedNet(nn.Module):
        """A small gated MLP (a user's own architecture)."""

        def __init__(self, features: int = 64, hidden: int = 24, classes: int = 10) -> None:
            super().__init__()
            self.value = nn.Linear(features, hidden)
            self.gate = nn.Linear(features, hidden)
            self.head = nn.Linear(hidden, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.value(x)) * torch.sigmoid(self.gate(x)))


    def make_trainer() -> fm.TorchTrainer:
        return fm.TorchTrainer(GatedNet, lr=0.3, epochs=1, batch_size=16)
''')


def _write_csv(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    cols = [f"f{i}" for i in range(x.shape[1])]
    lines = [",".join([*cols, "diagnosis"])]
    lines += [",".join([*(f"{v:g}" for v in row), str(int(label))]) for row, label in zip(x, y)]
    path.write_text("\n".join(lines) + "\n")


def _project(root: Path, federation: Path) -> Path:
    """task.py, one CSV per hospital and a test CSV (sklearn digits), and the experiment."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    test, train = slice(0, 300), slice(300, None)
    (root / "data").mkdir(parents=True)
    _write_csv(root / "data" / "test.csv", x[test], y[test])
    xs, ys = x[train], y[train]
    for i, h in enumerate(HOSPITALS):
        _write_csv(root / "data" / f"{h}.csv", xs[i::3], ys[i::3])
    (root / "task.py").write_text(TASK)
    clients = ", ".join(f'{h} = "data/{h}.csv"' for h in HOSPITALS)
    experiment = root / "experiment.toml"
    experiment.write_text(textwrap.dedent(f"""\
        name = "own-model"
        seed = 5
        rounds = 6

        [data]
        dataset = "files"
        clients = {{ {clients} }}
        label = "diagnosis"
        test = "data/test.csv"

        [model]
        factory = "task:make_trainer"

        [server]
        address = "127.0.0.1"
        port = 0
        credentials = "{federation}"
        min_clients = 3
        heartbeat_interval = 2.0
        round_deadline = 60.0
        wait_for_clients = 120.0
        linger = 5.0
    """))
    return experiment


def test_own_module_and_csvs_run_in_simulation_then_over_mtls(
        tmp_path: Path, processes: Processes) -> None:
    federation = tmp_path / "fed"
    create_federation(federation, clients=HOSPITALS, ca_passphrase=None)
    project = tmp_path / "project"
    experiment = _project(project, federation)

    sim_out = tmp_path / "sim"
    run = subprocess.run([sys.executable, "-m", "fedmosaic", "run", str(experiment),
                          "--output", str(sim_out)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    simulated = json.loads((sim_out / "metrics.json").read_text())
    assert [r["round"] for r in simulated] == [1, 2, 3, 4, 5, 6]
    assert simulated[-1]["test_accuracy"] > 0.8  # learns: 10 classes, chance is 0.1

    net_out = tmp_path / "net"
    processes.server(experiment, net_out)
    port = wait_for_endpoint(net_out, processes)["port"]
    for h in HOSPITALS:
        processes.client(h, port, federation, experiment)
    assert processes.wait("server", 300) == 0, processes.log("server")
    for h in HOSPITALS:
        assert processes.wait(h, 120) == 0, processes.log(h)
        assert "trained rounds [1, 2, 3, 4, 5, 6]" in processes.log(h)
    deployed = json.loads((net_out / "metrics.json").read_text())
    assert [r["updates"] for r in deployed] == [3] * 6
    # Same seed and clients: the same model up to the order of float additions.
    for net, sim in zip(deployed, simulated):
        assert net["test_accuracy"] == pytest.approx(sim["test_accuracy"], abs=1 / 300 + 1e-9)
        assert net["test_loss"] == pytest.approx(sim["test_loss"], rel=1e-3)
