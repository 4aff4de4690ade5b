"""FedBuff with SecAgg+ over each buffer (issue #11 item 3): the K clients that fill a buffer
run one SecAgg+ instance, so the server learns each buffer's weighted sum only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fedmosaic as fm
from fedmosaic.algorithms.fedbuff import FedBuffBuffer
from fedmosaic.algorithms.staleness import InverseSqrtStaleness
from fedmosaic.core import ConfigError, InvalidUpdateError, RoundFailedError
from fedmosaic.core.update import ClientUpdate
from fedmosaic.data import ClientData, FederatedDataset
from fedmosaic.models import MLP
from fedmosaic.privacy.secagg import buffer as buffer_module
from fedmosaic.privacy.secagg.buffer import SecureFedBuffBuffer
from fedmosaic.privacy.secagg.simulate import SecureSumResult
from fedmosaic.privacy.secagg.transport import SecAggPlusTransport
from fedmosaic.runtime import SequentialTransport
from fedmosaic.runtime.checkpoint import load_checkpoint
from fedmosaic.runtime.schedule import FedAsyncSchedule, FedBuffSchedule, SecureBufferSource
from tests.conftest import make_blobs

DIM = 40


def _trainer() -> fm.TorchTrainer:
    return fm.TorchTrainer(lambda: MLP(5, [8], 3), lr=0.1, batch_size=8)


@pytest.fixture
def fed() -> FederatedDataset:
    """Twelve clients of different sizes and a central test set."""
    sizes = [40, 25, 60, 13, 33, 50, 21, 44, 30, 18, 52, 27]
    clients = [ClientData(f"c{i:02d}", make_blobs(n, seed=i)) for i, n in enumerate(sizes)]
    return FederatedDataset(name="blobs12", clients=clients, test=make_blobs(200, seed=99),
                            num_classes=3, feature_shape=(5,))


def _updates(k: int, seed: int = 0) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    return [ClientUpdate(client_id=f"u{i}", delta=0.3 * torch.randn(DIM, generator=g),
                         num_samples=int(torch.randint(5, 60, (1,), generator=g)),
                         base_round=0)
            for i in range(k)]


def _bound(secure_buffer: SecureFedBuffBuffer, plain_sum: torch.Tensor, total_weight: float,
           survivors: int) -> torch.Tensor:
    """Per-coordinate bound on |secure mean - exact mean|: the sum and the total weight are
    each off by less than ``survivors`` quantization steps (times W), so
    ``|(S + e1) / (T + e2) - S / T| <= (|e1| + |S / T| |e2|) / (T - |e2|)``; plus float32
    rounding of the plain buffer's running sum."""
    q, w = secure_buffer.quantizer, secure_buffer.max_weight
    e1 = w * q.error_bound(survivors)
    e2 = e1 / secure_buffer.clip
    exact = plain_sum.double() / total_weight
    return (e1 + exact.abs() * e2) / (total_weight - e2) + 1e-6 * (1 + exact.abs())


# -- the component --------------------------------------------------------------------------
def test_the_secure_buffers_mean_is_the_plain_fedbuff_mean_up_to_quantization():
    k, staleness = 6, [0, 3, 1, 0, 7, 2]
    updates = _updates(k)
    plain = FedBuffBuffer(k, InverseSqrtStaleness(), "samples", dim=DIM, distinct_clients=True)
    secure = SecureFedBuffBuffer(k, InverseSqrtStaleness(), "samples", dim=DIM, clip=1.0,
                                 max_weight=60.0, seed=3)
    for u, s in zip(updates, staleness, strict=True):
        assert secure.add(u, s) == pytest.approx(plain.add(u, s), rel=1e-12)
    assert secure.full and plain.full
    exact_sum = plain.state_dict()["sum"]
    want, plain_stats = plain.flush()
    got, stats = secure.flush()
    assert got is not None and got.dtype == torch.float32
    total = plain_stats["total_weight"]
    err = (got.double() - want.double()).abs()
    assert (err <= _bound(secure, exact_sum, total, k)).all()
    assert err.max() > 0  # the quantization is real: not the plain mean handed over
    assert stats["count"] == k and stats["failures"] == []
    assert stats["total_weight"] == pytest.approx(total, rel=1e-6)
    for key in ("staleness_mean", "staleness_max", "staleness_min", "staleness_weight_mean"):
        assert stats[key] == pytest.approx(plain_stats[key])
    # The staleness weights are in the sum: the same updates at zero staleness differ.
    fresh = SecureFedBuffBuffer(k, dim=DIM, clip=1.0, max_weight=60.0, seed=3)
    for u in updates:
        fresh.add(u, 0)
    assert not torch.allclose(fresh.flush()[0], got, atol=1e-3)
    assert secure.count == 0 and secure.instances == 1


