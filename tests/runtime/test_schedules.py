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
from fedmosaic.runtime.schedule import (
    EventQueue,
    FedAsyncSchedule,
    FedBuffSchedule,
    SyncSchedule,
)
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


# -- asynchronous schedules (issue #11 items 2 and 3) -----------------------------------------
class ConstantClock:
    """A timing model where every task takes ``seconds``: clients dispatched together arrive
    together, before any aggregation (zero staleness)."""

    deadline = None

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def available(self, client_id: str, t: float) -> bool:
        return True

    def next_available(self, client_id: str, t: float) -> float:
        return t

    def outcome(self, client_id, task_index, start, num_samples, steps):
        from fedmosaic.runtime.clock import TaskOutcome

        return TaskOutcome(start + self.seconds, True)


def _run(fed, strategy, rounds=4, schedule=None, seed=3, **kw):
    kw.setdefault("transport", "sequential")  # bit-for-bit comparisons (auto may batch)
    return fm.simulate(_trainer(), fed, strategy, rounds=rounds, seed=seed, schedule=schedule,
                       **kw)


@pytest.mark.parametrize("clock", [None, ConstantClock(5.0)])
@pytest.mark.parametrize("opt", ["sgd", "fedadam"])
def test_fedbuff_with_k_the_cohort_and_zero_staleness_is_fedavg_bit_for_bit(blobs_fed, clock,
                                                                           opt):
    def strategy():
        server_opt = fm.FedAdam(lr=0.05) if opt == "fedadam" else None
        return fm.FedAvg(clients_per_round=3, server_opt=server_opt)

    sync = _run(blobs_fed, strategy())
    buff = _run(blobs_fed, strategy(),
                schedule=FedBuffSchedule(buffer_size=3, concurrency=3, clock=clock))
    assert torch.equal(sync.weights, buff.weights)
    assert sync.metric("test_accuracy") == buff.metric("test_accuracy")
    assert sync.metric("train_loss") == buff.metric("train_loss")
    for step, rec in enumerate(buff.history, start=1):
        assert rec["version"] == rec["round"] == step
        assert rec["updates"] == 3 and rec["staleness_mean"] == 0 and rec["wall_time"] > 0
        assert rec["sim_time"] == (5.0 * step if clock is not None else 0.0)


def test_fedbuff_under_lognormal_speeds_keeps_clients_busy_and_has_stale_updates(blobs_fed):
    from fedmosaic.runtime.clock import ClientTimingModel

    clock = ClientTimingModel(seed=2, speed_sigma=1.0)
    res = _run(blobs_fed, fm.FedAvg(), rounds=12,
               schedule=FedBuffSchedule(buffer_size=2, concurrency=4, clock=clock))
    assert [r["version"] for r in res.history] == list(range(1, 13))
    times = [r["sim_time"] for r in res.history]
    assert times == sorted(times) and times[0] > 0
    assert max(r["staleness_max"] for r in res.history) >= 1
    # Arrivals at distinct times: each one's place is refilled at once, so when the second
    # update of a buffer arrives the other three clients are still training.
    assert all(r["updates"] == 2 and r["in_flight"] == 3 for r in res.history)
    assert res.final["test_accuracy"] > 0.6


def test_fedbuff_k1_equals_fedasync_apply_delta_direction_via_the_buffer(blobs_fed):
    """One client, K = 1 and zero staleness: every FedBuff step is the client's full update,
    as FedAsync with alpha = 1 is (up to the rounding of base + delta)."""
    one = FederatedDataset(name="one", clients=[blobs_fed.clients[0]], test=blobs_fed.test,
                           num_classes=3, feature_shape=(5,))
    buff = _run(one, fm.FedAvg(), rounds=3,
                schedule=FedBuffSchedule(buffer_size=1, concurrency=1))
    fa = _run(one, fm.FedAvg(), rounds=3, schedule=FedAsyncSchedule(alpha=1.0, concurrency=1))
    assert torch.allclose(buff.weights, fa.weights, rtol=0, atol=1e-6)


