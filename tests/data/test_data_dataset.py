"""ArrayDataset, ClientData and FederatedDataset: validation and accessors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedmosaic.data import ArrayDataset, ClientData, FederatedDataset


def make(n: int, labels: list[int] | None = None, features: int = 3) -> ArrayDataset:
    x = np.arange(n * features, dtype=np.float32).reshape(n, features)
    y = np.asarray(labels if labels is not None else [i % 3 for i in range(n)], dtype=np.int64)
    return ArrayDataset(x, y)


class TestArrayDataset:
    def test_valid_dataset_and_len(self) -> None:
        ds = make(5)
        assert len(ds) == 5
        assert ds.feature_shape == (3,)

    @pytest.mark.parametrize(
        ("x", "y", "message"),
        [
            (np.zeros((3, 2), np.float64), np.zeros(3, np.int64), "float32"),
            (np.zeros((3, 2), np.float32), np.zeros(3, np.int32), "int64"),
            (np.zeros((3, 2), np.float32), np.zeros(4, np.int64), "same length"),
            (np.zeros((3, 2), np.float32), np.zeros((3, 1), np.int64), "1-D"),
            (np.zeros(3, np.float32), np.zeros(3, np.int64), "feature axis"),
            (np.zeros((2, 2), np.float32), np.array([0, -1], np.int64), "non-negative"),
            ([[0.0], [1.0]], np.zeros(2, np.int64), "numpy array"),
        ],
    )
    def test_constructor_rejects_bad_arrays(self, x: object, y: object, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            ArrayDataset(x, y)  # type: ignore[arg-type]

    def test_create_converts_dtypes(self) -> None:
        ds = ArrayDataset.create([[1, 2], [3, 4]], np.array([1.0, 0.0]))
        assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
        np.testing.assert_array_equal(ds.y, [1, 0])
        assert ArrayDataset.create(np.ones((2, 1)), np.array([True, False])).y.tolist() == [1, 0]

    def test_create_rejects_fractional_or_non_numeric_labels(self) -> None:
        with pytest.raises(ValueError, match="non-integer"):
            ArrayDataset.create(np.ones((2, 1)), [0.5, 1.0])
        with pytest.raises(ValueError, match="integer class labels"):
            ArrayDataset.create(np.ones((2, 1)), ["a", "b"])

    def test_frozen(self) -> None:
        ds = make(2)
        with pytest.raises(dataclasses.FrozenInstanceError):
            ds.x = np.zeros((2, 3), np.float32)  # type: ignore[misc]

    def test_subset_by_indices_mask_and_empty(self) -> None:
        ds = make(6)
        sub = ds.subset(np.array([4, 1]))
        np.testing.assert_array_equal(sub.x, ds.x[[4, 1]])
        np.testing.assert_array_equal(sub.y, ds.y[[4, 1]])
        mask = ds.y == 0
        assert len(ds.subset(mask)) == int(mask.sum())
        empty = ds.subset(np.array([]))
        assert len(empty) == 0 and empty.feature_shape == (3,)
        with pytest.raises(ValueError, match="boolean mask"):
            ds.subset(np.array([True, False]))
        with pytest.raises(ValueError, match="integers"):
            ds.subset(np.array([0.5]))

    def test_label_histogram(self) -> None:
        ds = make(5, labels=[0, 2, 2, 4, 2])
        hist = ds.label_histogram(6)
        assert hist.dtype == np.int64
        assert hist.tolist() == [1, 0, 3, 0, 1, 0]
        with pytest.raises(ValueError, match=r"\[0, 4\)"):
            ds.label_histogram(4)

    def test_concat(self) -> None:
        a, b = make(2, [0, 1]), make(3, [2, 2, 0])
        both = ArrayDataset.concat([a, b])
        assert len(both) == 5
        np.testing.assert_array_equal(both.y, [0, 1, 2, 2, 0])
        np.testing.assert_array_equal(both.x[2:], b.x)
        with pytest.raises(ValueError, match="at least one"):
            ArrayDataset.concat([])
        with pytest.raises(ValueError, match="feature shapes"):
            ArrayDataset.concat([a, make(2, features=4)])


def federation(**overrides: object) -> FederatedDataset:
    kwargs: dict[str, object] = {
        "name": "toy",
        "clients": [
            ClientData("a", make(4, [0, 1, 1, 2]), test=make(1, [2])),
            ClientData("b", make(2, [2, 2])),
        ],
        "test": make(3, [0, 1, 2]),
        "num_classes": 3,
        "feature_shape": (3,),
    }
    kwargs.update(overrides)
    return FederatedDataset(**kwargs)  # type: ignore[arg-type]


class TestFederatedDataset:
    def test_accessors(self) -> None:
        fd = federation()
        assert fd.client_ids == ["a", "b"]
        assert fd.client("b").client_id == "b"
        assert fd.sizes() == {"a": 4, "b": 2}
        hist = fd.label_histograms()
        assert hist.shape == (2, 3)
        assert hist.tolist() == [[1, 2, 1], [0, 0, 2]]
        assert fd.summary() == [
            {"id": "a", "train": 4, "test": 1, "histogram": [1, 2, 1]},
            {"id": "b", "train": 2, "test": 0, "histogram": [0, 0, 2]},
        ]
        pooled = fd.pooled_train()
        assert len(pooled) == 6
        np.testing.assert_array_equal(pooled.y, [0, 1, 1, 2, 2, 2])

    def test_unknown_client_is_a_clear_key_error(self) -> None:
        with pytest.raises(KeyError, match=r"no client 'zz'.*clients: a, b"):
            federation().client("zz")

    def test_feature_shape_list_is_normalized_to_tuple(self) -> None:
        assert federation(feature_shape=[3]).feature_shape == (3,)

    @pytest.mark.parametrize(
        ("overrides", "message"),
        [
            ({"clients": []}, "at least one client"),
            (
                {"clients": [ClientData("a", make(2)), ClientData("a", make(2))]},
                "duplicate client id 'a'",
            ),
            (
                {"clients": [ClientData("a", make(2)), ClientData("empty", make(0))]},
                "client 'empty' has an empty train set",
            ),
            ({"feature_shape": (4,)}, "feature shape"),
            ({"num_classes": 2}, r"labels must lie in \[0, 2\)"),
            ({"num_classes": 0}, "num_classes"),
            (
                {"clients": [ClientData("a", make(2), test=make(2, features=5))]},
                "client 'a' test set has feature shape",
            ),
        ],
    )
    def test_validation(self, overrides: dict[str, object], message: str) -> None:
        with pytest.raises(ValueError, match=message):
            federation(**overrides)


def test_client_lookup_follows_edits_to_the_client_list():
    def cd(cid: str, n: int) -> ClientData:
        return ClientData(cid, ArrayDataset(np.zeros((n, 2), np.float32), np.zeros(n, np.int64)))

    fed = FederatedDataset(name="f", clients=[cd("a", 1), cd("b", 2)],
                           test=ArrayDataset(np.zeros((1, 2), np.float32), np.zeros(1, np.int64)),
                           num_classes=1, feature_shape=(2,))
    assert len(fed.client("b").train) == 2
    fed.clients.reverse()
    assert len(fed.client("b").train) == 2 and len(fed.client("a").train) == 1
    fed.clients.append(cd("c", 3))
    assert len(fed.client("c").train) == 3
    fed.clients[0] = cd("b", 5)
    assert len(fed.client("b").train) == 5
    fed.clients.pop()
    with pytest.raises(KeyError, match="'c'"):
        fed.client("c")
