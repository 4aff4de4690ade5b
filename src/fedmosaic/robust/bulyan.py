"""Bulyan (El Mhamdi, Guerraoui and Rouault 2018, "The Hidden Vulnerability of Distributed
Learning in Byzantium", ICML).

Two stages: (1) select ``theta = n - 2f`` updates by repeatedly applying Krum to the updates
not yet selected; (2) for every coordinate, average the ``beta = theta - 2f`` selected values
closest to that coordinate's median over the selection. The guarantee needs ``n >= 4f + 3``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedmosaic.robust.base import (
    RobustAggregator,
    RobustPreconditionError,
    RobustResult,
    pairwise_sq_distances,
)
from fedmosaic.robust.krum import krum_scores, select_by_score

SOURCE = "El Mhamdi et al. 2018"


class Bulyan(RobustAggregator):
    """Bulyan over Krum. Unweighted, as in the paper. A client's share is the fraction of the
    output's values it supplied (0 for a client Krum never selected)."""

    name = "bulyan"

    def check(self, n: int) -> None:
        if not n >= 4 * self.f + 3:
            raise RobustPreconditionError(self.name, n, self.f, "n >= 4f + 3", SOURCE)

    def select(self, deltas: torch.Tensor, client_ids: Sequence[str]) -> torch.Tensor:
        """Stage 1: indices of the ``n - 2f`` updates picked by iterated Krum, in pick order.

        The distance matrix is computed once; each iteration scores the remaining rows on
        its sub-matrix.
        """
        n = deltas.shape[0]
        dist = pairwise_sq_distances(deltas)
        remaining = list(range(n))
        picked = []
        for _ in range(n - 2 * self.f):
            idx = torch.tensor(remaining, dtype=torch.long, device=dist.device)
            sub = dist[idx][:, idx]
            ids = [client_ids[i] for i in remaining]
            best = int(select_by_score(krum_scores(sub, self.f), 1, ids)[0])
            picked.append(remaining.pop(best))
        return torch.tensor(picked, dtype=torch.long, device=deltas.device)

    def _aggregate(self, deltas: torch.Tensor, weights: torch.Tensor,
                   client_ids: Sequence[str]) -> RobustResult:
        n = deltas.shape[0]
        chosen = self.select(deltas, client_ids)
        selected = deltas[chosen]
        theta = selected.shape[0]
        beta = theta - 2 * self.f
        # One sort of the selection gives the median and, since the beta values closest to
        # it are a contiguous run of the sorted column, the answer: of the 2f + 1 runs of
        # length beta, the one with the smallest radius around the median.
        values, order = torch.sort(selected, dim=0)
        median = (values[(theta - 1) // 2] + values[theta // 2]) * 0.5
        radius = torch.maximum(median - values[:2 * self.f + 1],
                               values[beta - 1:] - median)
        start = torch.argmin(radius, dim=0)  # (d,)
        rows = start[None, :] + torch.arange(beta, device=deltas.device)[:, None]
        delta = torch.gather(values, 0, rows).mean(dim=0)
        clients = chosen[torch.gather(order, 0, rows)]  # back to positions among all n
        counts = torch.bincount(clients.reshape(-1), minlength=n).to(torch.float64)
        shares = counts / float(clients.numel())
        return RobustResult(delta, shares, {"robust_selected": float(theta),
                                            "robust_excluded": float(n - theta)})
