"""Multi-server additive secret sharing (fedmosaic.privacy.shares) and its transport."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fedmosaic as fm
from fedmosaic.core import ConfigError
from fedmosaic.data import IID, partition
from fedmosaic.models import MLP
from fedmosaic.privacy import DPFedAvg
from fedmosaic.privacy.secagg.crypto import DeterministicRandom, ring_dtype
from fedmosaic.privacy.shares import ShareAggregator, ShareError, share_update, shared_sum
from fedmosaic.privacy.shares_transport import SecretSharingTransport
from fedmosaic.runtime import ClientFailure, PartialAggregate
from tests.conftest import make_blobs
from tests.privacy.test_secagg_protocol import chi_square_critical, chi_square_uniform


def _rows(n, dim, bits, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 1 << bits, size=(n, dim), dtype=np.uint64).astype(ring_dtype(bits))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), dim=st.integers(1, 300), aggregators=st.integers(2, 4),
       bits=st.sampled_from([32, 64]), seed=st.integers(0, 2**32 - 1))
def test_the_combined_sum_is_the_exact_modular_sum(n, dim, aggregators, bits, seed):
    rows = _rows(n, dim, bits, seed)
    res = shared_sum(rows, aggregators=aggregators, bits=bits,
                     random_bytes=DeterministicRandom(seed, b"t"))
    want = rows.sum(axis=0, dtype=ring_dtype(bits))  # wraps mod 2^bits
    assert res.included == list(range(n))
    assert np.array_equal(res.total, want)
    # One update's worth of bytes plus a header and a seed per other aggregator: not S x.
    itemsize = ring_dtype(bits).itemsize
    assert (res.bytes_up_per_client == dim * itemsize + 6 + (aggregators - 1) * (6 + 32)).all()


def test_clients_that_miss_an_aggregator_are_left_out_by_all_and_the_rest_is_exact():
    rows = _rows(8, 50, 32, 3)
    res = shared_sum(rows, aggregators=3, bits=32, reached={2: 0, 5: 2, 6: 1},
                     random_bytes=DeterministicRandom(1, b"t"))
    assert res.included == [0, 1, 3, 4, 7]
    assert np.array_equal(res.total, rows[res.included].sum(axis=0, dtype=np.uint32))


@pytest.mark.parametrize("bits", [32, 64])
def test_what_an_aggregator_sees_is_indistinguishable_from_uniform(bits):
    """A constant input (no randomness of its own): the full share, and each aggregator's
    sum, pass a chi-square test for uniformity on their top and bottom bytes."""
    dim, n = 1 << 15, 4
    rows = np.zeros((n, dim), dtype=ring_dtype(bits))
    rows[1] = (1 << bits) - 1
    res = shared_sum(rows, aggregators=2, bits=bits, random_bytes=DeterministicRandom(5, b"u"))
    critical = chi_square_critical(255)
    agg = ShareAggregator(0, dim, bits)
    agg.receive("c", share_update(rows[0], 2, bits, full_to=0,
                                  random_bytes=DeterministicRandom(9, b"u"))[0])
    for seen in (agg.full_share("c"), res.aggregator_sums[0], res.aggregator_sums[1]):
        y = np.asarray(seen).astype(np.uint64)
        assert chi_square_uniform((y >> np.uint64(bits - 8)).astype(np.int64)) < critical
        assert chi_square_uniform((y & np.uint64(0xFF)).astype(np.int64)) < critical
    assert np.array_equal(res.total, rows.sum(axis=0, dtype=ring_dtype(bits)))


def test_bad_share_messages_are_refused_and_change_nothing():
    agg = ShareAggregator(1, 10, 32)
    good = share_update(np.arange(10, dtype=np.uint32), 2, 32, full_to=1)
    with pytest.raises(ShareError, match="shorter than its header"):
        agg.receive("a", b"\x01")
    with pytest.raises(ShareError, match="a share of 11 values mod 2\\^32"):
        agg.receive("a", share_update(np.zeros(11, np.uint32), 2, 32, full_to=1)[1])
    with pytest.raises(ShareError, match="36 bytes, not 40"):
        agg.receive("a", good[1][:-4])
    with pytest.raises(ShareError, match="unknown kind 7"):
        agg.receive("a", b"\x07" + good[1][1:])
    assert agg.holders == set() and agg.bytes_received == 0
    agg.receive("a", good[1])
    with pytest.raises(ShareError, match="a second share from client 'a'"):
        agg.receive("a", good[1])
    assert agg.holders == {"a"}
    with pytest.raises(ValueError, match="at least 2 aggregators"):
        share_update(np.zeros(3, np.uint32), 1, 32, full_to=0)


def _trainer():
    return fm.TorchTrainer(lambda: MLP(5, [8], 3), lr=0.1, batch_size=8)


@pytest.fixture
def fed():
    return partition(make_blobs(400, 0), IID(), 12, 0, test=make_blobs(100, 1))


@pytest.mark.parametrize("aggregators", [2, 3])
def test_fedavg_under_secret_sharing_gives_the_plain_model_up_to_quantization(fed,
                                                                              aggregators):
    plain = fm.simulate(_trainer(), fed, fm.FedAvg(fraction=1.0), rounds=3, seed=0)
    tr = _trainer()
    transport = SecretSharingTransport(fm.SequentialTransport(tr, fed), clip=1.0,
                                       max_weight=40, aggregators=aggregators, seed=7)
    shared = fm.simulate(tr, fed, fm.FedAvg(fraction=1.0), rounds=3, seed=0,
                         transport=transport)
    assert torch.allclose(plain.weights, shared.weights, atol=1e-5)
    rec = shared.history[-1]
    assert rec["updates"] == 12 and rec["failures"] == 0 and "train_loss" not in rec
    dim = tr.spec.numel + 2
    assert rec["bytes_up"] == 12 * (4 * dim + 6 + (aggregators - 1) * 38)
    g = shared.guarantees
    assert "do not all collude" in g["secure_aggregation"]["assumes"]
    assert "only the sum" in g["server_sees"]


def test_dropouts_leave_the_sum_of_the_clients_every_aggregator_holds(fed):
    tr = _trainer()
    transport = SecretSharingTransport(fm.SequentialTransport(tr, fed), clip=1.0,
                                       max_weight=40, simulate_dropout=0.3, seed=2)
    w0 = tr.initial_weights(0)
    tasks = fm.FedAvg(fraction=1.0).configure_fit(1, fed.client_ids,
                                                  np.random.default_rng(0), run_seed=0)
    out = list(transport.fit(w0, tasks, fm.FedAvgAggregator()))
    failures = [r for r in out if isinstance(r, ClientFailure)]
    (part,) = [r for r in out if isinstance(r, PartialAggregate)]
    assert failures and part.count + len(failures) == 12
    assert all("left out of the sum" in f.reason for f in failures)
    singles = {u.client_id: u for u in fm.SequentialTransport(tr, fed).fit(w0, tasks)}
    want = sum(singles[c].delta * singles[c].num_samples for c in part.client_ids)
    assert torch.allclose(part.weighted_sum, want, atol=1e-3)
    assert part.total_weight == pytest.approx(
        sum(singles[c].num_samples for c in part.client_ids), abs=1e-3)


def test_rules_that_need_individual_updates_are_refused(fed):
    tr = _trainer()
    transport = SecretSharingTransport(fm.SequentialTransport(tr, fed))
    central = DPFedAvg(clip=1.0, delta=1e-5, noise_multiplier=1.0, sampling="poisson", rate=0.5)
    with pytest.raises(ConfigError, match="under secret sharing"):
        fm.simulate(tr, fed, central, rounds=1, transport=transport)
    with pytest.raises(ValueError, match="aggregators must be an integer in"):
        SecretSharingTransport(fm.SequentialTransport(tr, fed), aggregators=1)


def test_distributed_dp_composes_the_clients_add_the_noise(fed):
    tr = _trainer()
    strategy = DPFedAvg(clip=0.5, delta=1e-5, noise_multiplier=1.0, sampling="fixed",
                        clients_per_round=10, distributed=True, min_contributors=6)
    transport = SecretSharingTransport(fm.SequentialTransport(tr, fed), clip=2.0, seed=1)
    res = fm.simulate(tr, fed, strategy, rounds=3, seed=0, transport=transport)
    assert len(res.metric("dp_epsilon")) == 3 and res.metric("dp_epsilon")[-1] > 0
    assert "clients" in res.guarantees["differential_privacy"]["noise_added_by"]
    assert "DP noise" in res.guarantees["server_sees"]


def test_the_experiment_file_selects_secret_sharing_and_refuses_what_it_cannot_do():
    from fedmosaic.build import build_data, build_strategy, build_trainer, build_transport
    from fedmosaic.config import validate
    from fedmosaic.privacy.secagg.transport import SecAggPlusTransport

    def exp(**runtime):
        return {"rounds": 2, "data": {"dataset": "digits"}, "partition": {"clients": 6},
                "runtime": runtime}

    e = validate(exp(secure_aggregation="shares", shares_aggregators=3, secagg_clip=2.0))
    fed = build_data(e)
    transport = build_transport(e, fed, build_trainer(e, fed), build_strategy(e))
    assert isinstance(transport, SecretSharingTransport)
    assert transport.aggregators == 3 and transport.clip == 2.0
    assert transport.max_weight == max(fed.sizes().values())
    e = validate(exp(secure_aggregation=True))  # true is SecAgg+, as before
    assert e["runtime"]["secure_aggregation"] == "secagg+"
    assert isinstance(build_transport(e, fed, build_trainer(e, fed), build_strategy(e)),
                      SecAggPlusTransport)
    with pytest.raises(ConfigError, match="only with secure_aggregation = 'shares'"):
        validate(exp(secure_aggregation=True, shares_aggregators=2))
    with pytest.raises(ConfigError, match="only with secure_aggregation = 'secagg\\+'"):
        validate(exp(secure_aggregation="shares", secagg_dropout_rate=0.2))
    with pytest.raises(ConfigError, match="'secagg\\+' or 'shares'"):
        validate(exp(secure_aggregation="ckks-please"))
    with pytest.raises(ConfigError, match="'sync' with secure_aggregation = 'shares'"):
        validate({**exp(secure_aggregation="shares"),
                  "strategy": {"schedule": "fedbuff", "buffer_size": 3, "concurrency": 4}})


def test_fedmosaic_server_refuses_secret_sharing_until_it_runs_over_grpc():
    from fedmosaic.config import validate
    from fedmosaic.net.server import _secagg_driver

    e = validate({"rounds": 2, "data": {"dataset": "digits"},
                  "runtime": {"secure_aggregation": "shares"}})
    with pytest.raises(ConfigError, match="runs in simulation only so far"):
        _secagg_driver(e, None, None)


def test_one_client_is_never_released_as_a_sum(fed):
    tr = _trainer()
    transport = SecretSharingTransport(fm.SequentialTransport(tr, fed), max_weight=40, seed=1)
    tasks = fm.FedAvg(clients_per_round=1).configure_fit(1, fed.client_ids,
                                                         np.random.default_rng(0), run_seed=0)
    (part,) = list(transport.fit(tr.initial_weights(0), tasks, fm.FedAvgAggregator()))
    assert part.weighted_sum is None and "at least 2 clients" in part.rejected[-1]
