"""Issue #5 acceptance on loopback with real processes: a server and 10 client processes over
mutual TLS; equality with the simulation; clients killed mid-round; the server killed with
SIGKILL mid-run and restarted."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from fedmosaic.build import build_data, build_strategy, build_trainer
from fedmosaic.config import load_experiment
from fedmosaic.runtime.simulate import simulate
from tests.net.conftest import (
    CLIENTS,
    REVOKED,
    Processes,
    experiment_toml,
    operator_status,
    server_status,
    wait_for_endpoint,
    wait_until,
)

pytestmark = pytest.mark.slow


def _simulated(experiment: Path) -> Any:
    exp = load_experiment(experiment)
    fed = build_data(exp)
    return simulate(build_trainer(exp, fed), fed, build_strategy(exp), exp[""]["rounds"],
                    seed=exp[""]["seed"], identity=exp.identity())


def _history(out: Path) -> list[dict[str, Any]]:
    return json.loads((out / "metrics.json").read_text())


def test_ten_clients_over_tls_reach_the_simulated_model(
        tmp_path: Path, federation: Path, processes: Processes) -> None:
    experiment = experiment_toml(tmp_path / "exp.toml", federation, rounds=3)
    out = tmp_path / "out"
    processes.server(experiment, out, "--metrics-port", "0")
    endpoint = wait_for_endpoint(out, processes)
    port = endpoint["port"]
    status = operator_status(federation, port)  # the CLI, against the waiting server
    assert status["state"] == "waiting" and status["completed_rounds"] == 0
    assert status["rounds"] == 3
    # A revoked credential: the client reads the federation's CRL and gives up at once,
    # before dialling (the server's own refusal of revoked certificates: test_security.py).
    data = tmp_path / "spare.npz"
    np.savez(data, x=np.zeros((4, 64), dtype=np.float32), y=np.arange(4))
    processes.start(REVOKED, "client", "--server", f"127.0.0.1:{port}", "--credentials",
                    str(federation), "--id", REVOKED, "--data", str(data), "--trainer",
                    "tests.net.helpers:slow_trainer",
                    env={"FEDMOSAIC_TEST_EXPERIMENT": str(experiment),
                         "FEDMOSAIC_TEST_FIT_DELAY": "0"})
    assert processes.wait(REVOKED, 120) == 3  # ExitCode.REFUSED
    assert "revoked" in processes.log(REVOKED)
    for cid in CLIENTS:
        processes.client(cid, port, federation, experiment)
    metrics = urllib.request.urlopen(
        f"http://127.0.0.1:{endpoint['metrics_port']}/metrics", timeout=10).read().decode()
    assert 'fedmosaic_rejected_messages_total{reason="revoked"} 0.0' in metrics
    assert processes.wait("server", 400) == 0
    assert "refused Join from spare" not in processes.log("server")  # never dialled
    for cid in CLIENTS:
        assert processes.wait(cid, 120) == 0, processes.log(cid)
        assert "trained rounds [1, 2, 3]" in processes.log(cid)
    history = _history(out)
    assert [r["round"] for r in history] == [1, 2, 3]
    assert all(r["updates"] == 10 and r["failures"] == 0 for r in history)
    reference = _simulated(experiment)
    # Same seed, all clients: the same model up to the order of float additions.
    for net, sim in zip(history, reference.history):
        assert net["test_accuracy"] == pytest.approx(sim["test_accuracy"], abs=1e-6)
        assert net["train_loss"] == pytest.approx(sim["train_loss"], rel=1e-5)
    model = torch.load(out / "model.pt", weights_only=True)
    for name, value in reference.state_dict().items():
        assert torch.allclose(model[name], value, atol=1e-5), name
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" not in processes.log("server")


def _round_open(federation: Path, port: int, round_num: int) -> bool:
    try:
        st = server_status(federation, port)
    except grpc.RpcError:
        return False
    return st.state == "training" and st.round == round_num and st.round_tasks > 0


def _completed(federation: Path, port: int, rounds: int) -> bool:
    try:
        return server_status(federation, port).completed_rounds >= rounds
    except grpc.RpcError:
        return False


def test_clients_killed_mid_round_and_server_killed_and_restarted(
        tmp_path: Path, federation: Path, processes: Processes) -> None:
    experiment = experiment_toml(tmp_path / "exp.toml", federation, rounds=4)  # min_clients 10
    env = {"FEDMOSAIC_TEST_EXPERIMENT": str(experiment), "FEDMOSAIC_TEST_FIT_DELAY": "1.0"}
    out = tmp_path / "out"
    processes.server(experiment, out)
    endpoint = wait_for_endpoint(out, processes)
    port = endpoint["port"]
    for cid in CLIENTS:
        processes.client(cid, port, federation, experiment, "--trainer",
                         "tests.net.helpers:slow_trainer", env=env)
    # 30% of the clients die while round 2 is in progress: the round completes without them.
    wait_until(lambda: _round_open(federation, port, 2), 400, "round 2", processes)
    for cid in CLIENTS[7:]:
        processes.kill(cid)
    wait_until(lambda: _completed(federation, port, 2), 120, "round 2 to complete", processes)
    # The server now waits for 10 clients before round 3: kill -9 it there, and restart it
    # with a lower minimum; then kill -9 it again in the middle of round 3, and restart.
    processes.kill("server")
    for attempt in range(2):
        processes.server(experiment, out, "--port", str(port), "--min-clients", "7")
        endpoint = wait_for_endpoint(out, processes, instance_not=endpoint["instance"])
        if attempt == 0:
            wait_until(lambda: _round_open(federation, port, 3), 300, "round 3", processes)
            processes.kill("server")
    assert processes.wait("server", 400) == 0
    assert "resuming net-digits after round 2" in processes.log("server")
    history = _history(out)
    # Every round exactly once: none lost to the crashes, none counted twice.
    assert [r["round"] for r in history] == [1, 2, 3, 4]
    assert history[0]["updates"] == 10
    assert history[1]["updates"] == 7 and history[1]["failures"] == 3
    assert history[2]["updates"] == 7 and history[3]["updates"] == 7
    for cid in CLIENTS[:7]:
        assert processes.wait(cid, 120) == 0, processes.log(cid)
        log = processes.log(cid)
        assert "joined 3 times" in log  # it found each restarted server by itself
        assert "trained rounds [1, 2, " in log and ", 4]" in log
