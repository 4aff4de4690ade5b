"""The Trainer protocol: what a runtime needs from a model to train and evaluate it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from fedmosaic.core.params import ParamSpec


class Dataset(Protocol):
    """Array-backed data (``fedmosaic.data.ArrayDataset`` fits)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class FitConfig:
    """What the server asks one client to do this round.

    ``epochs`` and ``batch_size`` left at None mean the trainer's own settings.
    ``max_steps`` caps the number of local optimizer steps (FedProx-style stragglers do
    fewer); ``proximal_mu`` > 0 adds the FedProx proximal term; ``seed`` makes the client's
    shuffling and any randomness in the model reproducible.
    """

    round: int
    epochs: int | None = None
    batch_size: int | None = None
    max_steps: int | None = None
    lr: float | None = None
    proximal_mu: float = 0.0
    seed: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"FitConfig.epochs must be >= 1, got {self.epochs}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"FitConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"FitConfig.max_steps must be >= 1, got {self.max_steps}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"FitConfig.lr must be > 0, got {self.lr}")
        if self.proximal_mu < 0:
            raise ValueError(f"FitConfig.proximal_mu must be >= 0, got {self.proximal_mu}")


@dataclass
class FitResult:
    """Local training outcome: the new local weights (flat float32) and what it cost."""

    weights: torch.Tensor
    num_samples: int
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Trainer(Protocol):
    """Trains and evaluates one model architecture on flat weight vectors.

    A trainer holds one model instance and reuses it for every client: weights move in and
    out as flat vectors, so no client rebuilds the model or serializes weights.
    """

    @property
    def spec(self) -> ParamSpec: ...

    def initial_weights(self, seed: int) -> torch.Tensor: ...

    def full_steps(self, num_samples: int, config: FitConfig) -> int:
        """Local steps of a complete (non-straggling) fit under ``config``."""
        ...

    def fit(self, weights: torch.Tensor, data: Dataset, config: FitConfig) -> FitResult: ...

    def evaluate(self, weights: torch.Tensor, data: Dataset) -> dict[str, float]: ...


class TrainerWrapper:
    """A trainer that delegates everything to ``inner``; subclasses override what they change
    (e.g. timing or delaying ``fit``) and stay valid ``Trainer``s."""

    def __init__(self, inner: Trainer) -> None:
        self.inner = inner

    @property
    def spec(self) -> ParamSpec:
        return self.inner.spec

    def initial_weights(self, seed: int) -> torch.Tensor:
        return self.inner.initial_weights(seed)

    def full_steps(self, num_samples: int, config: FitConfig) -> int:
        return self.inner.full_steps(num_samples, config)

    def fit(self, weights: torch.Tensor, data: Dataset, config: FitConfig) -> FitResult:
        return self.inner.fit(weights, data, config)

    def evaluate(self, weights: torch.Tensor, data: Dataset) -> dict[str, float]:
        return self.inner.evaluate(weights, data)
