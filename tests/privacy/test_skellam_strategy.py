"""DistributedSkellam over SecAgg+: end to end with fm.simulate, refusals, accounting."""

import itertools

import numpy as np
import pytest
import torch

import fedmosaic as fm
from fedmosaic.algorithms.strategy import client_seed
from fedmosaic.core import ConfigError
from fedmosaic.data import IID, partition
from fedmosaic.models import MLP
from fedmosaic.privacy.distributed_skellam import DistributedSkellam
from fedmosaic.privacy.secagg.transport import SecAggPlusTransport
from fedmosaic.runtime import ClientFailure, PartialAggregate
from tests.conftest import make_blobs


def _trainer():
    return fm.TorchTrainer(lambda: MLP(5, [8], 3), lr=0.1, batch_size=8)


@pytest.fixture(scope="module")
def fed():
    return partition(make_blobs(400, 0), IID(), 12, 0, test=make_blobs(100, 1))


@pytest.fixture(scope="module")
def fed40():
    # Cohorts of about 20: SecAgg+ parameters exist for them with the default tolerated
    # corrupted fraction and dropouts.
    return partition(make_blobs(1200, 0), IID(), 40, 0, test=make_blobs(100, 1))


def _strategy(**kw):
    args = dict(clip=1.0, delta=1e-5, noise_multiplier=0.2, sampling="fixed",
                clients_per_round=10, min_contributors=6, bits=20)
    args.update(kw)
    return DistributedSkellam(**args)


def test_simulate_with_secagg_and_skellam_trains_and_reports_the_guarantee(fed):
    tr = _trainer()
    strategy = _strategy()
    transport = SecAggPlusTransport(fm.SequentialTransport(tr, fed), seed=1)
    res = fm.simulate(tr, fed, strategy, rounds=6, seed=0, transport=transport)
    losses = [r["test_loss"] for r in res.history]
    assert losses[-1] < losses[0] - 0.1
    assert res.history[-1]["test_accuracy"] > 0.6  # 3 classes
    eps = [r["dp_epsilon"] for r in res.history]
    assert all(a < b for a, b in itertools.pairwise(eps))
    dp = res.guarantees["differential_privacy"]
    assert dp["mechanism"].startswith("distributed Skellam")
    assert dp["epsilon"] == pytest.approx(eps[-1]) and dp["rounds"] == 6
    # Fixed-size sampling: no amplification, the same guarantee against the server.
    assert dp["epsilon_against_server"] == pytest.approx(dp["epsilon"])
    assert dp["skellam"]["bits"] == 20 and dp["skellam"]["wrap_probability_bound"] <= 1e-9
    assert "simulation only" in dp["noise_seed"]
    sa = res.guarantees["secure_aggregation"]
    assert sa["ring_bits"] == 20 and sa["encoding"]["mechanism"] == "skellam"
    assert "train_loss" not in res.history[-1]


def test_the_decoded_sum_is_the_sum_of_the_clipped_updates_plus_the_noise(fed):
    tr = _trainer()
    strategy = _strategy(noise_multiplier=0.05, clients_per_round=12, min_contributors=12)
    transport = SecAggPlusTransport(fm.SequentialTransport(tr, fed), seed=2)
    fm.simulate(tr, fed, strategy, rounds=1, seed=0, transport=transport)  # configures both
    w0 = tr.initial_weights(0)
    tasks = strategy.configure_fit(2, fed.client_ids, np.random.default_rng(0), run_seed=0)
    out = list(transport.fit(w0, tasks, strategy.aggregator))
    (part,) = [r for r in out if isinstance(r, PartialAggregate)]
    singles = list(fm.SequentialTransport(tr, fed).fit(w0, tasks))
    clipped = sum(u.delta * min(1.0, 1.0 / float(torch.linalg.vector_norm(u.delta)))
                  for u in singles)
    err = (part.weighted_sum - clipped).numpy()
    assert part.count == 12 and part.total_weight == 12.0
    assert np.std(err) == pytest.approx(0.05, rel=0.25)  # z * clip on the sum


def test_a_target_epsilon_is_met_with_poisson_sampling(fed40):
    tr = _trainer()
    strategy = _strategy(noise_multiplier=None, target_epsilon=8.0, rounds=4,
                         sampling="poisson", rate=0.5, clients_per_round=None,
                         min_contributors=8, max_clients=40)
    transport = SecAggPlusTransport(fm.SequentialTransport(tr, fed40), seed=3)
    res = fm.simulate(tr, fed40, strategy, rounds=4, seed=0, transport=transport)
    assert [r["updates"] > 0 for r in res.history] == [True] * 4
    dp = res.guarantees["differential_privacy"]
    assert 7.0 < dp["epsilon"] <= 8.0
    # The server knows the cohort: its guarantee has no amplification.
    assert dp["epsilon_against_server"] > dp["epsilon"]
    assert "Zhu and Wang" in dp["accountant"]


