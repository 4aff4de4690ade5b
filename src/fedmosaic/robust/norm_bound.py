"""Norm bounding (Sun, Kairouz, Suresh and McMahan 2019, "Can You Really Backdoor Federated
Learning?", arXiv:1911.07963).

Every update is scaled down to L2 norm at most ``max_norm`` before the weighted mean, which
bounds how far any one client (a model-replacement attacker's boosted update included) can
move the model; Sun et al. add optional weak Gaussian noise to the aggregate
(``noise_std``; this alone is *not* a differential-privacy guarantee: no accountant backs
it). Under central DP (``DPFedAvg``) the rule is exactly the DP-FedAvg clip at
``min(clip, max_norm)``, and the DP noise replaces the weak noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedmosaic.algorithms.aggregate import weighted_sum
from fedmosaic.robust.base import (
    RobustAggregator,
    RobustPreconditionError,
    RobustResult,
    finite_positive,
)

SOURCE = "Sun et al. 2019"


class NormBound(RobustAggregator):
    """Clip each update to ``max_norm``, take the weighted mean, add ``N(0, noise_std^2)``
    per coordinate if asked. Without noise the output's norm is at most ``max_norm`` (a
    convex combination of vectors in that ball). The noise is drawn from a generator seeded
    by ``(seed, round)``, so simulations are reproducible. Shares are the normalised weights:
    every client contributes, bounded. Needs no assumption on ``f`` (``n >= 1``)."""

    name = "norm_bound"

    def __init__(self, max_norm: float, noise_std: float = 0.0, seed: int = 0) -> None:
        super().__init__(0)
        self.max_norm = finite_positive("max_norm", max_norm)
        if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or \
                not noise_std >= 0 or noise_std == float("inf"):
            raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
        self.noise_std = float(noise_std)
        self.seed = int(seed)
        self.round = 0

    def check(self, n: int) -> None:
        if not n >= 1:
            raise RobustPreconditionError(self.name, n, self.f, "n >= 1", SOURCE)

    def begin_round(self, round_num: int, global_weights: torch.Tensor) -> None:
        self.round = int(round_num)

    def _aggregate(self, deltas: torch.Tensor, weights: torch.Tensor,
                   client_ids: Sequence[str]) -> RobustResult:
        norms = torch.linalg.vector_norm(deltas, dim=1).to(torch.float64)
        scale = torch.where(norms > self.max_norm, self.max_norm / norms.clamp(min=1e-300),
                            torch.ones_like(norms))
        w = weights / weights.sum()
        # Scaling the weights instead of the rows: one pass over the matrix, no copy.
        delta = weighted_sum(deltas, w * scale)
        metrics = {"robust_clipped": float((norms > self.max_norm).sum())}
        if self.noise_std > 0:
            seed = int(np.random.SeedSequence([self.seed, self.round, 0x5B]).generate_state(1)[0])
            gen = torch.Generator().manual_seed(seed)
            noise = torch.randn(delta.shape, generator=gen, dtype=torch.float32)
            delta = delta + (noise * self.noise_std).to(delta.device)
        return RobustResult(delta, w, metrics)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "max_norm": self.max_norm, "noise_std": self.noise_std}
