"""Client sources and LazyFederation (fedmosaic.data.source): data loaded client by client,
where it trains, in bounded memory."""

from __future__ import annotations

import pickle
import textwrap

import numpy as np
import pytest

from fedmosaic.core.errors import FedmosaicError
from fedmosaic.data import ArrayDataset, ClientData
from fedmosaic.data.source import FileSource, LazyFederation, LoaderSource, check_source


def _files(tmp_path, sizes):
    paths = {}
    for i, n in enumerate(sizes):
        rng = np.random.default_rng(i)
        path = tmp_path / f"c{i}.npz"
        np.savez(path, x=rng.random((n, 4), dtype=np.float32), y=rng.integers(0, 3, n))
        paths[f"c{i}"] = str(path)
    return paths


def test_file_source_loads_one_client_and_is_picklable(tmp_path):
    src = FileSource(_files(tmp_path, [5, 7, 9]))
    again = pickle.loads(pickle.dumps(src))
    c = again.load("c1")
    assert isinstance(c, ClientData) and c.client_id == "c1" and len(c.train) == 7
    assert again.client_ids == ["c0", "c1", "c2"]
    with pytest.raises(KeyError, match="unknown client 'nope'"):
        src.load("nope")
    split = FileSource(_files(tmp_path, [10]), test_fraction=0.2, seed=3).load("c0")
    assert (len(split.train), len(split.test)) == (8, 2)


def test_loader_source_imports_the_users_function_where_it_loads(tmp_path):
    (tmp_path / "mytask.py").write_text(textwrap.dedent("""
        import numpy as np
        from fedmosaic.data import ArrayDataset
        CALLS = []
        def load_data(client_id):
            CALLS.append(client_id)
            n = int(client_id.split("_")[1]) + 1
            return ArrayDataset(np.ones((n, 2), np.float32), np.zeros(n, np.int64))
    """))
    src = LoaderSource("mytask:load_data", ("c_0", "c_3"), base_dir=str(tmp_path))
    src = pickle.loads(pickle.dumps(src))
    assert len(src.load("c_3").train) == 4 and len(src.load("c_0").train) == 1
    with pytest.raises(KeyError):
        src.load("c_9")
    import mytask  # the loader was imported once, by its spec

    assert mytask.CALLS == ["c_3", "c_0"]


class _Counting:
    """A source of n clients of 100 float32 features x 10 samples (4,080 bytes each)."""

    def __init__(self, n: int) -> None:
        self.ids = [f"k{i}" for i in range(n)]
        self.calls: list[str] = []

    @property
    def client_ids(self) -> list[str]:
        return list(self.ids)

    def load(self, client_id: str) -> ClientData:
        self.calls.append(client_id)
        i = int(client_id[1:])
        x = np.full((10, 100), i, np.float32)
        return ClientData(client_id, ArrayDataset(x, np.zeros(10, np.int64)))


def test_lazy_federation_loads_on_demand_and_keeps_a_bounded_cache():
    src = _Counting(1000)
    one = 10 * 100 * 4 + 10 * 8
    fed = LazyFederation(src, cache_bytes=3 * one)
    assert fed.client_ids == src.ids and src.calls == []  # nothing loaded up front
    for cid in ["k1", "k2", "k1", "k3", "k4", "k1"]:
        assert float(fed.client(cid).train.x[0, 0]) == int(cid[1:])
    # k1 stays cached (recently used); k2 is evicted when k4 arrives.
    assert src.calls == ["k1", "k2", "k3", "k4"]
    assert fed.cached_bytes <= 3 * one and fed.loaded == {"k1": 1, "k2": 1, "k3": 1, "k4": 1}
    fed.client("k2")
    assert fed.loaded["k2"] == 2 and fed.sizes()["k2"] == 10
    for i in range(500):  # memory stays flat however many clients pass through
        fed.client(f"k{i}")
    assert fed.cached_bytes <= 3 * one
    with pytest.raises(KeyError, match="unknown client"):
        fed.client("zzz")


def test_lazy_federation_refuses_what_a_source_gets_wrong():
    class Wrong(_Counting):
        def load(self, client_id: str) -> ClientData:
            if client_id == "k0":
                return ClientData("k1", ArrayDataset(np.ones((1, 1), np.float32),
                                                     np.zeros(1, np.int64)))
            return ClientData(client_id, ArrayDataset(np.ones((0, 1), np.float32),
                                                      np.zeros(0, np.int64)))

    fed = LazyFederation(Wrong(2))
    with pytest.raises(FedmosaicError, match="loaded client 'k1' for 'k0'"):
        fed.client("k0")
    with pytest.raises(FedmosaicError, match="empty train set"):
        fed.client("k1")


def test_check_source_names_the_problem():
    with pytest.raises(FedmosaicError, match="not a client source"):
        check_source(object())
    dup = _Counting(2)
    dup.ids = ["a", "a"]
    with pytest.raises(FedmosaicError, match="twice"):
        check_source(dup)
    empty = _Counting(0)
    with pytest.raises(FedmosaicError, match="no clients"):
        check_source(empty)
    assert check_source(_Counting(3)).client_ids == ["k0", "k1", "k2"]