def test_fedasync_alpha_one_one_client_zero_staleness_is_sequential_training(blobs_fed):
    from fedmosaic.algorithms.strategy import client_seed
    from fedmosaic.train import FitConfig

    one = FederatedDataset(name="one", clients=[blobs_fed.clients[2]], test=blobs_fed.test,
                           num_classes=3, feature_shape=(5,))
    res = _run(one, fm.FedAvg(), rounds=4, seed=5,
               schedule=FedAsyncSchedule(alpha=1.0, concurrency=1))
    trainer = _trainer()
    w = trainer.initial_weights(5)
    for step in range(1, 5):
        cfg = FitConfig(round=step, seed=client_seed(5, step, "c2"))
        w = trainer.fit(w, one.clients[0].train, cfg).weights
    # The server rebuilds the client's model as base + delta: equal up to that rounding.
    assert torch.allclose(res.weights, w, rtol=0, atol=1e-6)
    assert [r["alpha_t"] for r in res.history] == [1.0] * 4
    assert all(r["updates"] == 1 and r["staleness_mean"] == 0 for r in res.history)


def test_fedasync_mixes_stale_updates_with_a_damped_weight(blobs_fed):
    from fedmosaic.algorithms.staleness import PolynomialStaleness
    from fedmosaic.runtime.clock import ClientTimingModel

    sched = FedAsyncSchedule(alpha=0.6, concurrency=3, staleness=PolynomialStaleness(0.5),
                             clock=ClientTimingModel(seed=1, speed_sigma=1.0))
    res = _run(blobs_fed, fm.FedAvg(), rounds=15, schedule=sched)
    for rec in res.history:
        assert rec["alpha_t"] == pytest.approx(0.6 * (rec["staleness_mean"] + 1) ** -0.5)
    assert any(r["staleness_mean"] > 0 for r in res.history)
    assert res.final["test_accuracy"] > 0.6


def test_a_client_trained_twice_from_one_version_gets_a_new_seed():
    from fedmosaic.algorithms.strategy import client_seed
    from fedmosaic.runtime.schedule import task_seed

    assert task_seed(1, 3, "a", 0) == client_seed(1, 3, "a")
    assert len({task_seed(1, 3, "a", r) for r in range(5)}) == 5


# -- the synchronous schedule under the clock (item 4) -----------------------------------------
def test_sync_under_the_clock_waits_for_the_slowest_or_drops_past_the_deadline(blobs_fed):
    from fedmosaic.runtime.clock import ClientTimingModel

    clock = ClientTimingModel(seed=4, speed_sigma=1.0)
    plain = _run(blobs_fed, fm.FedAvg(clients_per_round=3))
    timed = _run(blobs_fed, fm.FedAvg(clients_per_round=3), schedule=SyncSchedule(clock=clock))
    # Same cohorts and the same model: the clock only adds time (all clients always online).
    assert torch.allclose(plain.weights, timed.weights, rtol=0, atol=1e-6)
    times = [r["sim_time"] for r in timed.history]
    assert all(b > a for a, b in zip([0.0, *times], times, strict=False))
    durations = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    deadline = sorted(durations)[1]  # some rounds must drop their slowest clients
    strict = ClientTimingModel(seed=4, speed_sigma=1.0, deadline=deadline)
    cut = _run(blobs_fed, fm.FedAvg(clients_per_round=3), schedule=SyncSchedule(clock=strict))
    assert any(r["dropped_late"] > 0 for r in cut.history)
    for rec in cut.history:
        assert rec["updates"] + rec["failures"] == 3
        assert rec["failures"] == rec["dropped_late"]
    prev = 0.0
    for rec in cut.history:
        assert rec["sim_time"] - prev <= deadline + 1e-9
        prev = rec["sim_time"]


# -- resuming an asynchronous run (item 6) -----------------------------------------------------
def _async_schedule(kind):
    from fedmosaic.algorithms.staleness import PolynomialStaleness
    from fedmosaic.runtime.clock import ClientTimingModel

    clock = ClientTimingModel(seed=3, speed_sigma=1.0, jitter=0.3)
    if kind == "fedbuff":
        return FedBuffSchedule(buffer_size=2, concurrency=4, clock=clock)
    return FedAsyncSchedule(alpha=0.5, concurrency=3, staleness=PolynomialStaleness(0.5),
                            clock=clock)


