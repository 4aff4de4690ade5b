"""FedBuff and FedAsync in live mode (issue #11 item 5, the runtime half): over a
``LiveTransport`` whose results arrive in real time, in the same ``Server.run`` loop.

The transport is ``tests/runtime/fake_live.FakeLiveTransport``: in process, thread-free, with
results released after per-client delays counted in ticks (one tick per wait), so that every
run here is deterministic and fast.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedmosaic as fm
from fedmosaic.core import CheckpointError, ConfigError, RoundFailedError
from fedmosaic.core.update import ClientUpdate
from fedmosaic.data import FederatedDataset
from fedmosaic.models import MLP
from fedmosaic.runtime import SequentialTransport
from fedmosaic.runtime.checkpoint import load_checkpoint
from fedmosaic.runtime.schedule import FedAsyncSchedule, FedBuffSchedule
from fedmosaic.runtime.transport import LiveTransport
from tests.runtime.fake_live import FakeLiveTransport

POLL = 0.25  # the schedules' wait per next_result call (never actually slept: the fake ticks)


def _trainer() -> fm.TorchTrainer:
    return fm.TorchTrainer(lambda: MLP(5, [8], 3), lr=0.1, batch_size=8)


def _fake(fed: FederatedDataset, **kw: Any) -> tuple[fm.TorchTrainer, FakeLiveTransport]:
    trainer = _trainer()
    return trainer, FakeLiveTransport(trainer, fed, **kw)


def _run(trainer, fake, fed, strategy, schedule, rounds=4, seed=3, **kw):
    return fm.simulate(trainer, fed, strategy, rounds=rounds, seed=seed, schedule=schedule,
                       transport=fake, **kw)


def _records(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records without their real times (wall_time, and sim_time: real elapsed time live)."""
    return [{k: v for k, v in r.items() if k not in ("wall_time", "sim_time")}
            for r in history]


def _one_client(fed: FederatedDataset, index: int) -> FederatedDataset:
    return FederatedDataset(name="one", clients=[fed.clients[index]], test=fed.test,
                            num_classes=3, feature_shape=(5,))


def test_the_fake_is_a_live_transport_and_the_sequential_one_is_not(blobs_fed):
    assert isinstance(_fake(blobs_fed)[1], LiveTransport)
    assert not isinstance(SequentialTransport(_trainer(), blobs_fed), LiveTransport)


@pytest.mark.parametrize("opt", ["sgd", "fedadam"])
def test_live_fedbuff_released_in_dispatch_order_equals_simulated_fedbuff(blobs_fed, opt):
    def strategy():
        return fm.FedAvg(server_opt=fm.FedAdam(lr=0.05) if opt == "fedadam" else None)

    sim = fm.simulate(_trainer(), blobs_fed, strategy(), rounds=4, seed=3,
                      schedule=FedBuffSchedule(buffer_size=3, concurrency=3),
                      transport="sequential")  # as the fake live clients (auto may batch)
    trainer, fake = _fake(blobs_fed)
    began = time.monotonic()
    live = _run(trainer, fake, blobs_fed, strategy(),
                FedBuffSchedule(buffer_size=3, concurrency=3, live=True, poll=POLL))
    elapsed = time.monotonic() - began
    assert torch.equal(sim.weights, live.weights)
    assert _records(sim.history) == _records(live.history)
    assert [list(r) for r in sim.history] == [list(r) for r in live.history]  # key order too
    # sim_time is the run's real elapsed time: increasing, and within the run's duration.
    times = [r["sim_time"] for r in live.history]
    assert times == sorted(times) and times[0] > 0 and times[-1] <= elapsed
    # Each step: one wait, the two other results taken without waiting; the cohort was
    # submitted from the step's version; at the end nothing is open and cancel_all is called.
    assert fake.calls == [POLL, 0.0, 0.0] * 4
    assert [v for _, v, _ in fake.submitted] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert fake.cancelled == [("the run finished", [])]


