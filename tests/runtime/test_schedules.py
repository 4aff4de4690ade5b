"""The event-driven server core and its schedules (issue #11).

The synchronous schedule is compared, bit for bit, with a frozen copy of the server as it was
before the core became event-driven (``tests/runtime/legacy_server.py``): same final weights,
same records (but wall time), same checkpoint contents, same stop reason.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import fedmosaic as fm
from fedmosaic.data import ClientData, FederatedDataset
from fedmosaic.models import MLP
from fedmosaic.privacy.dp_fedavg import DPFedAvg
from fedmosaic.privacy.local_dp import LocalDP
from fedmosaic.robust import make_robust
from fedmosaic.robust.anomaly import AnomalyDetector
from fedmosaic.runtime import SequentialTransport
from fedmosaic.runtime.batched import BatchedTransport
from fedmosaic.runtime.checkpoint import load_checkpoint
from fedmosaic.runtime.evaluation import FederatedEvaluation
from fedmosaic.runtime.schedule import EventQueue, SyncSchedule
from tests.conftest import make_blobs


def _legacy() -> Any:
    path = Path(__file__).with_name("legacy_server.py")
    spec = importlib.util.spec_from_file_location("fedmosaic_legacy_server", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


LEGACY = _legacy()


def _trainer() -> fm.TorchTrainer:
    return fm.TorchTrainer(lambda: MLP(5, [8], 3), lr=0.1, batch_size=8)


@pytest.fixture
def local_fed() -> FederatedDataset:
    """Six clients of different sizes with local test splits, and a central test set."""
    sizes, test_sizes = [40, 25, 60, 13, 33, 50], [10, 8, 12, 5, 9, 11]
    clients = [ClientData(f"c{i}", make_blobs(n, seed=i), make_blobs(t, seed=50 + i))
               for i, (n, t) in enumerate(zip(sizes, test_sizes, strict=True))]
    return FederatedDataset(name="blobs", clients=clients, test=make_blobs(100, seed=99),
                            num_classes=3, feature_shape=(5,))


# Each configuration exercises another part of the round: generator draws for cohorts and
# stragglers, client stages with seeded noise, the DP strategy's before/finish hooks and its
# budget stop, robust aggregation with kept updates, partial sums (batched), evaluation.
CONFIGS: dict[str, Any] = {
    "fedavg": dict(strategy=lambda: fm.FedAvg(clients_per_round=4), eval_every=2),
    "fedprox_stragglers_fedadam": dict(strategy=lambda: fm.FedProx(
        mu=0.1, clients_per_round=4, stragglers=0.5, server_opt=fm.FedAdam(lr=0.05))),
    "local_dp_fedavgm_uniform": dict(strategy=lambda: fm.FedAvg(
        clients_per_round=3, weighting="uniform", server_opt=fm.FedAvgM(lr=1.0, momentum=0.5),
        client_stages=(LocalDP(clip=1.0, noise_multiplier=0.5),))),
    "dpfedavg_budget_stop": dict(strategy=lambda: DPFedAvg(
        clip=1.0, noise_multiplier=0.8, delta=1e-5, sampling="fixed", clients_per_round=3,
        rounds=4, budget_epsilon=24.0)),
    "multikrum_anomaly": dict(strategy=lambda: fm.FedAvg(
        weighting="uniform", robust=make_robust("multikrum", f=1),
        anomaly=AnomalyDetector(quarantine_after=1))),
    "batched_partial_sums": dict(strategy=lambda: fm.FedAvg(clients_per_round=5),
                                 transport="batched"),
    "federated_eval": dict(strategy=lambda: fm.FedAvg(clients_per_round=3),
                           federated_eval=lambda: FederatedEvaluation(clients=4)),
}


def _server(module: Any, name: str, fed: FederatedDataset, out: Path | None,
            rounds: int = 4) -> Any:
    cfg = CONFIGS[name]
    trainer = _trainer()
    transport = (BatchedTransport(trainer, fed) if cfg.get("transport") == "batched"
                 else SequentialTransport(trainer, fed))
    fe = cfg.get("federated_eval")
    return module.Server(trainer=trainer, strategy=cfg["strategy"](), transport=transport,
                         rounds=rounds, seed=11, test_data=fed.test,
                         eval_every=cfg.get("eval_every", 1), out_dir=out,
                         identity={"config": name}, federated_eval=fe() if fe else None)


def _records(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in history]


def _same_tree(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            _same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(
            _same_tree(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (a != a and b != b)  # NaN == NaN here


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sync_schedule_is_bit_identical_to_the_pre_event_server(local_fed, tmp_path, name):
    old = _server(LEGACY, name, local_fed, tmp_path / "old").run()
    new_server = _server(fm.runtime.server, name, local_fed, tmp_path / "new")
    assert isinstance(new_server.schedule, SyncSchedule)
    assert new_server.identity == _server(LEGACY, name, local_fed, None).identity
    new = new_server.run()
    assert torch.equal(old.weights, new.weights)
    assert _records(old.history) == _records(new.history)
    assert [list(r) for r in old.history] == [list(r) for r in new.history]  # key order too
    assert old.stopped == new.stopped and old.round == new.round
    a, b = load_checkpoint(tmp_path / "old"), load_checkpoint(tmp_path / "new")
    for ckpt in (a, b):
        ckpt["history"] = _records(ckpt["history"])
    assert _same_tree(a, b)
    if name == "dpfedavg_budget_stop":
        assert new.stopped and new.round < 4  # the budget stop itself was compared


def test_sync_resume_equals_the_pre_event_server_run_whole(local_fed, tmp_path):
    old = _server(LEGACY, "fedprox_stragglers_fedadam", local_fed, None).run()
    server = _server(fm.runtime.server, "fedprox_stragglers_fedadam", local_fed, tmp_path)
    server.run(stop_after=2)
    resumed = _server(fm.runtime.server, "fedprox_stragglers_fedadam", local_fed,
                      tmp_path).run(resume=True)
    assert torch.equal(old.weights, resumed.weights)
    assert _records(old.history) == _records(resumed.history)


def test_event_queue_orders_by_time_then_by_scheduling_order():
    q = EventQueue()
    q.push(2.0, "late")
    q.push(1.0, "first")
    q.push(1.0, "second")
    assert q.next_time() == 1.0 and len(q) == 3
    assert [e.kind for e in q.pending()] == ["first", "second", "late"]
    assert [q.pop().kind for _ in range(3)] == ["first", "second", "late"]
    assert q.pop() is None and q.next_time() is None


def test_a_schedule_that_stops_dispatching_fails_the_run_with_a_reason(blobs_fed):
    class Idle(SyncSchedule):
        name = "idle"

        def start(self, server, state):  # schedules nothing
            return None

    trainer = _trainer()
    server = fm.Server(trainer=trainer, strategy=fm.FedAvg(), rounds=2,
                       transport=SequentialTransport(trainer, blobs_fed), schedule=Idle())
    with pytest.raises(fm.core.RoundFailedError, match="idle schedule has nothing left"):
        server.run()