def test_dropouts_become_failures_and_the_mean_is_the_survivors():
    k = 10
    updates = _updates(k, seed=1)
    staleness = [1, 0, 2, 0, 4, 1, 0, 3, 0, 1]
    # Members 2 and 5 drop before their masked input; member 4 drops after it (its input is
    # still in the sum: its neighbours reveal its self-mask seed).
    plan = {"advertise": {2}, "masked_input": {5}, "unmask": {4}}
    seen = []

    def dropout_plan(n: int, instance: int) -> dict[str, set[int]]:
        seen.append((n, instance))
        return plan

    secure = SecureFedBuffBuffer(k, dim=DIM, clip=1.0, max_weight=60.0, seed=5,
                                 dropout_rate=0.3, dropout_plan=dropout_plan)
    for u, s in zip(updates, staleness, strict=True):
        secure.add(u, s)
    got, stats = secure.flush()
    assert seen == [(10, 1)]
    assert sorted(f.client_id for f in stats["failures"]) == ["u2", "u5"]
    assert all("dropped out during secure aggregation" in f.reason for f in stats["failures"])
    kept = [0, 1, 3, 4, 6, 7, 8, 9]
    assert stats["count"] == 8 and stats["members"] == 10
    assert stats["client_ids"] == [f"u{i}" for i in kept]
    plain = FedBuffBuffer(k, dim=DIM)
    for i in kept:
        plain.add(updates[i], staleness[i])
    exact_sum, want_weight = plain.state_dict()["sum"], plain.stats()["total_weight"]
    want, plain_stats = plain.flush()
    # The denominator is the survivors' total weight, not the buffer's.
    assert stats["total_weight"] == pytest.approx(want_weight, rel=1e-6)
    assert ((got.double() - want.double()).abs() <= _bound(secure, exact_sum, want_weight,
                                                           8)).all()
    assert stats["staleness_max"] == plain_stats["staleness_max"] == 4


def test_an_aborted_instance_applies_nothing_and_fails_every_member():
    updates = _updates(5, seed=2)
    # Three of five drop before sharing: too few neighbours left to unmask safely.
    secure = SecureFedBuffBuffer(5, dim=DIM, clip=1.0, max_weight=60.0, seed=1,
                                 dropout_plan=lambda n, i: {"share_keys": {0, 1, 2}})
    for u in updates:
        secure.add(u, 0)
    mean, stats = secure.flush()
    assert mean is None and stats["count"] == 0
    assert len(stats["failures"]) == 5
    assert all("secure aggregation aborted" in f.reason for f in stats["failures"])


def test_the_buffer_never_exposes_an_individual_update(monkeypatch):
    """By construction: what the server gets from a flush is a function of the SecAgg+
    instance's output only; the held inputs are reachable from no public attribute, no stat
    and no state_dict."""
    k = 5
    updates = _updates(k, seed=4)
    secure = SecureFedBuffBuffer(k, dim=DIM, clip=1.0, max_weight=60.0, seed=2)
    for u in updates:
        secure.add(u, 1)
    deltas = [u.delta for u in updates]

    def reachable_tensors(obj: object) -> list[torch.Tensor]:
        found = []
        for name in dir(obj):
            if name.startswith("_"):
                continue
            value = getattr(obj, name)
            values = value if isinstance(value, (list, tuple)) else [value]
            found += [v for v in values if isinstance(v, torch.Tensor)]
        return found

    assert reachable_tensors(secure) == []
    assert secure.client_ids == [f"u{i}" for i in range(k)]  # the server dispatched them
    with pytest.raises(ValueError, match="clients' state, never written"):
        secure.state_dict()
    # Replace the protocol by one that returns a chosen sum: the mean follows it alone.
    submitted = {}

    def fake_secure_sum(rows: np.ndarray, **kwargs: object) -> SecureSumResult:
        submitted["rows"] = rows
        total = np.zeros(rows.shape[1])
        total[0], total[-2], total[-1] = 0.5, 3.0, 5.0  # weight 3 W / clip, 5 contributors
        zero = np.zeros(rows.shape[0], dtype=np.int64)
        return SecureSumResult(total, list(range(rows.shape[0])), zero, zero,
                               np.zeros(rows.shape[0]), np.zeros(rows.shape[0]), 0.0, 4, 3)

    monkeypatch.setattr(buffer_module, "secure_sum", fake_secure_sum)
    mean, stats = secure.flush()
    expected = torch.zeros(DIM)
    expected[0] = 0.5 * 60.0 / (3.0 * 60.0)
    assert torch.equal(mean, expected)
    # What went into the protocol were the clients' own inputs (w s / W) delta, weight, count.
    s1 = InverseSqrtStaleness()(1)
    for u, row in zip(updates, submitted["rows"], strict=True):
        scale = u.num_samples / 60.0
        np.testing.assert_allclose(row[:-2], u.delta.double().numpy() * scale * s1)
        assert row[-2] == pytest.approx(scale) and row[-1] == 1.0
    for value in stats.values():
        assert not isinstance(value, torch.Tensor)
        assert not any(torch.equal(value, d) for d in deltas if isinstance(value, torch.Tensor))
    assert stats["metrics"] == {} and stats["num_samples"] == 0
    assert secure.state_dict() == {"config": {**secure.describe(), "dim": DIM}, "instances": 1}


