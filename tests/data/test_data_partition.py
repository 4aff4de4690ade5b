"""Partitioners (property-based) and partition()."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmosaic.core.errors import ConfigError
from fedmosaic.data import (
    IID,
    ArrayDataset,
    Dirichlet,
    NaturalIds,
    Partitioner,
    Shards,
    partition,
)

FAST = settings(max_examples=25, deadline=None)


@st.composite
def labelled(draw: st.DrawFn, min_per_client: int = 1) -> tuple[np.ndarray, int]:
    """Labels with 1..10 classes and a client count that leaves enough samples per client."""
    num_clients = draw(st.integers(1, 8))
    num_classes = draw(st.integers(1, 10))
    n = draw(st.integers(num_clients * min_per_client, 300))
    seed = draw(st.integers(0, 2**32 - 1))
    labels = np.random.default_rng(seed).integers(0, num_classes, n)
    return labels, num_clients


partitioners = st.one_of(
    st.just(IID()),
    st.floats(0.5, 100.0).map(lambda a: Dirichlet(alpha=a)),
    st.integers(1, 3).map(lambda s: Shards(shards_per_client=s)),
)


def assert_is_partition(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1
        assert np.all(np.diff(p) > 0)  # sorted, hence no duplicates within a client
    joined = np.concatenate(parts)
    assert len(joined) == n  # no index in two clients ...
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))  # ... and none left out


@FAST
@given(data=labelled(min_per_client=20), partitioner=partitioners, seed=st.integers(0, 2**31))
def test_disjoint_complete_and_seed_deterministic(
    data: tuple[np.ndarray, int], partitioner: Partitioner, seed: int
) -> None:
    labels, k = data
    first = partitioner.split(labels, k, np.random.default_rng(seed))
    assert_is_partition(first, len(labels), k)
    again = partitioner.split(labels, k, np.random.default_rng(seed))
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)


@FAST
@given(data=labelled(min_per_client=1), seed=st.integers(0, 2**31))
def test_iid_sizes_differ_by_at_most_one(data: tuple[np.ndarray, int], seed: int) -> None:
    labels, k = data
    sizes = [len(p) for p in IID().split(labels, k, np.random.default_rng(seed))]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(labels)


@FAST
@given(
    num_classes=st.integers(2, 6),
    per_class=st.integers(30, 80),
    num_clients=st.integers(2, 6),
    alpha=st.floats(0.5, 10.0),
    min_size=st.integers(1, 10),
    seed=st.integers(0, 2**31),
)
def test_dirichlet_respects_min_size(
    num_classes: int, per_class: int, num_clients: int, alpha: float, min_size: int, seed: int
) -> None:
    # Leave slack (>= 4 * min_size per client on average): near-tight cases are legitimately
    # infeasible for a random split and end in the "could not give" error tested below.
    per_class = max(per_class, math.ceil(4 * num_clients * min_size / num_classes))
    labels = np.repeat(np.arange(num_classes), per_class)
    d = Dirichlet(alpha=alpha, min_size=min_size)
    parts = d.split(labels, num_clients, np.random.default_rng(seed))
    assert_is_partition(parts, len(labels), num_clients)
    assert min(len(p) for p in parts) >= min_size


def mean_tv_to_global(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> float:
    """Mean total-variation distance between each client's label mix and the global one."""
    glob = np.bincount(labels, minlength=num_classes) / len(labels)
    tvs = [
        0.5 * np.abs(np.bincount(labels[p], minlength=num_classes) / len(p) - glob).sum()
        for p in parts
    ]
    return float(np.mean(tvs))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_dirichlet_large_alpha_is_close_to_iid(seed: int) -> None:
    labels = np.repeat(np.arange(5), 400)
    parts = Dirichlet(alpha=1000.0).split(labels, 4, np.random.default_rng(seed))
    for p in parts:
        mix = np.bincount(labels[p], minlength=5) / len(p)
        np.testing.assert_allclose(mix, 0.2, atol=0.05)
    assert mean_tv_to_global(labels, parts, 5) < 0.05


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_dirichlet_small_alpha_is_skewed(seed: int) -> None:
    labels = np.repeat(np.arange(10), 100)
    parts = Dirichlet(alpha=0.05).split(labels, 10, np.random.default_rng(seed))
    assert mean_tv_to_global(labels, parts, 10) > 0.5
    # A typical client is dominated by one class (IID would give a top share near 0.1).
    top_share = [np.bincount(labels[p]).max() / len(p) for p in parts]
    assert np.median(top_share) > 0.35


