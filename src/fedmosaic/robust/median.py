"""Coordinate-wise median and trimmed mean (Yin, Chen, Ramchandran and Bartlett 2018,
"Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML).

Both act on every coordinate independently; the matrix is sorted once along the client axis.
Neither is weighted (the estimators in the paper are not): a client's sample count cannot
buy it influence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from fedmosaic.robust.base import (
    RobustAggregator,
    RobustPreconditionError,
    RobustResult,
    check_f,
    coordinate_median,
    shares_from_indices,
)

SOURCE = "Yin et al. 2018"


class CoordinateMedian(RobustAggregator):
    """The coordinate-wise median; for an even ``n``, the mean of the two middle values.

    Precondition: an honest majority, ``n > 2f``. A client's share is the fraction of the
    output it supplied: each coordinate's kept value (or the two middle values, half each)
    counts for its client (:func:`~fedmosaic.robust.base.shares_from_indices`).
    """

    name = "median"

    def check(self, n: int) -> None:
        if not n > 2 * self.f:
            raise RobustPreconditionError(self.name, n, self.f, "n > 2f (an honest majority)",
                                          SOURCE)

    def _aggregate(self, deltas: torch.Tensor, weights: torch.Tensor,
                   client_ids: Sequence[str]) -> RobustResult:
        median, kept = coordinate_median(deltas)
        return RobustResult(median, shares_from_indices(kept, deltas.shape[0]))


class TrimmedMean(RobustAggregator):
    """The coordinate-wise trimmed mean: drop the ``k`` largest and ``k`` smallest values of
    every coordinate and average the remaining ``n - 2k``.

    Give either ``beta`` (the trimmed fraction per side, ``k = floor(beta * n)``, as in Yin et
    al.) or ``f`` (``k = f``, the number of Byzantine clients to tolerate). The precondition
    is ``n > 2k`` (something remains) and, with ``f`` and ``beta`` both given, ``k >= f``
    (every Byzantine value can be trimmed). A client's share is the fraction of the output's
    kept values it supplied.
    """

    name = "trimmed_mean"

    def __init__(self, f: int | None = None, beta: float | None = None) -> None:
        if f is None and beta is None:
            beta = 0.1
        super().__init__(0 if f is None else check_f(f))
        self.given_f = f is not None
        if beta is not None and (isinstance(beta, bool) or not isinstance(beta, (int, float))
                                 or not 0 <= beta < 0.5):
            raise ValueError(f"beta must be a number in [0, 0.5), got {beta!r}")
        self.beta = None if beta is None else float(beta)

    def trimmed(self, n: int) -> int:
        """``k``, the number of values dropped at each end of every coordinate."""
        if self.beta is None:
            return self.f
        return math.floor(round(self.beta * n, 9))

    def check(self, n: int) -> None:
        k = self.trimmed(n)
        if not n > 2 * k:
            raise RobustPreconditionError(self.name, n, self.f,
                                          f"n > 2k values per coordinate (k={k} trimmed per "
                                          "side)", SOURCE)
        if self.given_f and k < self.f:
            raise RobustPreconditionError(self.name, n, self.f,
                                          f"k >= f (beta={self.beta} trims only k={k} per "
                                          "side)", SOURCE)

    def _aggregate(self, deltas: torch.Tensor, weights: torch.Tensor,
                   client_ids: Sequence[str]) -> RobustResult:
        n = deltas.shape[0]
        k = self.trimmed(n)
        if k == 0:
            mean = deltas.mean(dim=0)
            return RobustResult(mean, torch.full((n,), 1.0 / n, dtype=torch.float64,
                                                 device=deltas.device))
        # Two partial selections (top k, bottom k) instead of a full sort; the dropped
        # values are masked out, never subtracted, so a huge value leaves no rounding trace.
        keep = torch.ones_like(deltas, dtype=torch.bool)
        keep.scatter_(0, torch.topk(deltas, k, dim=0).indices, False)
        keep.scatter_(0, torch.topk(deltas, k, dim=0, largest=False).indices, False)
        # Ties can put one row in both ends; divide by what is actually kept.
        keep_f = keep.to(deltas.dtype)
        inv_kept = 1.0 / keep_f.sum(dim=0)
        mean = (deltas * keep_f).sum(dim=0) * inv_kept
        # Share: the client's kept values, each weighing 1/kept of its coordinate.
        shares = (keep_f @ inv_kept).to(torch.float64) / deltas.shape[1]
        return RobustResult(mean, shares, {"robust_trimmed_per_side": float(k)})

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "f": self.f if self.given_f else None, "beta": self.beta}