def test_the_component_refuses_what_a_client_could_not_submit_masked():
    secure = SecureFedBuffBuffer(5, dim=DIM, clip=1.0, max_weight=30.0)
    big, small = _updates(2, seed=9)
    secure.add(ClientUpdate("a", small.delta, 10, 0), 0)
    with pytest.raises(InvalidUpdateError, match="one member per client"):
        secure.add(ClientUpdate("a", small.delta, 10, 0), 0)
    with pytest.raises(InvalidUpdateError, match=r"weight 31.0 outside \(0, 30.0\]"):
        secure.add(ClientUpdate("b", big.delta, 31, 0), 0)
    assert secure.count == 1
    with pytest.raises(ConfigError, match="no SecAgg\\+ parameters for n=3") as info:
        SecureFedBuffBuffer(3, dim=DIM)
    assert info.value.key == "strategy.buffer_size"


# -- in the server: FedBuff over SecAggPlusTransport -----------------------------------------
def _secure(fed: FederatedDataset, trainer: fm.TorchTrainer, **kw: object) -> SecAggPlusTransport:
    return SecAggPlusTransport(SequentialTransport(trainer, fed), clip=1.0, max_weight=60.0,
                               **{"seed": 7, **kw})


def _run(fed, strategy, schedule=None, transport_kw=None, rounds=3, **kw):
    trainer = _trainer()
    transport = _secure(fed, trainer, **(transport_kw or {}))
    return fm.simulate(trainer, fed, strategy, rounds=rounds, seed=1, transport=transport,
                       schedule=schedule, **kw), transport


@pytest.mark.parametrize("cohort, dropout", [(6, 0.0), (10, 0.1)])
def test_fedbuff_k_the_cohort_zero_staleness_is_sync_secagg_bit_for_bit(fed, cohort, dropout):
    """Same inputs, same instance numbers (= rounds), same seeds and dropout plans: the
    secure sums are identical, hence the models, bit for bit (with dropouts too)."""
    kw = {"simulate_dropout": dropout, "dropout_rate": 0.3 if dropout else 0.1}
    sync, _ = _run(fed, fm.FedAvg(clients_per_round=cohort, server_opt=fm.FedAdam(lr=0.05)),
                   transport_kw=kw)
    buff, transport = _run(fed, fm.FedAvg(server_opt=fm.FedAdam(lr=0.05)),
                           FedBuffSchedule(buffer_size=cohort, concurrency=cohort),
                           transport_kw=kw)
    assert torch.equal(sync.weights, buff.weights)
    for s, b in zip(sync.history, buff.history, strict=True):
        for key in ("updates", "failures", "bytes_up", "test_accuracy"):
            assert s[key] == b[key], key
        assert "train_loss" not in b and b["staleness_max"] == 0
    if dropout:
        assert sum(r["failures"] for r in buff.history) > 0
    assert f"one per FedBuff buffer of {cohort}" in \
        buff.guarantees["secure_aggregation"]["instances"]
    assert transport.last_round["instance"] == 3
    # bytes_up is the protocol's exact byte count of the step's instance.
    assert buff.history[-1]["bytes_up"] == transport.last_round["bytes_up"] > \
        cohort * 4 * buff.weights.numel()