def test_a_slow_clients_update_is_as_stale_as_the_steps_taken_since_its_task(blobs_fed):
    # c0 is 8 ticks slow, the others 1; every update claims base version 0, which the
    # schedule must ignore (staleness is the server's record of each task).
    trainer, fake = _fake(blobs_fed, delay=lambda cid, k: 8 if cid == "c0" else 1,
                          claim_base=0)
    res = _run(trainer, fake, blobs_fed, fm.FedAvg(),
               FedBuffSchedule(buffer_size=2, concurrency=3, live=True, poll=POLL), rounds=8)
    # The expected staleness of each update, replayed from what the fake delivered: the
    # version current at its arrival minus the version its task was submitted with.
    version, buffer, expected, slow = 0, [], [], []
    for cid, base, _ in fake.delivered:
        if version == 8:
            break  # delivered together with the last step's updates, never applied
        buffer.append(version - base)
        if cid == "c0":
            slow.append(version - base)
        if len(buffer) == 2:
            expected.append((sum(buffer) / 2, max(buffer)))
            version, buffer = version + 1, []
    assert [(r["staleness_mean"], r["staleness_max"]) for r in res.history] == expected
    assert slow and max(slow) >= 2  # c0 came back after two or more other steps
    assert [r["version"] for r in res.history] == list(range(1, 9))
    assert all(r["updates"] == 2 for r in res.history)


def test_live_fedasync_alpha_one_one_client_is_sequential_training(blobs_fed):
    from fedmosaic.algorithms.strategy import client_seed
    from fedmosaic.train import FitConfig

    one = _one_client(blobs_fed, 2)
    trainer, fake = _fake(one, delay={"c2": 2})
    res = _run(trainer, fake, one, fm.FedAvg(), FedAsyncSchedule(alpha=1.0, concurrency=1,
                                                                 live=True, poll=POLL),
               seed=5)
    reference = _trainer()
    w = reference.initial_weights(5)
    for step in range(1, 5):
        cfg = FitConfig(round=step, seed=client_seed(5, step, "c2"))
        w = reference.fit(w, one.clients[0].train, cfg).weights
    # The server rebuilds the client's model as base + delta: equal up to that rounding.
    assert torch.allclose(res.weights, w, rtol=0, atol=1e-6)
    sim = fm.simulate(_trainer(), one, fm.FedAvg(), rounds=4, seed=5,
                      schedule=FedAsyncSchedule(alpha=1.0, concurrency=1))
    assert torch.equal(sim.weights, res.weights)
    assert _records(sim.history) == _records(res.history)
    assert [r["alpha_t"] for r in res.history] == [1.0] * 4


def test_waiting_for_a_slow_client_loops_on_timed_waits_without_spinning(blobs_fed):
    one = _one_client(blobs_fed, 0)
    trainer, fake = _fake(one, delay={"c0": 5})
    res = _run(trainer, fake, one, fm.FedAvg(),
               FedAsyncSchedule(alpha=0.5, concurrency=1, live=True, poll=POLL), rounds=2)
    # Five waits of ``poll`` seconds per step (four time out, the fifth gets the result),
    # never a call that does not wait, and never a second task for the busy client.
    assert fake.calls == [POLL] * 10
    assert [(c, v) for c, v, _ in fake.submitted] == [("c0", 0), ("c0", 1)]
    assert [r["version"] for r in res.history] == [1, 2]


def test_failures_and_rejected_updates_free_the_place_and_are_counted(blobs_fed):
    # One client trains at a time: each result is taken before the next task is sent, so
    # every delivered result is in exactly one record.
    trainer, fake = _fake(blobs_fed, delay=lambda cid, k: 1 + int(cid[1:]) % 3,
                          fail={"c1": "lost contact (no heartbeat)"}, reject={"c3"},
                          corrupt={"c4"}, offline={"c5"})
    res = _run(trainer, fake, blobs_fed, fm.FedAvg(),
               FedBuffSchedule(buffer_size=2, concurrency=1, live=True, poll=POLL), rounds=3,
               seed=4)
    got = Counter(cid for cid, _, _ in fake.delivered)
    assert got["c1"] and got["c3"] and got["c4"] and fake.refused  # each case happened
    assert sum(r["updates"] for r in res.history) == 6
    assert sum(r["failures"] for r in res.history) == got["c1"] + fake.refused
    assert sum(r["rejected"] for r in res.history) == got["c3"] + got["c4"]
    assert len(fake.delivered) == 6 + got["c1"] + got["c3"] + got["c4"]
    # Only the good clients' updates were applied: c0 and c2 trained every step.
    assert {cid for cid, _, kind in fake.delivered if kind == "ClientUpdate"} - {"c4"} \
        <= {"c0", "c2"}
    assert all(r["in_flight"] == 0 for r in res.history)


def test_a_run_whose_clients_all_fail_stops_with_the_reason_and_cancels_the_rest(blobs_fed):
    # c5 never answers (its task stays open); every other client's training fails.
    trainer, fake = _fake(blobs_fed, delay={"c5": 10**6},
                          fail={c: "training failed: disk full" for c in blobs_fed.client_ids})
    with pytest.raises(RoundFailedError, match=r"in a row brought no usable update.*disk full"):
        _run(trainer, fake, blobs_fed, fm.FedAvg(),
             FedBuffSchedule(buffer_size=2, concurrency=3, live=True, poll=POLL))
    assert len(fake.cancelled) == 1
    reason, still_open = fake.cancelled[0]
    assert reason.startswith("the run stopped: RoundFailedError") and still_open == ["c5"]
    assert not fake.open