def test_dirichlet_gives_up_with_clear_error() -> None:
    labels = np.repeat(np.arange(2), 50)
    with pytest.raises(ValueError, match=r"min_size=1 samples in 5 draws"):
        Dirichlet(alpha=0.001, max_tries=5).split(labels, 20, np.random.default_rng(0))
    with pytest.raises(ValueError, match="cannot give 20 clients at least 10"):
        Dirichlet(alpha=1.0, min_size=10).split(labels, 20, np.random.default_rng(0))


@FAST
@given(
    num_clients=st.integers(1, 8),
    shards_per_client=st.integers(1, 3),
    shard_size=st.integers(1, 6),
    seed=st.integers(0, 2**31),
    data=st.data(),
)
def test_shards_limit_labels_per_client_on_balanced_data(
    num_clients: int, shards_per_client: int, shard_size: int, seed: int, data: st.DataObject
) -> None:
    num_shards = num_clients * shards_per_client
    # Classes must split evenly into shards for every shard to hold a single label.
    num_classes = data.draw(st.sampled_from([c for c in range(1, 11) if num_shards % c == 0]))
    per_class = shard_size * num_shards // num_classes
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))
    parts = Shards(shards_per_client).split(labels, num_clients, np.random.default_rng(seed))
    assert_is_partition(parts, len(labels), num_clients)
    for p in parts:
        assert len(p) == shards_per_client * shard_size
        assert len(np.unique(labels[p])) <= shards_per_client


def test_shards_mcmahan_setting() -> None:
    # McMahan et al.: 100 clients x 2 shards of 300 over 60,000 balanced samples.
    labels = np.repeat(np.arange(10), 6000)
    parts = Shards(2).split(labels, 100, np.random.default_rng(0))
    assert {len(p) for p in parts} == {600}
    assert max(len(np.unique(labels[p])) for p in parts) <= 2
    assert_is_partition(parts, len(labels), 100)


def test_shards_needs_enough_samples() -> None:
    with pytest.raises(ValueError, match="into 8 shards"):
        Shards(2).split(np.zeros(5, np.int64), 4, np.random.default_rng(0))


def test_natural_ids_one_client_per_sorted_id() -> None:
    ids = np.array(["b", "a", "c", "a", "b", "a"])
    nat = NaturalIds(ids)
    labels = np.zeros(6, np.int64)
    for k in (3, None):
        parts = nat.split(labels, k, np.random.default_rng(0))
        assert [p.tolist() for p in parts] == [[1, 3, 5], [0, 4], [2]]
    assert nat.client_names() == ["a", "b", "c"]
    with pytest.raises(ConfigError, match=r"num_clients.*got 2.*None or 3"):
        nat.split(labels, 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="6 ids but there are 5 labels"):
        nat.split(labels[:5], None, np.random.default_rng(0))


@pytest.mark.parametrize(
    ("factory", "param"),
    [
        (lambda: Dirichlet(alpha=0.0), "'alpha': got 0.0"),
        (lambda: Dirichlet(alpha=-1.0), "'alpha': got -1.0"),
        (lambda: Dirichlet(alpha=math.nan), "'alpha': got nan"),
        (lambda: Dirichlet(alpha=1.0, min_size=-1), "'min_size': got -1"),
        (lambda: Dirichlet(alpha=1.0, max_tries=0), "'max_tries': got 0"),
        (lambda: Shards(shards_per_client=0), "'shards_per_client': got 0"),
        (lambda: NaturalIds(np.array([])), "'ids'"),
        (lambda: IID().split(np.zeros(3, np.int64), 0, np.random.default_rng(0)), "num_clients"),
    ],
)
def test_parameter_validation_names_parameter_and_value(factory: object, param: str) -> None:
    with pytest.raises(ValueError, match=param):
        factory()  # type: ignore[operator]


def test_partitioners_satisfy_protocol() -> None:
    for p in (IID(), Dirichlet(1.0), Shards(), NaturalIds(np.array([0]))):
        assert isinstance(p, Partitioner)


# ----------------------------------------------------------------------------- partition()


def indexed(n: int, num_classes: int = 4) -> ArrayDataset:
    """Feature 0 is the row index, so tests can recover which rows a client holds."""
    x = np.stack([np.arange(n), np.arange(n) % 7], axis=1).astype(np.float32)
    return ArrayDataset(x, (np.arange(n) % num_classes).astype(np.int64))


def rows(ds: ArrayDataset) -> list[int]:
    return ds.x[:, 0].astype(int).tolist()


