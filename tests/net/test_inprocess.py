"""The Python API end to end in one process: ``Server`` + ``GrpcTransport`` + ``start_server``
on loopback with mutual TLS, clients as threads calling ``run_client``. Fast checks that the
deployed path equals the simulation, with and without SecAgg+."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

from fedmosaic.algorithms.strategy import FedAvg
from fedmosaic.data import FederatedDataset
from fedmosaic.models import build_model
from fedmosaic.net.certs import create_federation
from fedmosaic.net.secagg import SecAggRoundDriver
from fedmosaic.privacy.local_dp import LocalDP
from fedmosaic.privacy.secagg.errors import SecAggProtocolError
from fedmosaic.privacy.secagg.protocol import SecAggPlusClient
from fedmosaic.runtime.simulate import simulate
from fedmosaic.train import TorchTrainer
from tests.net.harness import deploy_in_process

ROUNDS = 2


def _trainer() -> TorchTrainer:
    return TorchTrainer(partial(build_model, "mlp", (5,), 3, hidden=(8,)), lr=0.1, batch_size=8)


_FIT_LOCK = threading.Lock()


class _ClientThreadTrainer(TorchTrainer):
    """Client threads share one process and so torch's global RNG, which each fit seeds
    (inside ``fork_rng``): fits must not interleave. Separate client processes need no lock."""

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        with _FIT_LOCK:
            return super().fit(*args, **kwargs)


def _client_trainer() -> TorchTrainer:
    return _ClientThreadTrainer(partial(build_model, "mlp", (5,), 3, hidden=(8,)), lr=0.1,
                                batch_size=8)


@pytest.fixture(scope="module")
def blobs_federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("blobs-fed")
    create_federation(root, clients=[f"c{i}" for i in range(6)], ca_passphrase=None)
    return root


def _deploy(fed: FederatedDataset, credentials: Path, strategy: FedAvg,
            secagg: SecAggRoundDriver | None = None) -> tuple[Any, list[Any]]:
    result, reports = deploy_in_process(fed, credentials, strategy, trainer=_trainer(),
                                        client_trainer=_client_trainer, rounds=ROUNDS,
                                        secagg=secagg)
    return result, list(reports.values())


@pytest.fixture
def reference(blobs_fed: FederatedDataset) -> Iterator[Any]:
    yield simulate(_trainer(), blobs_fed, FedAvg(), ROUNDS, seed=5)


def test_python_api_equals_the_simulation(blobs_fed: FederatedDataset,
                                          blobs_federation: Path, reference: Any) -> None:
    result, reports = _deploy(blobs_fed, blobs_federation, FedAvg())
    assert len(reports) == 6 and all(r.rounds == [1, 2] for r in reports)
    assert [r["updates"] for r in result.history] == [6, 6]
    assert torch.allclose(result.weights, reference.weights, atol=1e-6)
    assert result.history[-1]["test_accuracy"] == pytest.approx(
        reference.history[-1]["test_accuracy"], abs=1e-9)


def test_client_stages_run_on_the_clients_with_noise_the_server_cannot_reproduce(
        blobs_fed: FederatedDataset, blobs_federation: Path) -> None:
    # The clip runs on the clients: with negligible noise the deployment equals the simulation.
    quiet = LocalDP(clip=0.5, noise_multiplier=1e-7)
    result, _ = _deploy(blobs_fed, blobs_federation, FedAvg(client_stages=[quiet]))
    expected = simulate(_trainer(), blobs_fed, FedAvg(client_stages=[quiet]), ROUNDS, seed=5)
    assert torch.allclose(result.weights, expected.weights, atol=1e-5)
    # Real noise is drawn from each client's own CSPRNG, not from the seed the server sent:
    # the server's seeded replay of the same run no longer gives the deployed model.
    noisy = LocalDP(clip=0.5, noise_multiplier=0.3)
    result, _ = _deploy(blobs_fed, blobs_federation, FedAvg(client_stages=[noisy]))
    replay = simulate(_trainer(), blobs_fed, FedAvg(client_stages=[noisy]), ROUNDS, seed=5)
    assert float((result.weights - replay.weights).abs().max()) > 1e-3


def test_secagg_over_grpc_equals_fedavg_up_to_quantization(
        blobs_fed: FederatedDataset, blobs_federation: Path, reference: Any) -> None:
    driver = SecAggRoundDriver(clip=1.0, max_weight=64.0, uniform=False)
    result, reports = _deploy(blobs_fed, blobs_federation, FedAvg(), secagg=driver)
    assert [r["updates"] for r in result.history] == [6, 6]
    assert all(r.rounds == [1, 2] for r in reports)
    assert "train_loss" not in result.history[0]  # no per-client metrics under SecAgg+
    assert result.guarantees["secure_aggregation"]["threshold"] is not None
    assert torch.allclose(result.weights, reference.weights, atol=1e-5)


@pytest.mark.parametrize("method", ["handle_shares", "handle_unmask"])
def test_secagg_client_that_fails_mid_protocol_is_a_dropout(
        blobs_fed: FederatedDataset, blobs_federation: Path, reference: Any,
        monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    original = getattr(SecAggPlusClient, method)

    def failing(self: SecAggPlusClient, *args: Any) -> Any:
        if self.client_id == 2:  # participant 2 is c2 (participants are sorted by id)
            raise SecAggProtocolError(f"simulated failure in {method}")
        return original(self, *args)

    monkeypatch.setattr(SecAggPlusClient, method, failing)
    # One dropout of 6: the most the parameters can tolerate with a fifth corrupted (gamma 0.2).
    driver = SecAggRoundDriver(clip=1.0, max_weight=64.0, uniform=False, dropout_rate=0.1)
    result, _ = _deploy(blobs_fed, blobs_federation, FedAvg(), secagg=driver)
    if method == "handle_unmask":
        # Its masked input was in before it failed: the sum still holds all six.
        assert [(r["updates"], r["failures"]) for r in result.history] == [(6, 0), (6, 0)]
        assert torch.allclose(result.weights, reference.weights, atol=1e-5)
        return
    assert [(r["updates"], r["failures"]) for r in result.history] == [(5, 1), (5, 1)]
    # The sum of the other five, decoded with the round's quantizer: FedAvg over them.
    others = FederatedDataset("blobs5", [c for c in blobs_fed.clients if c.client_id != "c2"],
                              blobs_fed.test, blobs_fed.num_classes, blobs_fed.feature_shape)
    expected = simulate(_trainer(), others, FedAvg(), ROUNDS, seed=5)
    assert torch.allclose(result.weights, expected.weights, atol=1e-5)
