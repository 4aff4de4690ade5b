"""Lazy batching of the asynchronous schedules (issue #11: the simulator's throughput).

A dispatched task's arrival time is computed from its predicted work, and it trains only when
the first task of its base version is about to be delivered, together with the other pending
tasks of that version. The results must be those of eager dispatch (training at dispatch) bit
for bit on the sequential transport, and a run interrupted with untrained tasks in flight must
resume exactly.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

import fedmosaic as fm
from fedmosaic.algorithms.staleness import PolynomialStaleness
from fedmosaic.models import MLP
from fedmosaic.runtime import SequentialTransport
from fedmosaic.runtime.batched import BatchedTransport
from fedmosaic.runtime.checkpoint import load_checkpoint
from fedmosaic.runtime.clock import ClientTimingModel
from fedmosaic.runtime.schedule import FedAsyncSchedule, FedBuffSchedule
from fedmosaic.runtime.server import RunState, Server


def _trainer() -> fm.TorchTrainer:
    return fm.TorchTrainer(lambda: MLP(5, [8], 3), lr=0.1, batch_size=8)


def _schedule(kind: str, lazy: bool, **clock: Any) -> Any:
    timing = ClientTimingModel(seed=3, speed_sigma=1.0, jitter=0.3, **clock)
    if kind == "fedbuff":
        return FedBuffSchedule(buffer_size=3, concurrency=5, clock=timing, lazy=lazy)
    return FedAsyncSchedule(alpha=0.5, concurrency=4, staleness=PolynomialStaleness(0.5),
                            clock=timing, lazy=lazy)


def _strategy(kind: str) -> fm.FedAvg:
    return fm.FedAvg(server_opt=fm.FedAdam(lr=0.05)) if kind == "fedbuff" else fm.FedAvg()


def _server(fed: Any, kind: str, schedule: Any, transport: Any = None, trainer: Any = None,
            rounds: int = 10, **kw: Any) -> Server:
    trainer = trainer or _trainer()
    return Server(trainer=trainer, strategy=_strategy(kind), rounds=rounds, seed=4,
                  transport=transport or SequentialTransport(trainer, fed),
                  test_data=fed.test, schedule=schedule, **kw)


def _records(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in history]


def _run(fed: Any, kind: str, lazy: bool, **clock: Any) -> tuple[RunState, Any]:
    schedule = _schedule(kind, lazy, **clock)
    return _server(fed, kind, schedule).run(), schedule


@pytest.mark.parametrize("kind", ["fedbuff", "fedasync"])
def test_lazy_batching_equals_eager_dispatch_bit_for_bit(blobs_fed, kind):
    eager, eager_s = _run(blobs_fed, kind, lazy=False)
    lazy, lazy_s = _run(blobs_fed, kind, lazy=True)
    assert torch.equal(eager.weights, lazy.weights)
    assert _records(eager.history) == _records(lazy.history)  # times, staleness, metrics
    # The same generator draws (client sampling at dispatch), in the same order.
    assert eager.rng.bit_generator.state == lazy.rng.bit_generator.state
    assert max(r["staleness_max"] for r in lazy.history) >= 1  # real asynchrony was tested
    if kind == "fedbuff":  # refills between two steps share a base version: fewer fits
        assert lazy_s.fits < eager_s.fits
    else:  # every FedAsync step is a new version: nothing to batch, but nothing lost
        assert lazy_s.fits <= eager_s.fits


def test_tasks_that_go_offline_are_never_trained_and_results_are_unchanged(blobs_fed):
    windows = dict(compute_median=0.5, availability_period=100.0, availability_fraction=0.3)
    eager, eager_s = _run(blobs_fed, "fedbuff", lazy=False, **windows)
    lazy, lazy_s = _run(blobs_fed, "fedbuff", lazy=True, **windows)
    assert sum(r["failures"] for r in lazy.history) > 0  # some clients went offline mid-task
    assert torch.equal(eager.weights, lazy.weights)
    assert _records(eager.history) == _records(lazy.history)
    assert lazy_s.fits < eager_s.fits


@pytest.mark.parametrize("kind", ["fedbuff", "fedasync"])
def test_lazy_batching_on_the_batched_transport_matches_eager_up_to_rounding(blobs_fed, kind):
    def run(lazy: bool) -> RunState:
        trainer = _trainer()
        return _server(blobs_fed, kind, _schedule(kind, lazy), trainer=trainer,
                       transport=BatchedTransport(trainer, blobs_fed)).run()

    eager, lazy = run(False), run(True)
    assert torch.allclose(eager.weights, lazy.weights, rtol=1e-4, atol=1e-5)
    assert [r["sim_time"] for r in eager.history] == [r["sim_time"] for r in lazy.history]
    assert [r["updates"] for r in eager.history] == [r["updates"] for r in lazy.history]


@pytest.mark.parametrize("kind", ["fedbuff", "fedasync"])
@pytest.mark.parametrize("stop", [3, 7])
def test_a_run_stopped_with_untrained_tasks_in_flight_resumes_exactly(blobs_fed, tmp_path,
                                                                      kind, stop):
    whole, _ = _run(blobs_fed, kind, lazy=True)
    first = _schedule(kind, lazy=True)
    _server(blobs_fed, kind, first, out_dir=tmp_path).run(stop_after=stop)
    assert load_checkpoint(tmp_path)["round"] == stop
    # Some tasks in flight at the checkpoint had not been trained yet (the run ends right
    # after the checkpoint of its last step, so the schedule still holds them).
    assert any(t.result is None for t in first._inflight.values())
    resumed = _server(blobs_fed, kind, _schedule(kind, lazy=True), out_dir=tmp_path).run(
        resume=True)
    assert torch.equal(whole.weights, resumed.weights)
    assert _records(whole.history) == _records(resumed.history)
    assert whole.rng.bit_generator.state == resumed.rng.bit_generator.state
    # A checkpoint written lazily resumes eagerly too (the switch is not in the identity).
    eager = _server(blobs_fed, kind, _schedule(kind, lazy=False), out_dir=tmp_path).run(
        resume=True)
    assert torch.equal(whole.weights, eager.weights)


class _MisreportingTrainer(fm.TorchTrainer):
    """Its fit stops after one local step whatever ``full_steps`` says: a prediction that
    turns out wrong."""

    def fit(self, weights: torch.Tensor, data: Any, config: Any) -> Any:
        return super().fit(weights, data, replace(config, max_steps=1))


def test_a_wrong_work_prediction_switches_lazy_batching_off_with_a_warning(blobs_fed, caplog):
    trainer = _MisreportingTrainer(lambda: MLP(5, [8], 3), lr=0.1, batch_size=8)
    schedule = _schedule("fedbuff", lazy=True)
    with caplog.at_level("WARNING", logger="fedmosaic.runtime.schedule"):
        state = _server(blobs_fed, "fedbuff", schedule, trainer=trainer, rounds=4).run()
    assert state.round == 4
    assert schedule._lazy_off is not None and "predicted from full_steps" in schedule._lazy_off
    assert any("lazy batching off" in r.getMessage() for r in caplog.records)


def test_a_stateful_trainer_trains_eagerly(blobs_fed):
    class Accounting(fm.TorchTrainer):  # stands for a DP-SGD trainer's per-client spend
        def accounting_state(self) -> dict[str, Any]:
            return {}

        def load_accounting_state(self, state: dict[str, Any]) -> None:
            return None

    def run(lazy: bool) -> Any:
        trainer = Accounting(lambda: MLP(5, [8], 3), lr=0.1, batch_size=8)
        schedule = _schedule("fedbuff", lazy)
        _server(blobs_fed, "fedbuff", schedule, trainer=trainer, rounds=4).run()
        return schedule.fits

    assert run(True) == run(False)


def test_lazy_chunk_is_validated():
    with pytest.raises(ValueError, match="lazy_chunk"):
        FedBuffSchedule(2, 3, lazy_chunk=0)


def test_concurrency_above_the_population_is_said_once(caplog):
    import logging

    import fedmosaic as fm
    from fedmosaic.data import IID, load_digits, partition
    from fedmosaic.models import MLP
    from fedmosaic.runtime.schedule import FedBuffSchedule

    train, test = load_digits(seed=0)
    fed = partition(train, IID(), 6, 0, test=test)
    trainer = fm.TorchTrainer(lambda: MLP(64, [8], 10), lr=0.1)
    logger = logging.getLogger("fedmosaic.runtime.schedule")
    # Attached directly: structured logging, once configured in this process by another
    # test, stops the "fedmosaic" logger from propagating to caplog's root handler.
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="fedmosaic.runtime.schedule"):
            fm.simulate(trainer, fed, fm.FedAvg(), 3, seed=0,
                        schedule=FedBuffSchedule(buffer_size=2, concurrency=50))
    finally:
        logger.removeHandler(caplog.handler)
    # One record (it may reach caplog through both handlers: counted once by identity).
    said = list({id(r): r.getMessage() for r in caplog.records
                 if "concurrency = 50 but only 6 clients" in r.getMessage()}.values())
    assert said == ["concurrency = 50 but only 6 clients are available: all of them train "
                    "at once"]