def test_partition_builds_federation() -> None:
    train, test = indexed(100), indexed(10)
    fd = partition(train, IID(), 12, seed=3, test=test, name="toy")
    assert fd.name == "toy" and fd.num_classes == 4 and fd.feature_shape == (2,)
    assert fd.client_ids == [f"client_{i:02d}" for i in range(12)]
    assert fd.test is test
    assert sum(fd.sizes().values()) == 100
    assert sorted(r for c in fd.clients for r in rows(c.train)) == list(range(100))
    assert all(c.test is None for c in fd.clients)
    assert partition(train, IID(), 5, 0, test=test).client_ids[-1] == "client_4"


def test_partition_is_deterministic_per_seed() -> None:
    train, test = indexed(200), indexed(10)
    a = partition(train, Dirichlet(0.5), 5, seed=7, test=test, client_test_fraction=0.25)
    b = partition(train, Dirichlet(0.5), 5, seed=7, test=test, client_test_fraction=0.25)
    c = partition(train, Dirichlet(0.5), 5, seed=8, test=test, client_test_fraction=0.25)
    assert [rows(x.train) for x in a.clients] == [rows(x.train) for x in b.clients]
    assert [rows(x.test) for x in a.clients] == [rows(x.test) for x in b.clients]  # type: ignore[arg-type]
    assert [rows(x.train) for x in a.clients] != [rows(x.train) for x in c.clients]


def test_client_test_fraction_splits_each_client() -> None:
    train, test = indexed(300), indexed(10)
    plain = partition(train, Shards(2), 6, seed=1, test=test)
    fd = partition(train, Shards(2), 6, seed=1, test=test, client_test_fraction=0.2)
    for own, c in zip(plain.clients, fd.clients, strict=True):
        assert c.test is not None
        local_train, local_test = set(rows(c.train)), set(rows(c.test))
        assert not local_train & local_test
        # Ownership does not depend on the local test split.
        assert local_train | local_test == set(rows(own.train))
        assert len(local_test) == round(0.2 * len(own.train))
    assert fd.summary()[0]["test"] == 10


def test_client_test_fraction_keeps_one_train_sample() -> None:
    fd = partition(indexed(4), IID(), 4, seed=0, test=indexed(2), client_test_fraction=0.9)
    assert all(len(c.train) == 1 and c.test is not None and len(c.test) == 0 for c in fd.clients)


def test_partition_with_natural_ids() -> None:
    train = indexed(6)
    ids = np.array([20, 10, 20, 10, 30, 10])
    fd = partition(train, NaturalIds(ids), None, seed=0, test=indexed(2))
    assert fd.client_ids == ["10", "20", "30"]
    assert rows(fd.client("10").train) == [1, 3, 5]
    assert rows(fd.client("30").train) == [4]


def test_partition_num_classes_override_and_inference() -> None:
    train = ArrayDataset(np.zeros((4, 1), np.float32), np.array([0, 1, 0, 1]))
    test = ArrayDataset(np.zeros((1, 1), np.float32), np.array([5]))
    assert partition(train, IID(), 2, 0, test=test).num_classes == 6
    assert partition(train, IID(), 2, 0, test=test, num_classes=9).num_classes == 9


def test_partition_errors() -> None:
    train, test = indexed(10), indexed(2)
    with pytest.raises(ValueError, match=r"^\[partition\] clients = 11 but the data set has 10 "
                                         r"training samples: at most 10 clients$"):
        partition(train, IID(), 11, 0, test=test)
    with pytest.raises(ValueError, match="'clients'"):
        partition(train, IID(), None, 0, test=test)
    with pytest.raises(ValueError, match="client_test_fraction"):
        partition(train, IID(), 2, 0, test=test, client_test_fraction=1.0)

    class Overlapping:
        def split(self, labels: np.ndarray, num_clients: int, rng: np.random.Generator):
            return [np.array([0, 1]), np.array([1, 2])]

    class Starving:
        def split(self, labels: np.ndarray, num_clients: int, rng: np.random.Generator):
            return [np.arange(len(labels)), np.array([], dtype=np.int64)]

    class Lists:
        def split(self, labels: np.ndarray, num_clients: int, rng: np.random.Generator):
            return [list(range(0, 10, 2)), list(range(1, 10, 2))]

    odd = partition(train, Lists(), 2, 0, test=test).client("client_1")
    assert rows(odd.train) == [1, 3, 5, 7, 9]
    with pytest.raises(ValueError, match="overlapping"):
        partition(train, Overlapping(), 2, 0, test=test)
    with pytest.raises(ValueError, match="client 'client_1' no samples"):
        partition(train, Starving(), 2, 0, test=test)
    with pytest.raises(ValueError, match="2 parts for 3 clients"):
        partition(train, Starving(), 3, 0, test=test)
