"""SecAgg+ inside the server loop: the server learns only sums, runs finish, DP composes."""

import sys
from pathlib import Path

import pytest
import torch

import fedmosaic as fm
from fedmosaic.core import ConfigError
from fedmosaic.data import IID, load_digits, partition
from fedmosaic.models import MLP
from fedmosaic.privacy import DPFedAvg
from fedmosaic.privacy.secagg.transport import SecAggPlusTransport
from tests.conftest import make_blobs

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from peer_fedmosaic import peer_partition


def _trainer():
    return fm.TorchTrainer(lambda: MLP(5, [8], 3), lr=0.1, batch_size=8)


@pytest.fixture
def fed():
    return partition(make_blobs(400, 0), IID(), 12, 0, test=make_blobs(100, 1))


def test_secure_aggregation_gives_the_plain_weighted_mean_up_to_quantization(fed):
    plain = fm.simulate(_trainer(), fed, fm.FedAvg(fraction=1.0), rounds=3, seed=0)
    tr = _trainer()
    transport = SecAggPlusTransport(fm.SequentialTransport(tr, fed), clip=1.0,
                                    max_weight=40, seed=7)
    secure = fm.simulate(tr, fed, fm.FedAvg(fraction=1.0), rounds=3, seed=0,
                         transport=transport)
    assert torch.allclose(plain.weights, secure.weights, atol=1e-5)
    rec = secure.history[-1]
    assert rec["updates"] == 12 and rec["failures"] == 0
    assert rec["bytes_up"] == transport.last_round["bytes_up"] > 12 * tr.spec.nbytes
    assert "train_loss" not in rec  # no per-client metric leaves a client
    g = secure.guarantees
    assert g["secure_aggregation"]["threshold"] >= 2
    assert "only the sum" in g["server_sees"]


def test_dropouts_during_the_protocol_leave_the_sum_of_the_survivors(fed):
    tr = _trainer()
    transport = SecAggPlusTransport(fm.SequentialTransport(tr, fed), clip=1.0, max_weight=40,
                                    simulate_dropout=0.25, dropout_rate=0.25, seed=4)
    w0 = tr.initial_weights(0)
    tasks = fm.FedAvg(fraction=1.0).configure_fit(1, fed.client_ids,
                                                  __import__("numpy").random.default_rng(0),
                                                  run_seed=0)
    out = list(transport.fit(w0, tasks, fm.FedAvgAggregator()))
    failures = [r for r in out if isinstance(r, fm.runtime.ClientFailure)]
    (part,) = [r for r in out if isinstance(r, fm.runtime.PartialAggregate)]
    assert failures and part.count + len(failures) == 12
    # The sum is exactly the survivors' weighted sum, up to quantization.
    singles = {u.client_id: u for u in fm.SequentialTransport(tr, fed).fit(w0, tasks)}
    want = sum(singles[c].num_samples * singles[c].delta for c in part.client_ids)
    assert torch.allclose(part.weighted_sum, want.float(), atol=1e-4)
    assert part.total_weight == pytest.approx(sum(singles[c].num_samples
                                                  for c in part.client_ids), abs=1e-3)


def test_aggregators_that_need_individual_updates_are_refused_at_configuration(fed):
    tr = _trainer()
    transport = SecAggPlusTransport(fm.SequentialTransport(tr, fed))
    central = DPFedAvg(clip=1.0, delta=1e-5, noise_multiplier=1.0, sampling="poisson", rate=0.5)
    with pytest.raises(ConfigError, match="individual updates"):
        fm.simulate(tr, fed, central, rounds=1, transport=transport)


def test_distributed_dp_over_secagg_noises_on_the_clients_and_reports_epsilon(fed):
    tr = _trainer()
    strategy = DPFedAvg(clip=0.5, delta=1e-5, noise_multiplier=1.0, sampling="fixed",
                        clients_per_round=10, distributed=True, min_contributors=6)
    transport = SecAggPlusTransport(fm.SequentialTransport(tr, fed), clip=2.0, seed=1)
    res = fm.simulate(tr, fed, strategy, rounds=3, seed=0, transport=transport)
    assert len(res.metric("dp_epsilon")) == 3 and res.metric("dp_epsilon")[-1] > 0
    dp = res.guarantees["differential_privacy"]
    assert "clients" in dp["noise_added_by"]
    assert "noised sum" in res.guarantees["server_sees"] or "DP noise" in \
        res.guarantees["server_sees"]
    # Each client's submitted update carries its share of the noise: std z*S/sqrt(m).
    (stage,) = strategy.client_stages
    assert stage.noise_std == pytest.approx(1.0 * 0.5 / 6 ** 0.5)


