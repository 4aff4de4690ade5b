"""BatchedTransport must equal sequential training up to float rounding, or fall back."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fedmosaic as fm
from fedmosaic.algorithms.strategy import ClientTask
from fedmosaic.data import ArrayDataset, ClientData, Dirichlet, FederatedDataset, partition
from fedmosaic.models import MLP
from fedmosaic.runtime import ClientFailure, PartialAggregate, SequentialTransport
from fedmosaic.runtime.batched import BatchedTransport, BatchingFallbackWarning
from fedmosaic.train import FitConfig
from tests.conftest import make_blobs


def _trainer(model=lambda: MLP(5, [8], 3), **kw):
    kw.setdefault("lr", 0.1)
    kw.setdefault("batch_size", 8)
    return fm.TorchTrainer(model, **kw)


def _fed(sizes, seed=0):
    clients = [ClientData(f"c{i}", make_blobs(n, seed=seed + i)) for i, n in enumerate(sizes)]
    return FederatedDataset(name="blobs", clients=clients, test=make_blobs(50, seed=99),
                            num_classes=3, feature_shape=(5,))


def _tasks(fed, **cfg):
    return [ClientTask(c, FitConfig(round=1, seed=i, **cfg)) for i, c in enumerate(fed.client_ids)]


def _updates(transport, weights, tasks):
    return {u.client_id: u for u in transport.fit(weights, tasks, None)}


@pytest.mark.parametrize("strategy", [
    lambda: fm.FedAvg(clients_per_round=5),
    lambda: fm.FedAvg(fraction=1.0, weighting="uniform", server_opt=fm.FedAdam(lr=0.05)),
    lambda: fm.FedProx(mu=0.5, fraction=1.0, stragglers=0.5),
    lambda: fm.FedAvg(fraction=1.0, local_epochs=3, batch_size=4),
], ids=["fedavg", "uniform-fedadam", "fedprox-stragglers", "epochs-batch"])
def test_batched_run_equals_sequential_run(strategy):
    fed = partition(make_blobs(300, 0), Dirichlet(alpha=0.3), 8, 0, test=make_blobs(60, 1))
    seq = fm.simulate(_trainer(), fed, strategy(), rounds=3, seed=2)
    tr = _trainer()
    transport = BatchedTransport(tr, fed)
    bat = fm.simulate(tr, fed, strategy(), rounds=3, seed=2, transport=transport)
    assert transport.batched
    assert torch.allclose(seq.weights, bat.weights, atol=1e-5)
    for a, b in zip(seq.history, bat.history):
        assert a["updates"] == b["updates"] and a["bytes_up"] == b["bytes_up"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["steps"] == pytest.approx(b["steps"])


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    batch=st.integers(1, 16),
    epochs=st.integers(1, 3),
    caps=st.lists(st.one_of(st.none(), st.integers(1, 6)), min_size=6, max_size=6),
    lrs=st.lists(st.sampled_from([0.01, 0.1, 0.3]), min_size=6, max_size=6),
    mu=st.sampled_from([0.0, 0.0, 1.0]),
)
def test_each_client_update_equals_its_sequential_update(sizes, batch, epochs, caps, lrs, mu):
    fed = _fed(sizes)
    tr = _trainer()
    w = tr.initial_weights(0)
    tasks = [ClientTask(c, FitConfig(round=1, epochs=epochs, batch_size=batch, seed=7 + i,
                                     max_steps=caps[i], lr=lrs[i], proximal_mu=mu))
             for i, c in enumerate(fed.client_ids)]
    want = _updates(SequentialTransport(tr, fed), w, tasks)
    got = _updates(BatchedTransport(tr, fed, max_clients_per_chunk=4), w, tasks)
    assert want.keys() == got.keys()
    for cid, u in want.items():
        # Float32 sums in another order: up to 3 epochs at lr 0.3 drift by a few ulps per
        # step, so the tolerance is relative to the delta's size as well as absolute.
        assert torch.allclose(u.delta, got[cid].delta, rtol=1e-4, atol=2e-5), cid
        assert u.num_samples == got[cid].num_samples
        assert u.metrics["steps"] == got[cid].metrics["steps"]
        assert u.metrics["train_loss"] == pytest.approx(got[cid].metrics["train_loss"], rel=1e-4)


def test_partial_aggregate_equals_sum_of_individual_updates():
    fed = _fed([5, 17, 33, 2])
    tr = _trainer()
    w = tr.initial_weights(0)
    tasks = _tasks(fed)
    singles = _updates(BatchedTransport(tr, fed), w, tasks)
    agg = fm.FedAvgAggregator()
    (part,) = list(BatchedTransport(tr, fed).fit(w, tasks, agg))
    assert isinstance(part, PartialAggregate)
    expected = sum(u.num_samples * u.delta for u in singles.values())
    assert torch.allclose(part.weighted_sum, expected, atol=1e-5)
    assert part.count == 4 and part.total_weight == 57 and part.num_samples == 57
    assert sorted(part.client_ids) == sorted(singles)


def test_chunking_by_count_and_by_memory_budget_changes_nothing():
    fed = _fed([9, 30, 4, 12, 25, 7, 18])
    tr = _trainer()
    w = tr.initial_weights(0)
    tasks = _tasks(fed, epochs=2)
    whole = _updates(BatchedTransport(tr, fed), w, tasks)
    for transport in (BatchedTransport(tr, fed, max_clients_per_chunk=2),
                      BatchedTransport(tr, fed, memory_budget_mb=1e-3)):
        parts = _updates(transport, w, tasks)
        for cid in whole:
            assert torch.allclose(whole[cid].delta, parts[cid].delta, atol=1e-6)
    tiny = BatchedTransport(tr, fed, memory_budget_mb=1e-3)
    list(tiny.fit(w, tasks))
    assert tiny._chunk == 1


def test_non_finite_clients_are_rejected_in_the_partial_sum():
    fed = _fed([10, 10])
    tr = _trainer()
    w = tr.initial_weights(0)
    tasks = [ClientTask("c0", FitConfig(round=1, lr=1e38, epochs=5)),
             ClientTask("c1", FitConfig(round=1))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        (part,) = list(BatchedTransport(tr, fed).fit(w, tasks, fm.FedAvgAggregator()))
    assert part.count == 1 and part.client_ids == ["c1"]
    assert len(part.rejected) == 1 and "'c0'" in part.rejected[0]


def test_unknown_client_is_a_failure_not_a_crash():
    fed = _fed([10])
    tr = _trainer()
    out = list(BatchedTransport(tr, fed).fit(tr.initial_weights(0),
                                             [ClientTask("ghost", FitConfig(round=1))]))
    assert isinstance(out[0], ClientFailure) and out[0].client_id == "ghost"


class _Branchy(nn.Module):
    """Data-dependent control flow: vmap cannot trace it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return -self.lin(x)


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"model": lambda: nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))},
     "BatchNorm1d"),
    ({"model": lambda: nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.2), nn.Linear(8, 3))},
     "Dropout"),
    ({"optimizer": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9)}, "not plain SGD"),
    ({"loss": lambda out, y: nn.functional.cross_entropy(out, y)}, "custom callable"),
    ({"model": _Branchy}, "vmap failed"),
])
def test_unbatchable_setups_fall_back_with_a_reason_and_stay_correct(kwargs, reason):
    fed = _fed([12, 20, 7])
    model = kwargs.pop("model", lambda: MLP(5, [8], 3))
    tr = _trainer(model, **kwargs)
    with pytest.warns(BatchingFallbackWarning, match=reason):
        transport = BatchedTransport(tr, fed)
        bat = fm.simulate(tr, fed, fm.FedAvg(fraction=1.0), rounds=2, seed=1,
                          transport=transport)
    assert not transport.batched and reason in transport.fallback_reason
    seq = fm.simulate(_trainer(model, **kwargs), fed, fm.FedAvg(fraction=1.0), rounds=2, seed=1)
    assert torch.equal(seq.weights, bat.weights)