def test_a_result_without_an_open_task_is_never_applied(blobs_fed):
    stray = ClientUpdate(client_id="ghost", delta=torch.ones(_trainer().spec.numel),
                         num_samples=10, base_round=0)
    trainer, fake = _fake(blobs_fed, stray=[("ghost", stray)])
    res = _run(trainer, fake, blobs_fed, fm.FedAvg(),
               FedBuffSchedule(buffer_size=3, concurrency=3, live=True, poll=POLL))
    sim = fm.simulate(_trainer(), blobs_fed, fm.FedAvg(), rounds=4, seed=3,
                      schedule=FedBuffSchedule(buffer_size=3, concurrency=3),
                      transport="sequential")  # as the fake live clients (auto may batch)
    assert torch.equal(sim.weights, res.weights)


def test_a_resumed_live_run_continues_from_the_saved_version_and_applies_no_update_twice(
        blobs_fed, tmp_path):
    def sched():
        return FedBuffSchedule(buffer_size=2, concurrency=3, live=True, poll=POLL)

    def delay(cid, k):
        return 1 + (int(cid[1:]) + k) % 3

    trainer, first = _fake(blobs_fed, delay=delay)
    stopped = _run(trainer, first, blobs_fed, fm.FedAvg(), sched(), rounds=6,
                   out_dir=tmp_path, stop_after=3)
    saved = load_checkpoint(tmp_path)
    # Nothing in flight or buffered is saved: it cannot be recomputed on remote machines.
    assert saved["round"] == 3 and saved["sim_time"] > 0
    assert saved["schedule"]["live"] and saved["schedule"]["tasks"] == []
    assert saved["schedule"]["buffer"] is None
    # stop_after is an interruption (as a kill): the first server's tasks are left open.
    assert first.open and not first.cancelled
    # A restarted server is a new transport instance: the old tasks are not its own.
    trainer, second = _fake(blobs_fed, delay=delay)
    resumed = _run(trainer, second, blobs_fed, fm.FedAvg(), sched(), rounds=6,
                   out_dir=tmp_path, resume=True)
    assert [r["version"] for r in resumed.history] == list(range(1, 7))
    assert _records(resumed.history[:3]) == _records(stopped.history)
    # Fresh tasks from the saved version, from the saved model; each step applied exactly
    # buffer_size updates, all delivered by the new instance (none of the old tasks).
    assert min(v for _, v, _ in second.submitted) == 3
    assert torch.equal(second.bases[3], saved["weights"])
    assert all(r["updates"] == 2 for r in resumed.history)
    assert sum(kind == "ClientUpdate" for _, _, kind in second.delivered) >= 6
    assert resumed.history[3]["sim_time"] >= stopped.history[-1]["sim_time"]
    assert second.cancelled and second.cancelled[0][0] == "the run finished"
    # A simulated schedule never resumes a live run (nor the reverse): the identity differs.
    with pytest.raises(CheckpointError, match="live"):
        fm.simulate(_trainer(), blobs_fed, fm.FedAvg(), rounds=6, seed=3, out_dir=tmp_path,
                    resume=True, schedule=FedBuffSchedule(buffer_size=2, concurrency=3))


def test_check_refuses_a_live_schedule_without_a_live_transport_or_with_a_clock(blobs_fed):
    trainer = _trainer()
    with pytest.raises(ConfigError) as info:
        fm.Server(trainer=trainer, strategy=fm.FedAvg(), rounds=2,
                  transport=SequentialTransport(trainer, blobs_fed),
                  schedule=FedBuffSchedule(2, 3, live=True))
    assert info.value.key == "transport" and "LiveTransport" in str(info.value)
    from fedmosaic.runtime.clock import ClientTimingModel

    trainer, fake = _fake(blobs_fed)
    with pytest.raises(ConfigError) as info:
        fm.Server(trainer=trainer, strategy=fm.FedAvg(), rounds=2, transport=fake,
                  schedule=FedAsyncSchedule(0.5, 3, live=True,
                                            clock=ClientTimingModel(seed=1)))
    assert info.value.key == "clock" and "their time is real" in str(info.value)
    with pytest.raises(ValueError, match="poll must be a number of seconds > 0"):
        FedBuffSchedule(2, 3, live=True, poll=0)