def test_distributed_dp_refuses_adaptive_clipping_and_needs_min_contributors():
    with pytest.raises(ValueError, match="adaptive"):
        DPFedAvg(clip=1.0, delta=1e-5, noise_multiplier=1.0, rate=0.5, distributed=True,
                 min_contributors=2, adaptive_clip_quantile=0.5)
    with pytest.raises(ValueError, match="min_contributors"):
        DPFedAvg(clip=1.0, delta=1e-5, noise_multiplier=1.0, rate=0.5, distributed=True)


@pytest.mark.slow
def test_peer_task_with_secagg_and_100_clients_per_round_matches_plain_accuracy():
    train, test = load_digits()
    fed = peer_partition(train, test, 100, 0)

    def run(secure: bool):
        tr = fm.TorchTrainer(lambda: MLP(64, [64], 10), lr=0.05, batch_size=32)
        transport = fm.BatchedTransport(tr, fed)
        if secure:
            transport = SecAggPlusTransport(transport, clip=1.0, max_weight=20, seed=0)
        return fm.simulate(tr, fed, fm.FedAvg(clients_per_round=100), 12, seed=0,
                           transport=transport)

    plain, secure = run(False), run(True)
    assert abs(plain.final["test_accuracy"] - secure.final["test_accuracy"]) <= 0.01
    assert torch.allclose(plain.weights, secure.weights, atol=1e-4)


def test_three_participants_give_a_failed_round_with_the_reason_not_a_crash():
    """Issue #24: with 3 participants left no parameters are secure (gamma = 0.2, delta = 0.1):
    ``secagg_plus_parameters`` used to raise an uncaught ValueError that ended the run."""
    tr = _trainer()
    small = partition(make_blobs(120, 0), IID(), 3, 0, test=make_blobs(30, 1))
    transport = SecAggPlusTransport(fm.SequentialTransport(tr, small), clip=1.0, max_weight=40)
    tasks = fm.FedAvg(fraction=1.0).configure_fit(1, small.client_ids,
                                                  __import__("numpy").random.default_rng(0),
                                                  run_seed=0)
    out = list(transport.fit(tr.initial_weights(0), tasks, fm.FedAvgAggregator()))
    assert len(out) == 3 and all(isinstance(r, fm.runtime.ClientFailure) for r in out)
    assert all("no SecAgg+ parameters for n=3" in r.reason for r in out)
    with pytest.raises(fm.core.RoundFailedError, match="3 clients failed"):
        fm.simulate(tr, small, fm.FedAvg(fraction=1.0), rounds=1, transport=transport)


def test_tolerated_corrupted_fraction_sizes_the_threshold(fed):
    """More members colluding with the server need a higher threshold (and the run says which
    fraction it was designed for); the experiment file sets it as
    runtime.secagg_corrupted_fraction."""
    thresholds = {}
    for gamma in (0.0, 0.3):
        tr = _trainer()
        transport = SecAggPlusTransport(fm.SequentialTransport(tr, fed), clip=1.0,
                                        max_weight=40, seed=7, corrupted_fraction=gamma)
        run = fm.simulate(tr, fed, fm.FedAvg(fraction=1.0), rounds=1, seed=0,
                          transport=transport)
        sa = run.guarantees["secure_aggregation"]
        assert sa["tolerated_corrupted_fraction"] == gamma
        thresholds[gamma] = sa["threshold"]
    assert thresholds[0.3] > thresholds[0.0]
    with pytest.raises(ValueError, match="corrupted_fraction"):
        SecAggPlusTransport(fm.SequentialTransport(_trainer(), fed), corrupted_fraction=1.0)


def test_corrupted_fraction_from_the_experiment_file():
    from fedmosaic.build import build_transport
    from fedmosaic.config import validate

    raw = {"rounds": 1, "data": {"dataset": "digits"}, "partition": {"clients": 6},
           "runtime": {"secure_aggregation": True, "secagg_corrupted_fraction": 0.3}}
    exp = validate(raw)
    train, test = load_digits()
    fed = partition(train, IID(), 6, 0, test=test)
    transport = build_transport(exp, fed, _trainer())
    assert transport.corrupted_fraction == 0.3
    with pytest.raises(ConfigError, match="secagg_corrupted_fraction"):
        validate({**raw, "runtime": {"secagg_corrupted_fraction": 0.3}})
