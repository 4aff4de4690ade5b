"""Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui and Stainer 2017, "Machine Learning
with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS).

Each update is scored by the sum of squared distances to its ``n - f - 2`` nearest other
updates; Krum outputs the update with the lowest score, Multi-Krum the mean of the ``m``
lowest-scoring ones. The guarantee needs ``n > 2f + 2``.
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
    pairwise_sq_distances,
)

SOURCE = "Blanchard et al. 2017"


def krum_scores(dist: torch.Tensor, f: int) -> torch.Tensor:
    """Krum scores from an ``(n, n)`` squared-distance matrix: for each row, the sum of its
    ``n - f - 2`` smallest distances to other rows (at least 0, at most ``n - 1`` of them)."""
    n = dist.shape[0]
    k = min(max(n - f - 2, 0), n - 1)
    if k == 0:
        return torch.zeros(n, dtype=dist.dtype, device=dist.device)
    # Each row's own zero distance sorts first (distances are >= 0); skip it.
    off_diag = dist + torch.diag(torch.full((n,), float("inf"), dtype=dist.dtype,
                                            device=dist.device))
    return torch.topk(off_diag, k, dim=1, largest=False).values.sum(dim=1)


def select_by_score(scores: torch.Tensor, m: int, client_ids: Sequence[str]) -> torch.Tensor:
    """Indices of the ``m`` lowest scores. Exact ties (the two members of the closest pair
    always tie when each counts one neighbour) are broken by client id, not by position, so
    the choice does not depend on the order in which updates arrived."""
    values = scores.tolist()
    order = sorted(range(len(values)), key=lambda i: (values[i], client_ids[i]))
    return torch.tensor(order[:m], dtype=torch.long, device=scores.device)


class Krum(RobustAggregator):
    """Krum: the single update closest to its ``n - f - 2`` neighbours (Blanchard et al.
    2017). Its share is 1, everyone else's 0. Weights are ignored (the rule is unweighted)."""

    name = "krum"

    def check(self, n: int) -> None:
        if not n > 2 * self.f + 2:
            raise RobustPreconditionError(self.name, n, self.f, "n > 2f + 2", SOURCE)

    def _aggregate(self, deltas: torch.Tensor, weights: torch.Tensor,
                   client_ids: Sequence[str]) -> RobustResult:
        scores = krum_scores(pairwise_sq_distances(deltas), self.f)
        best = int(select_by_score(scores, 1, client_ids)[0])
        shares = torch.zeros(len(client_ids), dtype=torch.float64, device=deltas.device)
        shares[best] = 1.0
        return RobustResult(deltas[best].clone(), shares,
                            {"robust_selected": 1.0,
                             "robust_excluded": float(len(client_ids) - 1)})


class MultiKrum(RobustAggregator):
    """Multi-Krum: the mean of the ``m`` updates with the lowest Krum scores (Blanchard et
    al. 2017, Section 5); ``m`` defaults to ``n - f``. The selected updates are averaged with
    the strategy's weights (use ``weighting = "uniform"`` unless clients' sample counts are
    trusted: a Byzantine client can claim any count). A client's share is its normalised
    weight if selected, else 0."""

    name = "multikrum"

    def __init__(self, f: int = 0, m: int | None = None) -> None:
        super().__init__(f)
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"m must be an integer >= 1, got {m!r}")
        self.m = m

    def selection_size(self, n: int) -> int:
        return n - self.f if self.m is None else self.m

    def check(self, n: int) -> None:
        if not n > 2 * self.f + 2:
            raise RobustPreconditionError(self.name, n, self.f, "n > 2f + 2", SOURCE)
        m = self.selection_size(n)
        if m > n - self.f:
            # More than n - f selected would include at least one Byzantine update.
            raise RobustPreconditionError(self.name, n, self.f,
                                          f"m <= n - f (m={m})", SOURCE)

    def _aggregate(self, deltas: torch.Tensor, weights: torch.Tensor,
                   client_ids: Sequence[str]) -> RobustResult:
        n = len(client_ids)
        m = self.selection_size(n)
        scores = krum_scores(pairwise_sq_distances(deltas), self.f)
        chosen = select_by_score(scores, m, client_ids)
        w = weights[chosen]
        w = w / w.sum()
        shares = torch.zeros(n, dtype=torch.float64, device=deltas.device)
        shares[chosen] = w
        delta = weighted_sum(deltas[chosen], w)
        return RobustResult(delta, shares, {"robust_selected": float(m),
                                            "robust_excluded": float(n - m)})

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "m": self.m}
