"""Issue #5 acceptance: SecAgg+ completes a round over gRPC with 10 client processes, two of
which die in the middle of the protocol; the server learns only the survivors' sum."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedmosaic.build import build_data, build_strategy, build_trainer
from fedmosaic.config import load_experiment
from fedmosaic.data import FederatedDataset
from fedmosaic.runtime.simulate import simulate
from tests.net.conftest import CLIENTS, Processes, experiment_toml, wait_for_endpoint

pytestmark = pytest.mark.slow

DROPS = {"client_03": "share_keys", "client_08": "masked_input"}


def test_secagg_round_over_grpc_with_two_dropouts(
        tmp_path: Path, federation: Path, processes: Processes) -> None:
    experiment = experiment_toml(tmp_path / "exp.toml", federation, rounds=1,
                                 extra="[runtime]\nsecure_aggregation = true\n"
                                       # SecAgg+ parameters that tolerate 2 of 10 dropping
                                       "secagg_dropout_rate = 0.3\n")
    out = tmp_path / "out"
    processes.server(experiment, out)
    port = wait_for_endpoint(out, processes)["port"]
    for cid in CLIENTS:
        env = {"FEDMOSAIC_TEST_EXPERIMENT": str(experiment)}
        if cid in DROPS:
            env["FEDMOSAIC_TEST_SECAGG_DROP"] = DROPS[cid]
        processes.client(cid, port, federation, experiment, "--trainer",
                         "tests.net.helpers:secagg_dropout_trainer", env=env)
    assert processes.wait("server", 400) == 0
    for cid in CLIENTS:
        code = processes.wait(cid, 120)
        assert code == (17 if cid in DROPS else 0), processes.log(cid)
    [record] = json.loads((out / "metrics.json").read_text())
    assert record["updates"] == 8 and record["failures"] == 2
    assert "train_loss" not in record  # per-client metrics would leak; SecAgg+ reports none
    guarantees = json.loads((out / "guarantees.json").read_text())["guarantees"]
    assert guarantees["secure_aggregation"]["protocol"].startswith("SecAgg+")
    # The secure sum is FedAvg over the eight survivors, up to quantization error.
    exp = load_experiment(experiment)
    fed = build_data(exp)
    survivors = FederatedDataset(fed.name, [c for c in fed.clients if c.client_id not in DROPS],
                                 fed.test, fed.num_classes, fed.feature_shape)
    reference = simulate(build_trainer(exp, fed), survivors, build_strategy(exp), 1,
                         seed=exp[""]["seed"], identity=exp.identity())
    model = torch.load(out / "model.pt", weights_only=True)
    for name, value in reference.state_dict().items():
        assert torch.allclose(model[name], value, atol=1e-5), name