class _HoldingFedBuff(FedBuffSchedule):
    """Plain FedBuff that, like FedBuff under SecAgg+, gives no new task to a client whose
    update waits in the open buffer."""

    def _holding(self, server):
        return set(self.buffer.client_ids) if self.buffer is not None else set()


def test_under_a_clock_secure_fedbuff_follows_plain_fedbuff_up_to_quantization(fed):
    """Stale updates and interleaved arrivals: the secure run stays within quantization error
    of the plain one dispatching the same way (members of the open buffer wait for it)."""
    from fedmosaic.runtime.clock import ClientTimingModel

    def clock() -> ClientTimingModel:
        return ClientTimingModel(seed=2, speed_sigma=1.0)

    secure, _ = _run(fed, fm.FedAvg(), FedBuffSchedule(5, 6, clock=clock()), rounds=4)
    trainer = _trainer()
    plain = fm.simulate(trainer, fed, fm.FedAvg(), rounds=4, seed=1,
                        schedule=_HoldingFedBuff(5, 6, clock=clock()),
                        transport=SequentialTransport(trainer, fed))
    assert max(r["staleness_max"] for r in secure.history) >= 1
    assert [r["sim_time"] for r in secure.history] == [r["sim_time"] for r in plain.history]
    assert torch.allclose(secure.weights, plain.weights, rtol=0, atol=1e-5)
    assert not torch.equal(secure.weights, plain.weights)


def test_dropouts_in_a_run_are_counted_and_each_step_covers_the_survivors(fed):
    res, transport = _run(fed, fm.FedAvg(), FedBuffSchedule(buffer_size=10, concurrency=12),
                          transport_kw={"simulate_dropout": 0.1, "dropout_rate": 0.3},
                          rounds=4)
    dropped_per_instance = []
    for instance in range(1, 5):
        plan = transport._dropout_plan(10, instance) or {}
        gone = set().union(*(plan.get(s, set()) for s in ("advertise", "share_keys",
                                                          "masked_input")))
        dropped_per_instance.append(len(gone))
    assert sum(dropped_per_instance) > 0
    assert [r["updates"] for r in res.history] == [10 - d for d in dropped_per_instance]
    assert [r["failures"] for r in res.history] == dropped_per_instance
    assert all(r["bytes_up"] > 0 and "train_loss" not in r for r in res.history)


def test_buffers_that_keep_aborting_fail_the_run_with_the_reason(fed, monkeypatch):
    trainer = _trainer()
    transport = _secure(fed, trainer)
    monkeypatch.setattr(transport, "_dropout_plan", lambda n, i: {"share_keys": {0, 1, 2}})
    with pytest.raises(RoundFailedError, match=r"3 buffers in a row gave no sum.*aborted"):
        fm.simulate(trainer, fed, fm.FedAvg(), rounds=2, seed=1, transport=transport,
                    schedule=FedBuffSchedule(buffer_size=5, concurrency=6))


def test_a_resumed_secure_fedbuff_run_equals_the_uninterrupted_one(fed, tmp_path):
    from fedmosaic.runtime.clock import ClientTimingModel

    def sched() -> FedBuffSchedule:
        return FedBuffSchedule(buffer_size=5, concurrency=7,
                               clock=ClientTimingModel(seed=3, speed_sigma=1.0, jitter=0.3))

    kw = {"simulate_dropout": 0.1, "dropout_rate": 0.2}
    whole, _ = _run(fed, fm.FedAvg(server_opt=fm.FedAdam(lr=0.05)), sched(), kw, rounds=5)
    _run(fed, fm.FedAvg(server_opt=fm.FedAdam(lr=0.05)), sched(), kw, rounds=5,
         out_dir=tmp_path, stop_after=2)
    saved = load_checkpoint(tmp_path)
    # Checkpointed right after the flush: the server's part of the buffer only, and the
    # updates after the step are tasks in flight, recomputed on resume.
    # Three instances for two steps: the first aborted (two of its five members scripted to
    # drop leave no secure parameters), which the first step's failures count.
    assert saved["schedule"]["buffer"]["instances"] == 3 and whole.history[0]["failures"] >= 5
    assert set(saved["schedule"]["buffer"]) == {"config", "instances"}
    assert saved["schedule"]["tasks"]
    resumed, _ = _run(fed, fm.FedAvg(server_opt=fm.FedAdam(lr=0.05)), sched(), kw, rounds=5,
                      out_dir=tmp_path, resume=True)
    assert torch.equal(whole.weights, resumed.weights)

    def records(history):
        return [{k: v for k, v in r.items() if k != "wall_time"} for r in history]

    assert records(whole.history) == records(resumed.history)