@pytest.mark.parametrize("kind", ["fedbuff", "fedasync"])
@pytest.mark.parametrize("stop", [1, 4])
def test_a_resumed_async_run_loses_or_repeats_no_update(blobs_fed, tmp_path, kind, stop):
    def strategy():
        return fm.FedAvg(server_opt=fm.FedAdam(lr=0.05)) if kind == "fedbuff" else fm.FedAvg()

    whole = _run(blobs_fed, strategy(), rounds=8, schedule=_async_schedule(kind))
    _run(blobs_fed, strategy(), rounds=8, schedule=_async_schedule(kind), out_dir=tmp_path,
         stop_after=stop)
    saved = load_checkpoint(tmp_path)
    assert saved["round"] == stop and saved["sim_time"] > 0
    assert saved["schedule"]["tasks"]  # tasks were in flight when it stopped
    resumed = _run(blobs_fed, strategy(), rounds=8, schedule=_async_schedule(kind),
                   out_dir=tmp_path, resume=True)
    # Same model, and the same updates in every step: the in-flight tasks were recomputed
    # and delivered once, at their saved times.
    assert torch.equal(whole.weights, resumed.weights)
    assert _records(whole.history) == _records(resumed.history)
    assert sum(r["updates"] for r in resumed.history) == sum(r["updates"] for r in whole.history)


def test_sync_under_a_clock_resumes_its_simulated_time(blobs_fed, tmp_path):
    from fedmosaic.runtime.clock import ClientTimingModel

    def sched():
        return SyncSchedule(clock=ClientTimingModel(seed=4, speed_sigma=1.0))

    whole = _run(blobs_fed, fm.FedAvg(clients_per_round=3), schedule=sched())
    _run(blobs_fed, fm.FedAvg(clients_per_round=3), schedule=sched(), out_dir=tmp_path,
         stop_after=2)
    resumed = _run(blobs_fed, fm.FedAvg(clients_per_round=3), schedule=sched(),
                   out_dir=tmp_path, resume=True)
    assert torch.equal(whole.weights, resumed.weights)
    assert _records(whole.history) == _records(resumed.history)


def test_fedbuff_under_availability_windows_waits_for_clients_and_resumes_exactly(blobs_fed,
                                                                                  tmp_path):
    from fedmosaic.runtime.clock import ClientTimingModel

    def sched():
        return FedBuffSchedule(buffer_size=2, concurrency=4, clock=ClientTimingModel(
            seed=6, speed_sigma=1.0, compute_median=0.5, availability_period=100.0,
            availability_fraction=0.3))

    whole = _run(blobs_fed, fm.FedAvg(), rounds=6, schedule=sched())
    assert [r["version"] for r in whole.history] == list(range(1, 7))
    # Clients go offline mid-task (failures) and the server waits for others to come online.
    assert sum(r["failures"] for r in whole.history) > 0
    _run(blobs_fed, fm.FedAvg(), rounds=6, schedule=sched(), out_dir=tmp_path, stop_after=3)
    resumed = _run(blobs_fed, fm.FedAvg(), rounds=6, schedule=sched(), out_dir=tmp_path,
                   resume=True)
    assert torch.equal(whole.weights, resumed.weights)
    assert _records(whole.history) == _records(resumed.history)


def test_fedbuff_on_the_batched_transport_matches_sequential_up_to_rounding(blobs_fed):
    def run(transport):
        trainer = _trainer()
        tp = BatchedTransport(trainer, blobs_fed) if transport == "batched" else None
        return fm.simulate(trainer, blobs_fed, fm.FedAvg(), rounds=4, seed=3, transport=tp,
                           schedule=FedBuffSchedule(buffer_size=3, concurrency=5))

    seq, batched = run("sequential"), run("batched")
    assert torch.allclose(seq.weights, batched.weights, rtol=0, atol=1e-5)
    assert [r["updates"] for r in seq.history] == [r["updates"] for r in batched.history]


def test_batchnorm_statistics_are_aggregated_by_the_async_schedules(blobs_fed):
    import torch.nn as nn

    def model():
        return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    for schedule in (FedBuffSchedule(buffer_size=2, concurrency=3),
                     FedAsyncSchedule(alpha=0.5, concurrency=2)):
        trainer = fm.TorchTrainer(model, lr=0.1, batch_size=8)
        w0 = trainer.initial_weights(3)
        res = fm.simulate(trainer, blobs_fed, fm.FedAvg(), rounds=2, seed=3,
                          schedule=schedule, initial_weights=w0)
        start, end = trainer.spec.unflatten(w0), trainer.spec.unflatten(res.weights)
        assert "1.running_mean" in end
        assert not torch.equal(start["1.running_mean"], end["1.running_mean"])
        assert not torch.equal(start["1.running_var"], end["1.running_var"])


