"""Weighted averaging of client deltas, in one shot or streamed.

FedAvg's server step (McMahan et al., 2017, "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS) is a weighted mean of the clients' updates,
weighted by their number of training samples. Everything here works on flat float32
vectors and keeps its results on the device of its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedmosaic.core.errors import ConfigError
from fedmosaic.core.update import ClientUpdate

__all__ = ["FedAvgAggregator", "WeightedMeanAccumulator", "weighted_mean"]


def weighted_sum(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_k weights[k] * deltas[k]`` for a (K, D) float32 matrix, reading it once.

    On CPU the product runs in NumPy's BLAS (``sgemv``) on the same memory (no copy): it
    streams the matrix at about 90% of the machine's read bandwidth where torch's own
    matrix-vector kernel reaches about 65% (``benchmarks/aggregation.py``). Elsewhere (CUDA)
    torch's kernel is used.
    """
    w = weights.to(device=deltas.device, dtype=torch.float32)
    if deltas.device.type == "cpu":
        matrix = deltas.detach()
        if not matrix.is_contiguous():
            matrix = matrix.contiguous()
        return torch.from_numpy(w.detach().numpy() @ matrix.numpy())
    return w @ deltas


def weighted_mean(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of the rows of ``deltas`` as one matrix-vector product.

    ``deltas`` is a (K, D) float32 matrix, one client delta per row; ``weights`` holds K
    finite positive weights (any scale: they are normalised here). The weights are
    normalised in float64 so that very unequal sample counts lose no precision, then
    cast to float32 for the product; the result is a (D,) float32 vector on the device
    of ``deltas``, computed by :func:`weighted_sum`.
    """
    if not isinstance(deltas, torch.Tensor) or deltas.dim() != 2:
        shape = tuple(deltas.shape) if isinstance(deltas, torch.Tensor) else type(deltas)
        raise ValueError(f"deltas must be a (K, D) tensor, got {shape}")
    if deltas.dtype != torch.float32:
        raise ValueError(f"deltas must be float32, got {deltas.dtype}")
    k = deltas.shape[0]
    if k == 0:
        raise ValueError("deltas has no rows: nothing to average")
    w = torch.as_tensor(weights, dtype=torch.float64, device=deltas.device)
    if w.dim() != 1 or w.shape[0] != k:
        raise ValueError(f"weights must have shape ({k},) to match deltas, got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weights must be finite, got NaN or inf")
    if not bool((w > 0).all()):
        raise ValueError(f"weights must be > 0, smallest is {float(w.min())}")
    return weighted_sum(deltas, w / w.sum())


class WeightedMeanAccumulator:
    """Running weighted sum of deltas, so the server never holds every update at once.

    The sum is kept in float32 (``add_`` with ``alpha=weight``, one fused kernel per
    update) and the total weight in a Python float (double precision). Float32 is chosen
    over float64 for speed and half the memory on accelerators; the relative rounding
    error grows only like K * 2**-24 for K updates, far below the noise of SGD. The
    result equals :func:`weighted_mean` up to that float rounding.

    With ``device=None`` the buffer is created on the device of the first delta added;
    with an explicit device, deltas are moved there (e.g. CPU-received updates summed on
    the GPU).
    """

    def __init__(self, dim: int, device: torch.device | str | None = None) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self._dim = dim
        self._sum: torch.Tensor | None = (
            None if device is None else torch.zeros(dim, dtype=torch.float32, device=device)
        )
        self._total_weight = 0.0
        self._count = 0

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def count(self) -> int:
        """Number of deltas added so far."""
        return self._count

    @property
    def total_weight(self) -> float:
        """Sum of the weights added so far."""
        return self._total_weight

    @property
    def weighted_sum(self) -> torch.Tensor | None:
        """The running ``sum_i w_i * delta_i`` (None before the first add)."""
        return self._sum

    def add(self, delta: torch.Tensor, weight: float) -> None:
        """Add ``weight * delta`` to the running sum."""
        if not isinstance(delta, torch.Tensor) or tuple(delta.shape) != (self._dim,):
            shape = tuple(delta.shape) if isinstance(delta, torch.Tensor) else type(delta)
            raise ValueError(f"delta must have shape ({self._dim},), got {shape}")
        if delta.dtype != torch.float32:
            raise ValueError(f"delta must be float32, got {delta.dtype}")
        w = float(weight)
        if not math.isfinite(w) or w <= 0:
            raise ValueError(f"weight must be a finite number > 0, got {weight!r}")
        if self._sum is None:
            self._sum = torch.zeros(self._dim, dtype=torch.float32, device=delta.device)
        self._sum.add_(delta.to(self._sum.device), alpha=w)
        self._total_weight += w
        self._count += 1

    def merge(self, weighted_sum: torch.Tensor, total_weight: float, count: int) -> None:
        """Add a sum reduced elsewhere (``sum_i w_i * delta_i`` over ``count`` deltas whose
        weights total ``total_weight``), e.g. on a Ray actor or a batch of vmapped clients."""
        if not isinstance(weighted_sum, torch.Tensor) or tuple(weighted_sum.shape) != (self._dim,):
            shape = (tuple(weighted_sum.shape) if isinstance(weighted_sum, torch.Tensor)
                     else type(weighted_sum))
            raise ValueError(f"weighted_sum must have shape ({self._dim},), got {shape}")
        if weighted_sum.dtype != torch.float32:
            raise ValueError(f"weighted_sum must be float32, got {weighted_sum.dtype}")
        w = float(total_weight)
        if not math.isfinite(w) or w <= 0:
            raise ValueError(f"total_weight must be a finite number > 0, got {total_weight!r}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive integer, got {count!r}")
        if self._sum is None:
            self._sum = torch.zeros(self._dim, dtype=torch.float32, device=weighted_sum.device)
        self._sum.add_(weighted_sum.to(self._sum.device))
        self._total_weight += w
        self._count += count

    def result(self) -> torch.Tensor:
        """The weighted mean of everything added (a new tensor; the accumulator is unchanged)."""
        if self._sum is None or self._count == 0:
            raise ValueError("no delta was added: the weighted mean is undefined")
        return self._sum / self._total_weight


class FedAvgAggregator:
    """FedAvg aggregation (McMahan et al., 2017, "Communication-Efficient Learning of Deep
    Networks from Decentralized Data", AISTATS).

    ``weighting="samples"`` weights each update by ``update.weight`` (its sample count
    unless the client set another weight), as in the paper; ``"uniform"`` gives every
    update the same weight. The aggregator knows nothing about rounds, so asynchronous
    schemes can reuse it with their own staleness weights.
    """

    WEIGHTINGS = ("samples", "uniform")
    streaming = True

    def __init__(self, weighting: str = "samples") -> None:
        if weighting not in self.WEIGHTINGS:
            raise ConfigError("weighting", weighting, self.WEIGHTINGS)
        self.weighting = weighting

    def accumulator(
        self, dim: int, device: torch.device | str | None = None
    ) -> WeightedMeanAccumulator:
        """A fresh streaming accumulator; feed it ``(update.delta, self.weight_of(update))``."""
        return WeightedMeanAccumulator(dim, device=device)

    def weight_of(self, update: ClientUpdate) -> float:
        """The aggregation weight of one update under this weighting."""
        if self.weighting == "uniform":
            return 1.0
        # ClientUpdate fills weight from num_samples; the fallback only serves mypy's view.
        w = update.weight if update.weight is not None else update.num_samples
        return float(w)

    def weights_for_samples(self, num_samples: torch.Tensor) -> torch.Tensor:
        """Vectorised ``weight_of`` for updates whose weight is their sample count (what
        in-process transports produce): one weight per entry of ``num_samples``."""
        if self.weighting == "uniform":
            return torch.ones_like(num_samples, dtype=torch.float32)
        return num_samples.to(torch.float32)

    def aggregate(self, updates: Sequence[ClientUpdate]) -> torch.Tensor:
        """Weighted mean of the updates' deltas (all of them held at once)."""
        if len(updates) == 0:
            raise ValueError("no updates to aggregate")
        deltas = torch.stack([u.delta for u in updates])
        weights = torch.tensor([self.weight_of(u) for u in updates], dtype=torch.float64)
        return weighted_mean(deltas, weights)

    def describe(self) -> dict[str, str]:
        return {"name": "fedavg", "weighting": self.weighting}