def test_live_schedules_keep_the_asynchronous_refusals(blobs_fed):
    from fedmosaic.privacy.dp_fedavg import DPFedAvg
    from fedmosaic.robust import make_robust

    dp = DPFedAvg(clip=1.0, noise_multiplier=1.0, delta=1e-5, sampling="fixed",
                  clients_per_round=3)
    for strategy, fragment in [
        (dp, "accounting assumes sampled synchronous rounds"),
        (fm.FedAvg(weighting="uniform", robust=make_robust("median", f=1)), "whole cohort"),
        (fm.FedAvg(stragglers=0.3), "slow clients come from the clock"),
    ]:
        trainer, fake = _fake(blobs_fed)
        with pytest.raises(ConfigError, match=fragment):
            fm.Server(trainer=trainer, strategy=strategy, rounds=2, transport=fake,
                      schedule=FedBuffSchedule(2, 3, live=True))


def test_the_deployments_schedule_runs_over_a_live_transport(blobs_fed):
    from fedmosaic.build import build_strategy
    from fedmosaic.config import validate

    exp = validate({"rounds": 3, "data": {"dataset": "digits"},
                    "strategy": {"schedule": "fedasync", "alpha": 0.6, "concurrency": 4}})
    strategy = build_strategy(exp, deployment=True)
    assert strategy.schedule.live and strategy.schedule.describe()["live"] is True
    trainer, fake = _fake(blobs_fed, delay=lambda cid, k: int(cid[1:]) % 4)
    server = fm.Server(trainer=trainer, strategy=strategy, rounds=3, transport=fake)
    state = server.run()
    assert state.round == 3 and [r["version"] for r in state.history] == [1, 2, 3]
    assert fake.cancelled and fake.cancelled[0][0] == "the run finished"


def _replay(delivered, kind: str, k: int, rounds: int, reject: set[str]):
    """Each step's (updates, failures, rejected, staleness mean, staleness max), replayed
    from the results the fake delivered, in order, with the versions their tasks were
    submitted with: what the schedule must have recorded."""
    version, steps = 0, []
    stale: list[int] = []
    failures = rejected = 0
    for cid, base, result_kind in delivered:
        if version == rounds:
            break  # delivered with the last step's results, after it: never taken
        if result_kind == "ClientFailure":
            failures += 1
            continue
        if cid in reject:
            rejected += 1
            continue
        stale.append(version - base)
        if len(stale) == (k if kind == "fedbuff" else 1):
            steps.append((len(stale), failures, rejected, sum(stale) / len(stale), max(stale)))
            version, stale, failures, rejected = version + 1, [], 0, 0
    return steps


@settings(deadline=None, max_examples=20, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["fedbuff", "fedasync"]), k=st.integers(1, 3),
       concurrency=st.integers(1, 4),
       delays=st.lists(st.integers(0, 4), min_size=6, max_size=6),
       growth=st.integers(0, 3),
       bad=st.lists(st.sampled_from(["fail", "reject", None]), min_size=3, max_size=3))
def test_live_steps_equal_a_replay_of_the_delivered_results(blobs_fed, kind, k, concurrency,
                                                             delays, growth, bad):
    """Whatever the delays, failures and refusals: every step takes exactly its updates,
    each counted once, with the staleness of the server's record, and the failures and
    rejections delivered since the previous step; no client ever holds two tasks (the fake
    refuses that); c0, c2 and c4 always train well."""
    fail = {f"c{2 * i + 1}": "dropped" for i, b in enumerate(bad) if b == "fail"}
    reject = {f"c{2 * i + 1}" for i, b in enumerate(bad) if b == "reject"}
    trainer, fake = _fake(blobs_fed, delay=lambda cid, j: delays[int(cid[1:])] + growth * j,
                          fail=fail, reject=reject)
    schedule = (FedBuffSchedule(k, concurrency, live=True, poll=POLL) if kind == "fedbuff"
                else FedAsyncSchedule(0.5, concurrency, live=True, poll=POLL))
    res = _run(trainer, fake, blobs_fed, fm.FedAvg(), schedule, rounds=3)
    recorded = [(r["updates"], r["failures"], r["rejected"], r["staleness_mean"],
                 r["staleness_max"]) for r in res.history]
    assert recorded == _replay(fake.delivered, kind, k, 3, reject)
    assert all(r["in_flight"] < concurrency for r in res.history)
    times = [r["sim_time"] for r in res.history]
    assert times == sorted(times)
    assert fake.cancelled and fake.cancelled[0][0] == "the run finished" and not fake.open
