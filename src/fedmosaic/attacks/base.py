"""What every simulated attack is: an optional change to a malicious client's training data
and an optional change to the update it uploads, plus what it may know about the round."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch

from fedmosaic.core.errors import ConfigError
from fedmosaic.data.dataset import ArrayDataset


@dataclass(frozen=True)
class RoundView:
    """What the malicious clients know when they craft their uploads in one round.

    ``n`` is the number of clients selected this round and ``m`` how many of them are
    malicious. For omniscient attacks (``Attack.omniscient``) ``benign_mean`` and
    ``benign_std`` are the per-coordinate mean and sample standard deviation of the round's
    valid benign updates (``benign_count`` of them); otherwise they are ``None``.
    ``generator`` is seeded from the malicious client's round seed, so a crafted update is
    reproducible.
    """

    round: int
    n: int
    m: int
    generator: torch.Generator
    benign_count: int = 0
    benign_mean: torch.Tensor | None = None
    benign_std: torch.Tensor | None = None


class Attack:
    """A simulated Byzantine behaviour, for evaluating defences (never for deployment).

    Subclasses set ``name`` and at least one of ``poisons_data`` (override
    :meth:`poison_data`: a malicious client trains on altered data) and ``poisons_updates``
    (override :meth:`craft_update`: a malicious client uploads something other than its
    honest update). ``omniscient`` attacks also see the round's benign updates, summarised
    in a :class:`RoundView`; ``min_benign`` is how many they need.
    """

    name: ClassVar[str] = "attack"
    poisons_data: ClassVar[bool] = False
    poisons_updates: ClassVar[bool] = False
    omniscient: ClassVar[bool] = False
    min_benign: ClassVar[int] = 0

    def poison_data(self, train: ArrayDataset, num_classes: int,
                    rng: np.random.Generator) -> ArrayDataset:
        """The training data a malicious client uses instead of ``train``."""
        return train

    def craft_update(self, delta: torch.Tensor, view: RoundView) -> torch.Tensor:
        """The delta a malicious client uploads instead of its trained ``delta``."""
        return delta

    def describe(self) -> dict[str, Any]:
        """Name and parameters, for run reports."""
        params = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        return {"name": self.name, **params}


class BenignStats:
    """Running per-coordinate mean and variance of benign deltas (Welford's algorithm).

    O(D) memory whatever the cohort size, so the server path never has to hold a round's
    updates for an omniscient attack; float64 keeps the variance accurate over many clients.
    """

    def __init__(self, numel: int) -> None:
        self.count = 0
        self.mean = torch.zeros(numel, dtype=torch.float64)
        self._m2 = torch.zeros(numel, dtype=torch.float64)

    def add(self, delta: torch.Tensor) -> None:
        x = delta.detach().to(device="cpu", dtype=torch.float64)
        self.count += 1
        diff = x - self.mean
        self.mean += diff / self.count
        self._m2 += diff * (x - self.mean)

    def std(self) -> torch.Tensor:
        """Sample standard deviation (divisor ``count - 1``); needs two or more deltas."""
        if self.count < 2:
            raise ValueError(f"a standard deviation needs at least 2 deltas, got {self.count}")
        return (self._m2 / (self.count - 1)).sqrt()


def check_positive(key: str, value: Any) -> None:
    """``ConfigError`` unless ``value`` is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or value <= 0:
        raise ConfigError(key, value, "a finite number > 0")


def check_label(key: str, value: Any) -> None:
    """``ConfigError`` unless ``value`` is a class index (an integer >= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(key, value, "a class index (an integer >= 0)")


def check_label_in_range(key: str, value: int, num_classes: int) -> None:
    if value >= num_classes:
        raise ConfigError(key, value, f"a class index below the data set's {num_classes} classes")
