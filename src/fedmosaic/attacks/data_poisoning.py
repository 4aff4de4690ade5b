"""Data poisoning: malicious clients train honestly, on altered data."""

from __future__ import annotations

import zlib
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from fedmosaic.attacks.base import Attack, check_label, check_label_in_range
from fedmosaic.core.errors import ConfigError
from fedmosaic.data.dataset import ArrayDataset, ClientData, FederatedDataset


@dataclass(frozen=True)
class LabelFlip(Attack):
    """Label flipping (Tolpegin et al. 2020, "Data Poisoning Attacks Against Federated
    Learning Systems"; Fang et al. 2020 use the all-class form).

    Without ``source``/``target`` every label ``l`` becomes ``C - 1 - l`` (``C`` classes);
    with both, only samples of class ``source`` are relabelled ``target`` (the targeted form).
    The features are untouched and the client then trains and uploads honestly.
    """

    source: int | None = None
    target: int | None = None

    name = "label_flip"
    poisons_data = True

    def __post_init__(self) -> None:
        if (self.source is None) != (self.target is None):
            raise ConfigError("source" if self.source is None else "target", None,
                              "both source and target, or neither (flip every class)")
        if self.source is not None:
            check_label("source", self.source)
            check_label("target", self.target)
            if self.source == self.target:
                raise ConfigError("target", self.target, "a class other than source")

    def poison_data(self, train: ArrayDataset, num_classes: int,
                    rng: np.random.Generator) -> ArrayDataset:
        if self.source is None or self.target is None:
            return ArrayDataset(train.x, (num_classes - 1 - train.y).astype(np.int64))
        check_label_in_range("source", self.source, num_classes)
        check_label_in_range("target", self.target, num_classes)
        y = train.y.copy()
        y[y == self.source] = self.target
        # Features are shared, not copied: only the labels change.
        return ArrayDataset(train.x, y)


def poison_seed(seed: int, client_id: str) -> np.random.Generator:
    """The generator a malicious client's data poisoning draws from (stable across runs)."""
    return np.random.default_rng([seed, zlib.crc32(client_id.encode())])


def poison_federation(fed: FederatedDataset, attack: Attack, malicious: Collection[str],
                      seed: int = 0) -> FederatedDataset:
    """``fed`` with the malicious clients' training data replaced by ``attack.poison_data``.

    Honest clients keep their ``ClientData`` objects (shared, not copied); the global test
    set is the same object, so evaluation stays clean. With an attack that does not poison
    data, ``fed`` itself is returned.
    """
    known = set(fed.client_ids)
    unknown = sorted(set(malicious) - known)
    if unknown:
        raise ConfigError("malicious", unknown[:5], f"ids of clients in '{fed.name}'")
    if not attack.poisons_data or not malicious:
        return fed
    bad = set(malicious)
    clients = [
        ClientData(c.client_id,
                   attack.poison_data(c.train, fed.num_classes, poison_seed(seed, c.client_id)),
                   c.test)
        if c.client_id in bad else c
        for c in fed.clients
    ]
    return FederatedDataset(name=fed.name, clients=clients, test=fed.test,
                            num_classes=fed.num_classes, feature_shape=fed.feature_shape)
