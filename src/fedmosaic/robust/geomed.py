"""Geometric median by smoothed Weiszfeld iterations: RFA (Pillutla, Kakade and Harchaoui
2022, "Robust Aggregation for Federated Learning", IEEE Transactions on Signal Processing).

The geometric median ``argmin_v sum_i a_i ||v - w_i||`` has breakdown point 1/2: it stays
bounded as long as the Byzantine clients hold less than half of the total weight ``a``. Each
smoothed Weiszfeld step is a weighted mean with weights ``a_i / max(nu, ||v - w_i||)``, i.e.
one pass over the stacked ``(n, d)`` matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedmosaic.algorithms.aggregate import weighted_sum
from fedmosaic.robust.base import (
    RobustAggregator,
    RobustPreconditionError,
    RobustResult,
    finite_positive,
)

SOURCE = "Pillutla et al. 2022"


def _distances(deltas: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(deltas - v, dim=1).to(torch.float64)


class GeometricMedian(RobustAggregator):
    """RFA's smoothed Weiszfeld algorithm with the strategy's weights as ``a_i`` (as in the
    paper, where they are sample counts; use ``weighting = "uniform"`` when a client's claimed
    count is not trusted, since the breakdown point is in weight, not in clients).

    Starts from the weighted mean and stops after ``iters`` steps or when the objective
    improves by less than ``tol`` relative. Precondition: ``n > 2f`` (with uniform weights, a
    weight majority is a client majority). A client's share is its final Weiszfeld weight
    ``a_i / max(nu, ||v - w_i||)``, normalised: the output is exactly that weighted mean.
    """

    name = "geomed"

    def __init__(self, f: int = 0, iters: int = 10, nu: float = 1e-6, tol: float = 1e-6) -> None:
        super().__init__(f)
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"iters must be an integer >= 1, got {iters!r}")
        self.iters = iters
        self.nu = finite_positive("nu", nu)
        self.tol = finite_positive("tol", tol)

    def check(self, n: int) -> None:
        if not n > 2 * self.f:
            raise RobustPreconditionError(self.name, n, self.f,
                                          "n > 2f (the Byzantine clients hold less than half "
                                          "the weight)", SOURCE)

    def _aggregate(self, deltas: torch.Tensor, weights: torch.Tensor,
                   client_ids: Sequence[str]) -> RobustResult:
        alpha = weights / weights.sum()
        v = weighted_sum(deltas, alpha)
        dist = _distances(deltas, v)
        objective = float((alpha * dist).sum())
        beta = alpha
        steps = 0
        for _ in range(self.iters):
            steps += 1
            beta = alpha / dist.clamp(min=self.nu)
            beta = beta / beta.sum()
            v = weighted_sum(deltas, beta)
            dist = _distances(deltas, v)
            new_objective = float((alpha * dist).sum())
            converged = abs(objective - new_objective) <= self.tol * max(new_objective, 1e-30)
            objective = new_objective
            if converged:
                break
        return RobustResult(v, beta, {"robust_weiszfeld_steps": float(steps),
                                      "robust_geomed_objective": objective})

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "iters": self.iters, "nu": self.nu, "tol": self.tol}