def test_cnn_on_images_batches_and_matches():
    rng = np.random.default_rng(0)
    x = rng.random((60, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 60)
    data = ArrayDataset(x, y.astype(np.int64))
    fed = partition(data, fm.data.IID(), 3, 0, test=data)
    tr = fm.TorchTrainer(fm.models.SmallCNN, lr=0.05, batch_size=16)
    w = tr.initial_weights(0)
    tasks = _tasks(fed)
    want = _updates(SequentialTransport(tr, fed), w, tasks)
    # Forced: on CPU, "auto" trains a convolution sequentially (test_batched_fallback.py).
    transport = BatchedTransport(tr, fed, batching="always")
    got = _updates(transport, w, tasks)
    assert transport.batched
    for cid in want:
        assert torch.allclose(want[cid].delta, got[cid].delta, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_on_cuda_equals_sequential_on_cpu():
    fed = partition(make_blobs(300, 0), Dirichlet(alpha=0.5), 20, 0, test=make_blobs(60, 1))
    seq = fm.simulate(_trainer(), fed, fm.FedProx(mu=0.1, fraction=1.0), rounds=3, seed=0)
    tr = _trainer(device="cuda")
    bat = fm.simulate(tr, fed, fm.FedProx(mu=0.1, fraction=1.0), rounds=3, seed=0,
                      transport=BatchedTransport(tr, fed))
    assert torch.allclose(seq.weights, bat.weights, atol=1e-4)


def test_chunks_respect_the_memory_budget_whatever_the_population():
    """10,000 clients never mean 10,000 weight rows at once: chunk x per-client bytes <= budget."""
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.random((2000, 5), dtype=np.float32), rng.integers(0, 3, 2000))
    fed = partition(data, fm.data.IID(), 2000, 0, test=data)  # 1 sample per client
    tr = _trainer()
    transport = BatchedTransport(tr, fed, memory_budget_mb=0.25)
    seen: list[int] = []
    original = transport._train_chunk

    def spy(weights, tasks, weighting):
        seen.append(len(tasks))
        return original(weights, tasks, weighting)

    transport._train_chunk = spy
    parts = list(transport.fit(tr.initial_weights(0), _tasks(fed), fm.FedAvgAggregator()))
    per_client = transport._bytes_per_client(tr.batch_size)
    # The model is a linear chain, which is not probed: every call trains a real chunk.
    assert transport._chain is not None
    assert max(seen) * per_client <= 0.25 * 2**20
    assert sum(seen) == 2000 and len(seen) > 2
    assert sum(p.count for p in parts) == 2000
