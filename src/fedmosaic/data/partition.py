"""Partitioners: how one labelled dataset is split across simulated clients."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from fedmosaic.core.errors import ConfigError, FedmosaicError
from fedmosaic.data.dataset import ArrayDataset, ClientData, FederatedDataset


class PartitionError(FedmosaicError, ValueError):
    """The data cannot be split as asked (too few samples for the clients, unusable labels);
    the message says what to change."""


@runtime_checkable
class Partitioner(Protocol):
    """Splits sample indices across clients.

    ``split`` returns one int64 index array per client. The arrays are disjoint and
    their union is every index ``0 .. len(labels) - 1``, unless a partitioner documents
    otherwise. All randomness comes from ``rng``, so a seeded generator gives a
    reproducible partition.
    """

    def split(
        self, labels: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> list[np.ndarray]: ...


def _check_num_clients(num_clients: object) -> int:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise ConfigError("num_clients", num_clients, "an integer >= 1")
    if num_clients < 1:
        raise ConfigError("num_clients", num_clients, "an integer >= 1")
    return int(num_clients)


def _as_labels(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_enough_samples(n: int, num_clients: int, per_client: int = 1) -> None:
    if n < num_clients * per_client:
        raise PartitionError(
            f"cannot give {num_clients} clients at least {per_client} sample(s) each "
            f"from {n} samples"
        )


def _check_labels(labels: np.ndarray, which: str) -> None:
    """Class labels are indices 0..C-1: a negative one would only fail deep inside training
    (cross-entropy's "Target -1 is out of bounds"), after the data was split and sent out."""
    y = np.asarray(labels)
    if y.size and y.dtype.kind in "iu" and int(y.min()) < 0:
        count = int((y < 0).sum())
        raise PartitionError(f"the {which} set has a negative label ({int(y.min())}, "
                             f"{count} sample{'s' * (count > 1)}); labels must be class indices "
                             "0, 1, ..., C-1")


def _finish(parts: list[np.ndarray]) -> list[np.ndarray]:
    # Sorted int64 indices make a partition a canonical set, independent of cut order.
    return [np.sort(p).astype(np.int64, copy=False) for p in parts]


@dataclass(frozen=True)
class IID:
    """Uniform random split: a seeded permutation cut into near-equal parts.

    Client sizes differ by at most one (``np.array_split``).
    """

    def split(
        self, labels: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        y = _as_labels(labels)
        k = _check_num_clients(num_clients)
        _check_enough_samples(len(y), k)
        return _finish(np.array_split(rng.permutation(len(y)), k))


@dataclass(frozen=True)
class Dirichlet:
    """Label-skewed split of Hsu, Qi and Brown (2019), "Measuring the Effects of
    Non-Identical Data Distribution for Federated Visual Classification", arXiv:1909.06335.

    For every class, client proportions ``p ~ Dir(alpha * 1)`` are drawn and that class's
    (shuffled) samples are cut in those proportions. Small ``alpha`` gives each client few
    classes; large ``alpha`` approaches an IID label mix. The whole draw is repeated until
    every client has at least ``min_size`` samples; after ``max_tries`` draws a
    ``ValueError`` is raised (raise ``alpha``, lower ``min_size`` or use fewer clients).
    """

    alpha: float
    min_size: int = 1
    max_tries: int = 1000

    def __post_init__(self) -> None:
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, (int, float, np.floating, np.integer))
            or not math.isfinite(self.alpha)
            or self.alpha <= 0
        ):
            raise ConfigError("alpha", self.alpha, "a finite number > 0")
        if (
            isinstance(self.min_size, bool)
            or not isinstance(self.min_size, int)
            or (self.min_size < 0)
        ):
            raise ConfigError("min_size", self.min_size, "an integer >= 0")
        if (
            isinstance(self.max_tries, bool)
            or not isinstance(self.max_tries, int)
            or (self.max_tries < 1)
        ):
            raise ConfigError("max_tries", self.max_tries, "an integer >= 1")

    def split(
        self, labels: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        y = _as_labels(labels)
        k = _check_num_clients(num_clients)
        _check_enough_samples(len(y), k, self.min_size)
        by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
        concentration = np.full(k, float(self.alpha))
        for _ in range(self.max_tries):
            buckets: list[list[np.ndarray]] = [[] for _ in range(k)]
            for idx in by_class:
                shuffled = rng.permutation(idx)
                p = rng.dirichlet(concentration)
                cuts = np.minimum(
                    (np.cumsum(p)[:-1] * len(shuffled)).astype(np.int64), len(shuffled)
                )
                for bucket, piece in zip(buckets, np.split(shuffled, cuts), strict=True):
                    bucket.append(piece)
            parts = [np.concatenate(b) for b in buckets]
            if min(len(p) for p in parts) >= self.min_size:
                return _finish(parts)
        raise PartitionError(
            f"Dirichlet(alpha={self.alpha}) could not give all {k} clients at least "
            f"min_size={self.min_size} samples in {self.max_tries} draws; raise alpha, "
            "lower min_size or use fewer clients"
        )


@dataclass(frozen=True)
class Shards:
    """Pathological non-IID split of McMahan et al. (2017), "Communication-Efficient Learning
    of Deep Networks from Decentralized Data", AISTATS.

    Samples are sorted by label (ties in random order), cut into
    ``num_clients * shards_per_client`` contiguous shards of near-equal size, and each client
    receives ``shards_per_client`` shards at random. With balanced classes whose size is a
    multiple of the shard size, each client sees at most ``shards_per_client`` labels.
    """

    shards_per_client: int = 2

    def __post_init__(self) -> None:
        s = self.shards_per_client
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ConfigError("shards_per_client", s, "an integer >= 1")

    def split(
        self, labels: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        y = _as_labels(labels)
        k = _check_num_clients(num_clients)
        num_shards = k * self.shards_per_client
        if len(y) < num_shards:
            raise PartitionError(
                f"cannot cut {len(y)} samples into {num_shards} shards "
                f"({k} clients x shards_per_client={self.shards_per_client})"
            )
        # Shuffle before the stable sort so which samples of a class land in which shard
        # depends on the seed, not on the input order.
        perm = rng.permutation(len(y))
        by_label = perm[np.argsort(y[perm], kind="stable")]
        shards = np.array_split(by_label, num_shards)
        owner = rng.permutation(num_shards).reshape(k, self.shards_per_client)
        return _finish([np.concatenate([shards[s] for s in row]) for row in owner])


@dataclass(frozen=True, eq=False)
class NaturalIds:
    """Natural split: one client per distinct value of ``ids`` (a hospital, a speaker, ...).

    ``ids[i]`` names the owner of sample ``i``. Clients are ordered by sorted id and are
    named ``str(id)`` by :func:`partition`. ``num_clients`` must equal the number of
    distinct ids, or be ``None`` to use that count. The split ignores ``rng``.
    """

    ids: np.ndarray

    def __post_init__(self) -> None:
        arr = np.asarray(self.ids)
        if arr.ndim != 1 or arr.size == 0:
            raise ConfigError("ids", f"array of shape {arr.shape}", "a non-empty 1-D array")
        # Frozen dataclass: store the normalized array through object.__setattr__.
        object.__setattr__(self, "ids", arr)

    def unique_ids(self) -> np.ndarray:
        """The distinct ids in client order (sorted)."""
        return np.unique(self.ids)

    def client_names(self) -> list[str]:
        """Client ids used by :func:`partition`: ``str`` of each distinct id, sorted by id."""
        return [str(u) for u in self.unique_ids()]

    def split(
        self, labels: np.ndarray, num_clients: int | None, rng: np.random.Generator
    ) -> list[np.ndarray]:
        y = _as_labels(labels)
        if len(y) != len(self.ids):
            raise ValueError(f"NaturalIds has {len(self.ids)} ids but there are {len(y)} labels")
        uniq, owner = np.unique(self.ids, return_inverse=True)
        if num_clients is not None and _check_num_clients(num_clients) != len(uniq):
            raise ConfigError(
                "num_clients", num_clients, f"None or {len(uniq)} (the number of distinct ids)"
            )
        order = np.argsort(owner, kind="stable")
        bounds = np.cumsum(np.bincount(owner, minlength=len(uniq)))[:-1]
        return _finish(np.split(order, bounds))


def _client_names(count: int, prefix: str) -> list[str]:
    width = len(str(count))
    return [f"{prefix}{i:0{width}d}" for i in range(count)]


def _check_partition(parts: list[np.ndarray], n: int, expected: int) -> None:
    if len(parts) != expected:
        raise ValueError(f"partitioner returned {len(parts)} parts for {expected} clients")
    counts = np.zeros(n, dtype=np.int64)
    for p in parts:
        if p.size and (int(p.min()) < 0 or int(p.max()) >= n):
            raise ValueError(f"partitioner returned indices outside [0, {n})")
        np.add.at(counts, p, 1)
    if np.any(counts > 1):
        raise ValueError("partitioner returned overlapping index sets")


def partition(
    train: ArrayDataset,
    partitioner: Partitioner,
    clients: int | None,
    seed: int,
    *,
    test: ArrayDataset,
    name: str = "dataset",
    num_classes: int | None = None,
    client_test_fraction: float = 0.0,
) -> FederatedDataset:
    """Split ``train`` across ``clients`` simulated clients.

    Clients are named ``client_0 .. client_{K-1}`` zero-padded to the number of digits of
    ``K`` (``client_00`` .. ``client_29`` for 30), or ``str(id)`` for :class:`NaturalIds`
    (where ``clients`` may be ``None``). ``test`` is the global test set. ``num_classes``
    defaults to ``max label + 1`` over train and test. With ``client_test_fraction > 0`` each
    client's share is further split at random into a local train and test set (at least one
    sample stays in train). The same ``seed`` gives the same result; the local test split
    uses its own stream, so changing ``client_test_fraction`` does not change which samples
    each client owns.
    """
    if len(train) == 0:
        raise ValueError("cannot partition an empty train set")
    if not (0.0 <= client_test_fraction < 1.0):
        raise ConfigError("client_test_fraction", client_test_fraction, "a number in [0, 1)")
    if clients is None and not isinstance(partitioner, NaturalIds):
        raise ConfigError("clients", clients, "an integer >= 1 (None only with NaturalIds)")
    _check_labels(train.y, "training")
    if len(test):
        _check_labels(test.y, "test")
    if clients is not None and not isinstance(partitioner, NaturalIds):
        count = _check_num_clients(clients)
        if count > len(train):
            # Said in the experiment file's terms: this is the mistake a user makes there.
            raise PartitionError(f"[partition] clients = {count} but the data set has "
                                 f"{len(train)} training samples: at most {len(train)} clients")
    if num_classes is None:
        num_classes = int(max(train.y.max(), test.y.max() if len(test) else 0)) + 1
    split_seq, local_seq = np.random.SeedSequence(seed).spawn(2)
    split_rng = np.random.default_rng(split_seq)
    if isinstance(partitioner, NaturalIds):
        parts = partitioner.split(train.y, clients, split_rng)
        ids = partitioner.client_names()
    else:
        count = _check_num_clients(clients)
        parts = partitioner.split(train.y, count, split_rng)
        ids = _client_names(count, "client_")
    # Third-party partitioners may return lists; normalize before checking them.
    parts = [np.asarray(p).astype(np.int64, copy=False) for p in parts]
    _check_partition(parts, len(train), len(ids))
    for cid, p in zip(ids, parts, strict=True):
        if len(p) == 0:
            raise ValueError(f"partitioner gave client '{cid}' no samples")

    local_rng = np.random.default_rng(local_seq)
    members: list[ClientData] = []
    for cid, idx in zip(ids, parts, strict=True):
        if client_test_fraction > 0:
            shuffled = local_rng.permutation(idx)
            n_test = min(round(client_test_fraction * len(idx)), len(idx) - 1)
            members.append(
                ClientData(
                    cid,
                    train.subset(np.sort(shuffled[n_test:])),
                    test=train.subset(np.sort(shuffled[:n_test])),
                )
            )
        else:
            members.append(ClientData(cid, train.subset(idx)))
    return FederatedDataset(
        name=name,
        clients=members,
        test=test,
        num_classes=num_classes,
        feature_shape=train.feature_shape,
    )
