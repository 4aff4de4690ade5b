"""In-memory datasets: one array dataset, one client's data, and a whole federation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def _check_labels_in_range(y: np.ndarray, num_classes: int, what: str) -> None:
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"{what}: labels must lie in [0, {num_classes}), got range "
            f"[{int(y.min())}, {int(y.max())}]"
        )


# eq=False: the generated __eq__/__hash__ would compare/hash numpy arrays, which is
# ambiguous or impossible; identity semantics are what callers can rely on.
@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Features ``x`` (float32, shape ``(n, *feature_shape)``) with labels ``y`` (int64, ``(n,)``).

    The constructor only validates; use :meth:`create` to convert dtypes from arbitrary arrays.
    """

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.x, np.ndarray):
            raise ValueError(f"x must be a numpy array, got {type(self.x).__name__}")
        if not isinstance(self.y, np.ndarray):
            raise ValueError(f"y must be a numpy array, got {type(self.y).__name__}")
        if self.x.dtype != np.float32:
            raise ValueError(
                f"x must have dtype float32, got {self.x.dtype} "
                "(use ArrayDataset.create to convert)"
            )
        if self.x.ndim < 2:
            raise ValueError(
                f"x must have shape (n, *feature_shape) with at least one feature axis, "
                f"got shape {self.x.shape}"
            )
        if self.y.ndim != 1:
            raise ValueError(f"y must be 1-D, got shape {self.y.shape}")
        if self.y.dtype != np.int64:
            raise ValueError(
                f"y must have dtype int64, got {self.y.dtype} (use ArrayDataset.create to convert)"
            )
        if len(self.x) != len(self.y):
            raise ValueError(
                f"x and y must have the same length, got {len(self.x)} and {len(self.y)}"
            )
        if self.y.size and int(self.y.min()) < 0:
            raise ValueError(f"labels must be non-negative, got minimum {int(self.y.min())}")

    @classmethod
    def create(cls, x: Any, y: Any) -> ArrayDataset:
        """Build a dataset from array-likes, converting ``x`` to float32 and ``y`` to int64.

        Float labels are accepted only when every value is a whole number, so that a
        regression target or a probability vector is not silently truncated.
        """
        x_arr = np.asarray(x, dtype=np.float32)
        y_arr = np.asarray(y)
        if y_arr.dtype.kind == "f":
            if not np.all(np.isfinite(y_arr)) or not np.all(y_arr == np.round(y_arr)):
                raise ValueError("y has non-integer float values; labels must be class indices")
        elif y_arr.dtype.kind not in "iub":
            raise ValueError(f"y must hold integer class labels, got dtype {y_arr.dtype}")
        return cls(x_arr, y_arr.astype(np.int64, copy=False))

    def __len__(self) -> int:
        return len(self.y)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one sample's features."""
        return tuple(self.x.shape[1:])

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        """Rows selected by an integer index array (or a boolean mask of length ``len(self)``)."""
        idx = np.asarray(indices)
        if idx.dtype.kind == "b":
            if idx.shape != (len(self),):
                raise ValueError(f"boolean mask must have shape ({len(self)},), got {idx.shape}")
        elif idx.dtype.kind not in "iu":
            if idx.size:
                raise ValueError(f"indices must be integers, got dtype {idx.dtype}")
            idx = idx.astype(np.int64)  # np.array([]) is float64 but selects nothing
        if idx.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
        return ArrayDataset(self.x[idx], self.y[idx])

    def label_histogram(self, num_classes: int) -> np.ndarray:
        """Number of samples of each class, int64 of shape ``(num_classes,)``."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        _check_labels_in_range(self.y, num_classes, "label_histogram")
        return np.bincount(self.y, minlength=num_classes).astype(np.int64)

    @staticmethod
    def concat(parts: Sequence[ArrayDataset]) -> ArrayDataset:
        """Concatenate datasets with the same feature shape, in order."""
        if len(parts) == 0:
            raise ValueError("concat needs at least one dataset")
        shapes = {p.feature_shape for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"cannot concat datasets with different feature shapes: {shapes}")
        return ArrayDataset(
            np.concatenate([p.x for p in parts], axis=0),
            np.concatenate([p.y for p in parts], axis=0),
        )


@dataclass
class ClientData:
    """One client's local data: a train set and an optional local test set."""

    client_id: str
    train: ArrayDataset
    test: ArrayDataset | None = None


@dataclass
class FederatedDataset:
    """A dataset split across clients, plus an optional global (server-side) test set.

    ``test`` None: no central test set (the server holds no data; the model is judged by the
    clients' federated evaluation on their local test splits, ``ClientData.test``).
    """

    name: str
    clients: list[ClientData]
    test: ArrayDataset | None
    num_classes: int
    feature_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        self.feature_shape = tuple(int(d) for d in self.feature_shape)
        if not self.clients:
            raise ValueError(f"federated dataset '{self.name}' needs at least one client")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        seen: set[str] = set()
        for c in self.clients:
            if c.client_id in seen:
                raise ValueError(f"duplicate client id '{c.client_id}'")
            seen.add(c.client_id)
            if len(c.train) == 0:
                raise ValueError(f"client '{c.client_id}' has an empty train set")
            sets = [("train", c.train)] + ([("test", c.test)] if c.test is not None else [])
            for split, ds in sets:
                self._check_part(ds, f"client '{c.client_id}' {split} set")
        if self.test is not None:
            self._check_part(self.test, "global test set")

    def _check_part(self, ds: ArrayDataset, what: str) -> None:
        if ds.feature_shape != self.feature_shape:
            raise ValueError(
                f"{what} has feature shape {ds.feature_shape}, expected {self.feature_shape}"
            )
        _check_labels_in_range(ds.y, self.num_classes, what)

    def client(self, client_id: str) -> ClientData:
        """The client with this id; ``KeyError`` naming the known ids if there is none."""
        # O(1) through an id -> position index, checked on every hit and rebuilt when the
        # caller has edited ``clients`` since (a linear scan made whole rounds O(N^2)).
        index: dict[str, int] | None = self.__dict__.get("_index")
        pos = index.get(client_id) if index is not None else None
        if pos is None or pos >= len(self.clients) or self.clients[pos].client_id != client_id:
            index = {c.client_id: i for i, c in enumerate(self.clients)}
            self.__dict__["_index"] = index
            pos = index.get(client_id)
        if pos is not None:
            return self.clients[pos]
        known = ", ".join(self.client_ids[:10]) + (", ..." if len(self.clients) > 10 else "")
        raise KeyError(f"no client '{client_id}' in dataset '{self.name}' (clients: {known})")

    @property
    def client_ids(self) -> list[str]:
        """Client ids in client order."""
        return [c.client_id for c in self.clients]

    def sizes(self) -> dict[str, int]:
        """Number of train samples per client."""
        return {c.client_id: len(c.train) for c in self.clients}

    def label_histograms(self) -> np.ndarray:
        """Train label counts, int64 of shape ``(num_clients, num_classes)``."""
        return np.stack([c.train.label_histogram(self.num_classes) for c in self.clients])

    def summary(self) -> list[dict[str, object]]:
        """Per client: ``id``, ``train`` and ``test`` sizes, train label ``histogram`` (list)."""
        return [
            {
                "id": c.client_id,
                "train": len(c.train),
                "test": 0 if c.test is None else len(c.test),
                "histogram": c.train.label_histogram(self.num_classes).tolist(),
            }
            for c in self.clients
        ]

    def pooled_train(self) -> ArrayDataset:
        """All clients' train data in client order (for a centralized baseline)."""
        return ArrayDataset.concat([c.train for c in self.clients])
