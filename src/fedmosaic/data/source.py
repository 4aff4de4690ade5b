"""Client data loaded where it trains: sources of client data, and a federation over one.

A ``FederatedDataset`` holds every client's arrays in one process. On a cluster that is the
wrong place: the driver would load the whole population and ship it to every node. A
*client source* is the recipe instead -- the client ids and how to load one client -- small
enough to send to every worker, which then loads only the clients it trains (what Flower's
``client_fn`` and pfl-research's ``make_dataset_fn(user_id)`` do).

* ``LoaderSource``: the user's ``load_data(client_id)`` named by a ``"module:function"``
  spec (issue #10's task module), imported on the worker;
* ``FileSource``: one ``.npz`` / ``.csv`` / ``.parquet`` file per client under a path every
  node can read;
* ``LazyFederation``: what a worker trains from: ``client(cid)`` loads through the source
  and keeps the most recently used clients in a cache bounded in bytes, so a worker's
  memory stays flat in the population; it records what it loaded (``loaded``).

A source must be picklable (it travels to the workers) and deterministic: a client's data
is the same wherever and however often it is loaded.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from fedmosaic.core.errors import FedmosaicError
from fedmosaic.data.dataset import ArrayDataset, ClientData

# The loaders a process has imported, by (spec, base_dir).
_LOADERS: dict[tuple[str, str], Any] = {}

__all__ = ["ClientSource", "FileSource", "LazyFederation", "LoaderSource", "check_source"]


@runtime_checkable
class ClientSource(Protocol):
    """The client ids of a federation and how to load one client."""

    @property
    def client_ids(self) -> list[str]: ...

    def load(self, client_id: str) -> ClientData: ...


def check_source(source: object) -> ClientSource:
    """``source`` if it is a usable client source (ids unique, non-empty strings), else a
    ``FedmosaicError`` saying what is wrong."""
    if not isinstance(source, ClientSource):
        raise FedmosaicError(f"{type(source).__name__} is not a client source (it needs "
                             "client_ids and load(client_id))")
    ids = source.client_ids
    if not ids:
        raise FedmosaicError("the client source has no clients")
    bad = next((c for c in ids if not isinstance(c, str) or not c), None)
    if bad is not None:
        raise FedmosaicError(f"client id {bad!r} is not a non-empty string")
    if len(set(ids)) != len(ids):
        raise FedmosaicError("the client source lists a client id twice")
    return source


@dataclass(frozen=True)
class LoaderSource:
    """Clients from the user's ``load_data(client_id)``, named ``"module:function"`` (or
    ``"path/file.py:function"``) relative to ``base_dir``, imported where it is loaded.

    ``test_fraction`` holds out that fraction of each client's data as its local test split
    (``fedmosaic.data.files.local_test_split``, seeded by ``seed`` and the client id)."""

    spec: str
    ids: tuple[str, ...]
    base_dir: str = "."
    test_fraction: float | None = None
    seed: int = 0

    @property
    def client_ids(self) -> list[str]:
        return list(self.ids)

    @functools.cached_property
    def _id_set(self) -> frozenset[str]:
        # A membership test on the tuple would scan the population on every load.
        return frozenset(self.ids)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_id_set"}  # rebuilt there

    def load(self, client_id: str) -> ClientData:
        from fedmosaic.data.files import client_from_loader
        from fedmosaic.task import load_object

        _known(self._id_set, client_id)
        key = (self.spec, self.base_dir)
        loader = _LOADERS.get(key)
        if loader is None:  # imported once per process, not once per client
            loader = _LOADERS[key] = load_object(self.spec, Path(self.base_dir))
        return client_from_loader(loader, client_id, test_fraction=self.test_fraction,
                                  seed=self.seed, what=self.spec)


@dataclass(frozen=True)
class FileSource:
    """One data file per client (``{client id: path}``; formats as
    ``fedmosaic.data.files.load_table``: ``.npz`` with ``x`` and ``y``, or ``.csv`` /
    ``.parquet`` with a ``label`` column). Every worker's node must be able to read the
    paths (a shared file system, or the same files on every node)."""

    paths: Mapping[str, str]
    label: str | None = None
    features: tuple[str, ...] | None = None
    test_fraction: float | None = None
    seed: int = 0

    @property
    def client_ids(self) -> list[str]:
        return list(self.paths)

    def load(self, client_id: str) -> ClientData:
        from fedmosaic.data.files import _client, load_table

        _known(self.paths, client_id)
        train = load_table(self.paths[client_id], label=self.label,
                           features=list(self.features) if self.features else None)
        return _client(client_id, train, None, self.test_fraction, self.seed)


def _known(ids: frozenset[str] | Mapping[str, Any], client_id: str) -> None:
    if client_id not in ids:
        raise KeyError(f"unknown client '{client_id}'")


def _nbytes(client: ClientData) -> int:
    parts: list[ArrayDataset] = [client.train] + ([client.test] if client.test else [])
    return sum(int(getattr(p.x, "nbytes", 0)) + int(getattr(p.y, "nbytes", 0)) for p in parts)


@dataclass
class LazyFederation:
    """A federation whose clients are loaded from ``source`` when first asked for.

    It offers what the in-process transports read from a ``FederatedDataset``
    (``client_ids``, ``client(cid)``, ``sizes()`` of the clients loaded so far) and keeps the
    most recently used clients in memory up to ``cache_bytes`` (at least the last one loaded),
    so that memory depends on the clients trained, not on the population. ``loaded`` counts
    the loads per client (a client evicted and trained again is loaded again), and
    ``load_seconds`` is the time spent in the source's ``load``. ``test``: the
    server's own central test set, if any (``fm.simulate`` evaluates on it; the driver of a
    ``RayTransport`` with a source passes a ``LazyFederation`` it never loads clients from).
    """

    source: ClientSource
    cache_bytes: int = 256 * 2**20
    test: ArrayDataset | None = None
    loaded: dict[str, int] = field(default_factory=dict)
    load_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {self.cache_bytes}")
        self._ids = list(self.source.client_ids)
        self._known = set(self._ids)
        self._cache: OrderedDict[str, tuple[ClientData, int]] = OrderedDict()
        self._held = 0
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def client_ids(self) -> list[str]:
        return list(self._ids)

    def client(self, client_id: str) -> ClientData:
        with self._lock:
            hit = self._cache.get(client_id)
            if hit is not None:
                self._cache.move_to_end(client_id)
                return hit[0]
        if client_id not in self._known:
            raise KeyError(f"unknown client '{client_id}'")
        t0 = time.perf_counter()
        data = self.source.load(client_id)
        took = time.perf_counter() - t0
        if data.client_id != client_id:
            raise FedmosaicError(f"the source loaded client '{data.client_id}' for "
                                 f"'{client_id}'")
        if len(data.train) == 0:
            raise FedmosaicError(f"client '{client_id}' has an empty train set")
        size = _nbytes(data)
        with self._lock:
            self.loaded[client_id] = self.loaded.get(client_id, 0) + 1
            self.load_seconds += took
            self._sizes[client_id] = len(data.train)
            self._cache[client_id] = (data, size)
            self._held += size
            while self._held > self.cache_bytes and len(self._cache) > 1:
                _, (_, freed) = self._cache.popitem(last=False)
                self._held -= freed
        return data

    def sizes(self) -> dict[str, int]:
        """Train sample counts of the clients loaded so far."""
        with self._lock:
            return dict(self._sizes)

    @property
    def cached_bytes(self) -> int:
        return self._held