# -- refusals ---------------------------------------------------------------------------------
def _server(fed, schedule, transport, strategy=None):
    trainer = _trainer()
    return fm.Server(trainer=trainer, strategy=strategy or fm.FedAvg(), rounds=2,
                     schedule=schedule, transport=transport)


def test_refusals_name_the_reason(fed):
    trainer = _trainer()
    assert isinstance(_secure(fed, trainer), SecureBufferSource)
    with pytest.raises(ConfigError, match="FedAsync takes a server step on each update alone"):
        _server(fed, FedAsyncSchedule(0.5, 4), _secure(fed, trainer))
    with pytest.raises(ConfigError, match="runs in simulation only"):
        _server(fed, FedBuffSchedule(5, 6, live=True), _secure(fed, trainer))
    with pytest.raises(ConfigError, match="buffer size SecAgg\\+ can run over"):
        _server(fed, FedBuffSchedule(4, 6), _secure(fed, trainer))

    class Encoder:  # an IntegerEncoder (the Skellam mechanism's shape)
        bits, max_clients, encoded_dim = 32, 10, 1

        def encode(self, values, rng, round_num):
            raise AssertionError("never reached")

        def decode(self, total, round_num):
            raise AssertionError("never reached")

        def describe(self):
            return {"name": "test"}

    with pytest.raises(ConfigError, match="integer SecAgg\\+ encoder"):
        _server(fed, FedBuffSchedule(5, 6), _secure(fed, trainer, encoder=Encoder()),
                strategy=fm.FedAvg(weighting="uniform"))

    from fedmosaic.privacy import DPFedAvg

    distributed = DPFedAvg(clip=0.5, delta=1e-5, noise_multiplier=1.0, sampling="fixed",
                           clients_per_round=6, distributed=True, min_contributors=4)
    with pytest.raises(ConfigError, match="DP"):  # never a step without the DP release
        _server(fed, FedBuffSchedule(5, 6), _secure(fed, trainer), strategy=distributed)
    with pytest.raises(ConfigError, match="at most the 12 clients"):
        _server(fed, FedBuffSchedule(13, 13), _secure(fed, trainer))

    class ClaimsSecure(SequentialTransport):
        def guarantees(self):
            return {"secure_aggregation": {"protocol": "elsewhere"}}

    with pytest.raises(ConfigError, match="cannot run it per FedBuff buffer"):
        _server(fed, FedBuffSchedule(5, 6), ClaimsSecure(trainer, fed))


def test_experiment_files_run_fedbuff_with_secagg_in_simulation_only(fed):
    from fedmosaic.build import build_strategy
    from fedmosaic.config import validate

    raw = {"rounds": 1, "data": {"dataset": "digits"}, "partition": {"clients": 8},
           "runtime": {"secure_aggregation": True},
           "strategy": {"schedule": "fedbuff", "buffer_size": 5, "concurrency": 6}}
    exp = validate(raw)
    assert isinstance(build_strategy(exp).schedule, FedBuffSchedule)
    with pytest.raises(ConfigError, match="SecAgg\\+ over each FedBuff buffer runs in "
                                          "simulation only") as info:
        build_strategy(exp, deployment=True)
    assert info.value.key == "strategy.schedule"
    with pytest.raises(ConfigError, match="FedAsync takes a server step"):
        validate({**raw, "strategy": {"schedule": "fedasync", "alpha": 0.5, "concurrency": 6}})


def test_fedmosaic_run_with_secure_fedbuff(tmp_path):
    import json

    from typer.testing import CliRunner

    from fedmosaic.cli import app

    (tmp_path / "exp.toml").write_text("""
name = "secure-buff"
seed = 2
rounds = 3

[data]
dataset = "digits"

[partition]
clients = 10

[model]
hidden = [16]

[strategy]
schedule = "fedbuff"
buffer_size = 5
concurrency = 6

[runtime]
secure_aggregation = true

[clock]
speed_sigma = 1.0
""")
    res = CliRunner().invoke(app, ["run", str(tmp_path / "exp.toml"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    records = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [r["version"] for r in records] == [1, 2, 3]
    assert all(r["updates"] == 5 and r["sim_time"] > 0 for r in records)
    assert all("train_loss" not in r for r in records)