@pytest.mark.parametrize("schedule", [lambda: FedBuffSchedule(buffer_size=2, concurrency=3),
                                      lambda: FedAsyncSchedule(alpha=0.5, concurrency=3)])
def test_an_async_run_whose_clients_all_fail_stops_with_the_reason(blobs_fed, schedule):
    class Broken(fm.TorchTrainer):
        def fit(self, weights, data, config):
            raise RuntimeError("disk full")

    trainer = Broken(lambda: MLP(5, [8], 3), lr=0.1, batch_size=8)
    with pytest.raises(fm.core.RoundFailedError, match=r"in a row brought no usable update.*"
                       r"disk full"):
        fm.simulate(trainer, blobs_fed, fm.FedAvg(), rounds=2, schedule=schedule())


@pytest.mark.parametrize("method", ["FedAvg", "FedProx", "FedAdam"])
def test_sync_schedule_equals_the_pre_event_server_on_the_demo(method):
    """The demo's federation (UCI Heart Disease, four hospitals) and methods, at its settings
    for 6 of its 30 rounds: the same model and records as the server before schedules."""
    from fedmosaic.data import load_heart_disease
    from fedmosaic.demo import DemoSettings

    cfg, fed = DemoSettings(), load_heart_disease(seed=0)
    common = dict(local_epochs=cfg.local_epochs, batch_size=cfg.batch_size)
    strategies = {"FedAvg": lambda: fm.FedAvg(**common),
                  "FedProx": lambda: fm.FedProx(mu=cfg.fedprox_mu, **common),
                  "FedAdam": lambda: fm.FedAvg(server_opt=fm.FedAdam(lr=cfg.fedadam_lr),
                                               **common)}

    def run(module):
        trainer = fm.TorchTrainer(lambda: MLP(fed.feature_shape[0], [cfg.hidden],
                                              fed.num_classes),
                                  lr=cfg.lr, epochs=cfg.local_epochs, batch_size=cfg.batch_size)
        return module.Server(trainer=trainer, strategy=strategies[method](), rounds=6,
                             transport=SequentialTransport(trainer, fed),
                             test_data=fed.test).run()

    old, new = run(LEGACY), run(fm.runtime.server)
    assert torch.equal(old.weights, new.weights)
    assert _records(old.history) == _records(new.history)


def test_resumed_in_flight_tasks_do_not_count_a_dp_sgd_clients_spend_twice(blobs_fed,
                                                                           tmp_path):
    pytest.importorskip("opacus")
    from fedmosaic.train.dp_trainer import DPSGDTrainer

    def trainer():
        return DPSGDTrainer(lambda: MLP(5, [8], 3), lr=0.5, batch_size=16,
                            noise_multiplier=1.0, max_grad_norm=1.0, noise="seeded")

    def run(tr, **kw):
        return fm.simulate(tr, blobs_fed, fm.FedAvg(), rounds=5, seed=2, **kw,
                           schedule=FedBuffSchedule(buffer_size=2, concurrency=4,
                                                    clock=ConstantClockBySize()))

    whole_trainer = trainer()
    whole = run(whole_trainer)
    run(trainer(), out_dir=tmp_path, stop_after=2)
    resumed_trainer = trainer()
    resumed = run(resumed_trainer, out_dir=tmp_path, resume=True)
    assert torch.equal(whole.weights, resumed.weights)
    assert resumed_trainer.client_epsilons() == pytest.approx(whole_trainer.client_epsilons())


class ConstantClockBySize(ConstantClock):
    """Each task takes as many seconds as its client has samples: distinct arrival times."""

    def __init__(self) -> None:
        super().__init__(0.0)

    def outcome(self, client_id, task_index, start, num_samples, steps):
        from fedmosaic.runtime.clock import TaskOutcome

        return TaskOutcome(start + float(num_samples), True)
