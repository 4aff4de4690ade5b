"""Centered clipping (Karimireddy, He and Jaggi 2021, "Learning from History for Byzantine
Robust Optimization", ICML).

Starting from a center ``v`` (the previous round's aggregate: the paper's use of history),
each iteration moves ``v`` by the mean of the clipped differences
``(x_i - v) * min(1, tau / ||x_i - v||)``. A Byzantine client moves ``v`` by at most
``tau / n`` per iteration however large its update, while updates near ``v`` pass unclipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedmosaic.algorithms.aggregate import weighted_sum
from fedmosaic.robust.base import (
    RobustAggregator,
    RobustPreconditionError,
    RobustResult,
    finite_positive,
)

SOURCE = "Karimireddy et al. 2021"


class CenteredClip(RobustAggregator):
    """Iterative centered clipping with radius ``tau`` and ``iters`` iterations (the paper
    finds one iteration enough when the center carries history; the default is 1).

    The center is the previous round's output; in the first round (no history yet) it is the
    coordinate-wise median, so that a cold start is not anchored at an attacker's point.
    Unweighted (``1/n`` per client, as in the paper). The paper's analysis assumes a small
    Byzantine fraction and a center close to the honest mean; the check enforces the honest
    majority ``n > 2f`` that every rule needs. A client's share is its last-iteration factor
    ``min(1, tau / ||x_i - v||)``, normalised: how much of its pull survived the clip.
    """

    name = "centered_clip"

    def __init__(self, tau: float, iters: int = 1, f: int = 0) -> None:
        super().__init__(f)
        self.tau = finite_positive("tau", tau)
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"iters must be an integer >= 1, got {iters!r}")
        self.iters = iters
        self.center: torch.Tensor | None = None

    def check(self, n: int) -> None:
        if not n > 2 * self.f:
            raise RobustPreconditionError(self.name, n, self.f, "n > 2f (an honest majority)",
                                          SOURCE)

    def _aggregate(self, deltas: torch.Tensor, weights: torch.Tensor,
                   client_ids: Sequence[str]) -> RobustResult:
        n, d = deltas.shape
        if self.center is not None and self.center.shape == (d,):
            v = self.center.to(device=deltas.device, dtype=torch.float32).clone()
            cold = 0.0
        else:
            v = deltas.median(dim=0).values.clone()
            cold = 1.0
        factor = torch.ones(n, dtype=torch.float64, device=deltas.device)
        clipped = 0
        for _ in range(self.iters):
            dist = torch.linalg.vector_norm(deltas - v, dim=1).to(torch.float64)
            factor = torch.where(dist > self.tau, self.tau / dist.clamp(min=1e-300),
                                 torch.ones_like(dist))
            clipped = int((dist > self.tau).sum())
            # v + (1/n) sum_i factor_i (x_i - v) = (1 - mean(factor)) v + sum_i (factor_i/n) x_i
            step = weighted_sum(deltas, factor / n)
            v = v * float(1.0 - factor.mean()) + step
        self.center = v.detach().clone()
        shares = factor / factor.sum()
        return RobustResult(v, shares, {"robust_clipped": float(clipped),
                                        "robust_cold_start": cold})

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "tau": self.tau, "iters": self.iters}

    def state_dict(self) -> dict[str, Any]:
        return {} if self.center is None else {"center": self.center.detach().cpu().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        center = state.get("center")
        self.center = None if center is None else center.clone()