def test_other_transports_are_refused(fed):
    tr = _trainer()
    with pytest.raises(ConfigError, match="SecAggPlusTransport"):
        fm.simulate(tr, fed, _strategy(), rounds=1, seed=0)
    with pytest.raises(ValueError, match="uniform"):
        _strategy(weighting="samples")


def test_a_round_larger_than_the_modular_clipping_design_is_refused(fed):
    tr = _trainer()
    strategy = _strategy(clients_per_round=12, max_clients=8, min_contributors=4)
    transport = SecAggPlusTransport(fm.SequentialTransport(tr, fed), seed=4)
    transport.check_strategy(strategy)
    strategy.population = 12
    w0 = tr.initial_weights(0)
    tasks = strategy.configure_fit(1, fed.client_ids, np.random.default_rng(0), run_seed=0)
    out = list(transport.fit(w0, tasks, strategy.aggregator))
    assert len(out) == 12 and all(isinstance(r, ClientFailure) for r in out)
    assert "modular-clipping bound holds for at most 8" in out[0].reason


def test_the_budget_stops_the_run_before_a_round_would_exceed_it(fed):
    tr = _trainer()
    strategy = _strategy(noise_multiplier=0.8, budget_epsilon=12.0)
    transport = SecAggPlusTransport(fm.SequentialTransport(tr, fed), seed=5)
    res = fm.simulate(tr, fed, strategy, rounds=20, seed=0, transport=transport)
    assert res.stopped and "budget" in res.stopped
    assert 0 < len(res.history) < 20
    assert res.guarantees["differential_privacy"]["epsilon"] <= 12.0


def test_too_few_survivors_leave_the_model_unchanged_but_are_accounted(fed40):
    tr = _trainer()
    strategy = _strategy(clients_per_round=20, min_contributors=20)
    transport = SecAggPlusTransport(fm.SequentialTransport(tr, fed40), seed=6,
                                    simulate_dropout=0.2, dropout_rate=0.3)
    w0 = tr.initial_weights(0)
    res = fm.simulate(tr, fed40, strategy, rounds=1, seed=0, transport=transport,
                      initial_weights=w0)
    rec = res.history[0]
    assert 0 < rec["updates"] < 20 and rec["dp_round_discarded"] == 1.0
    assert torch.equal(res.weights, w0)
    assert rec["dp_epsilon"] > 0  # the server saw an under-noised sum: it is accounted


def test_seeded_noise_reproduces_and_secure_noise_does_not(fed):
    def run(secure):
        tr = _trainer()
        transport = SecAggPlusTransport(fm.SequentialTransport(tr, fed), seed=7,
                                        secure_noise=secure)
        res = fm.simulate(tr, fed, _strategy(), rounds=1, seed=0, transport=transport)
        return res

    a, b = run(False), run(False)
    assert torch.equal(a.weights, b.weights)
    c, d = run(True), run(True)
    assert not torch.equal(c.weights, d.weights)
    assert "SecureNoise" in c.guarantees["differential_privacy"]["noise_seed"]
    assert "SecureNoise" in c.guarantees["secure_aggregation"]["client_noise"]
    assert "simulation only" in a.guarantees["differential_privacy"]["cohort"]


def test_secure_noise_draws_cohorts_and_client_seeds_nobody_can_derive(fed40):
    strategy = _strategy(sampling="poisson", rate=0.5, clients_per_round=None,
                         min_contributors=8, secure_noise=True)
    transport = SecAggPlusTransport(fm.SequentialTransport(_trainer(), fed40),
                                    secure_noise=True)
    transport.check_strategy(strategy)
    cohorts = [strategy.configure_fit(1, fed40.client_ids, np.random.default_rng(0),
                                      run_seed=0) for _ in range(2)]
    assert [t.client_id for t in cohorts[0]] != [t.client_id for t in cohorts[1]]
    # Same server rng, different cohorts; and seeds not derived from the run seed.
    assert all(t.config.seed != client_seed(0, 1, t.client_id) for t in cohorts[0])
    assert "SecureNoise" in strategy.guarantees()["differential_privacy"]["cohort"]


def test_the_strategy_state_round_trips(fed):
    tr = _trainer()
    strategy = _strategy()
    transport = SecAggPlusTransport(fm.SequentialTransport(tr, fed), seed=8)
    fm.simulate(tr, fed, strategy, rounds=2, seed=0, transport=transport)
    fresh = _strategy()
    fresh.load_state_dict(strategy.state_dict())
    assert fresh.accountant.epsilon(1e-5) == strategy.accountant.epsilon(1e-5)
    assert fresh.mechanism == strategy.mechanism
