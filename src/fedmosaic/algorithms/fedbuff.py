"""FedBuff's buffer: buffered asynchronous aggregation (Nguyen et al. 2022, "Federated
Learning with Buffered Asynchronous Aggregation", AISTATS, Algorithm 1).

Clients train asynchronously; the server adds each arriving update, scaled by its staleness
weight ``s(staleness)``, to a buffer, and once ``K`` updates are held it takes one server
step on their mean and empties the buffer. This module is only the buffer: it knows nothing
about versions, clocks or transports. The caller computes each update's staleness (current
version minus ``update.base_round``, see ``staleness_of``), calls ``add``, and when ``full``
calls ``flush`` and applies the mean with its ``ServerOptimizer`` exactly as
``FedAvg.finish_round`` does (``server_opt.step(weights, mean)``): FedAvgM and FedAdam are
the paper's server optimizers.

**Normalisation.** The paper's Algorithm 1 sums ``s(tau_k) * Delta_k`` over the buffer and
divides by ``K``; staleness therefore shrinks the step (a buffer of stale updates moves the
model less), it does not merely re-weight updates against each other. With sample weighting
the same rule generalises to ``sum_i w_i s_i Delta_i / sum_i w_i`` (``w_i`` the update's
FedAvg weight, its sample count): uniform weighting gives the paper's ``/ K`` exactly, and at
zero staleness (``s = 1``) it is FedAvg's weighted mean. FLSim (``HybridAggregator``) keeps the
plain weighted sum ``sum_i w_i Delta_i`` (weights already holding staleness and a normalised
example weight) and lets the server learning rate absorb the scale; its ``lr`` is therefore
``K`` times ours for the same step with uniform weighting.

**Bit-identity with FedAvg.** The running sum is a ``WeightedMeanAccumulator`` fed with
``add(delta, w_i * s_i)`` in arrival order and the denominator a Python float summed in the
same order, which is what ``RoundTally`` does for a synchronous round; at zero staleness
``s_i = 1.0`` so ``w_i * s_i == w_i`` and ``flush`` returns FedAvg's mean bit for bit.

**Memory.** One float32 vector (the running sum) plus O(1) numbers per buffer and the
buffered clients' ids: O(model), not O(K * model).

**A client twice in one buffer.** Allowed by default: in FedBuff a fast client can finish a
second task before the buffer fills, and both updates are real work from different base
models; nothing in the buffer's arithmetic needs distinct clients. Replays of one upload
are the server's concern (task ids), not the buffer's. ``distinct_clients=True`` refuses a
second update from a client already in the buffer: for client-level DP, where one client's
contribution to a server step must be bounded by one clipped update, and for deployments
that want at most one contribution per client and buffer.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from fedmosaic.algorithms.aggregate import FedAvgAggregator, WeightedMeanAccumulator
from fedmosaic.algorithms.staleness import (
    InverseSqrtStaleness,
    StalenessFunction,
    check_staleness,
    make_staleness,
)
from fedmosaic.core.errors import ConfigError, InvalidUpdateError
from fedmosaic.core.update import ClientUpdate, validate_update

__all__ = ["FedBuffBuffer"]


def check_buffer_settings(k: Any, dim: Any, weighting: str, weightings: Iterable[str],
                          staleness: StalenessFunction | None) -> StalenessFunction:
    """Check a FedBuff buffer's size, dimension and weighting (``ValueError`` /
    ``ConfigError`` naming the bad value); the staleness function, FedBuff's 1/sqrt(1+s) by
    default. Shared by every buffer that takes FedBuff's settings (plain, secure, DP)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k (the buffer size) must be an integer >= 1, got {k!r}")
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    weightings = tuple(weightings)
    if weighting not in weightings:
        raise ConfigError("weighting", weighting, weightings)
    staleness = InverseSqrtStaleness() if staleness is None else staleness
    if not isinstance(staleness, StalenessFunction):
        raise ValueError(
            f"staleness must be a StalenessFunction (see make_staleness), got {staleness!r}")
    return staleness


class FedBuffBuffer:
    """A buffer of up to ``k`` staleness-weighted client deltas, summed as they arrive.

    ``dim`` is the model's flat vector length (every update is validated against it with
    ``validate_update``); ``staleness`` defaults to FedBuff's ``1 / sqrt(1 + staleness)``;
    ``weighting`` is ``"samples"`` (each update's FedAvg weight, its sample count) or
    ``"uniform"`` (the paper's plain mean); ``device`` is where the sum lives (default: the
    first delta's device). The buffer has FedAvgAggregator's ``weight_of`` and
    ``streaming = True``, so it can be handed to transports as their ``weighting``.
    """

    WEIGHTINGS = FedAvgAggregator.WEIGHTINGS
    streaming = True

    def __init__(
        self,
        k: int,
        staleness: StalenessFunction | None = None,
        weighting: str = "samples",
        *,
        dim: int,
        device: torch.device | str | None = None,
        distinct_clients: bool = False,
    ) -> None:
        staleness = check_buffer_settings(k, dim, weighting, self.WEIGHTINGS, staleness)
        self.k, self.dim = int(k), int(dim)
        self.staleness = staleness
        self.weighting = weighting
        self.device = device
        self.distinct_clients = bool(distinct_clients)
        self._aggregator = FedAvgAggregator(weighting)
        self._reset()

    def _reset(self) -> None:
        self._acc = WeightedMeanAccumulator(self.dim, device=self.device)
        self._sample_weight = 0.0  # sum of w_i: the denominator
        self._staleness_sum = 0
        self._staleness_max = 0
        self._staleness_min: int | None = None
        self._scale_sum = 0.0  # sum of s_i, for the mean staleness weight
        self._num_samples = 0
        self._bytes_up = 0
        self._metric_sums: dict[str, float] = {}
        self._client_ids: list[str] = []
        self._seen: set[str] = set()  # O(1) membership for distinct_clients

    # -- state --------------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Updates held now."""
        return self._acc.count

    @property
    def remaining(self) -> int:
        """Updates still needed before the buffer is full."""
        return max(self.k - self.count, 0)

    @property
    def full(self) -> bool:
        """True once ``k`` updates are held: time to ``flush`` and take a server step."""
        return self.count >= self.k

    @property
    def client_ids(self) -> list[str]:
        """The clients of the held updates, in arrival order (a copy)."""
        return list(self._client_ids)

    def weight_of(self, update: ClientUpdate) -> float:
        """An update's weight before staleness scaling (FedAvgAggregator's rule)."""
        return self._aggregator.weight_of(update)

    # -- filling ------------------------------------------------------------------------

    def add(self, update: ClientUpdate, staleness: int, *,
            delta: torch.Tensor | None = None) -> float:
        """Validate ``update`` and add ``w * s(staleness) * update.delta`` to the buffer.

        Returns the effective weight ``w * s``. A bad update (``validate_update``'s rules,
        a second one from a client with ``distinct_clients``, or a staleness weight that
        underflows to 0) raises ``InvalidUpdateError`` naming the client and leaves the
        buffer unchanged; a bad ``staleness`` (not an integer >= 0) or a full buffer is the
        caller's error and raises ``ValueError``.

        ``delta``, when given, is summed instead of ``update.delta``: the output of a
        per-update stage the caller applied after validation (an aggregator's ``prepare``,
        e.g. DP-FedAvg's clip), checked for shape, dtype and finiteness (``ValueError``).
        """
        staleness = check_staleness(staleness)
        if self.full:
            raise ValueError(f"the buffer already holds k={self.k} updates: flush it first")
        update = validate_update(update, numel=self.dim)
        cid = str(update.client_id)
        if delta is None:
            delta = update.delta
        elif (not isinstance(delta, torch.Tensor) or delta.dtype != torch.float32
              or tuple(delta.shape) != (self.dim,) or not bool(torch.isfinite(delta).all())):
            raise ValueError(f"delta for client '{cid}' must be a finite float32 tensor of "
                             f"shape ({self.dim},)")
        if self.distinct_clients and cid in self._seen:
            raise InvalidUpdateError(cid, "second update in this buffer (distinct_clients)")
        scale = self.staleness(staleness)
        weight = self.weight_of(update)
        effective = weight * scale
        if not effective > 0:
            raise InvalidUpdateError(
                cid, f"staleness weight {scale!r} at staleness {staleness} leaves the update "
                f"no weight (underflow): bound the staleness or soften the function")
        self._acc.add(delta, effective)
        self._sample_weight += weight
        self._note(staleness, scale, 1, [cid], update.num_samples, update.nbytes,
                   {k: v * update.num_samples for k, v in update.metrics.items()})
        return effective

    def merge(
        self,
        weighted_sum: torch.Tensor,
        total_weight: float,
        count: int,
        staleness: int,
        *,
        client_ids: Iterable[str] = (),
        num_samples: int = 0,
        metric_sums: Mapping[str, float] | None = None,
        bytes_up: int = 0,
    ) -> None:
        """Add a sum of ``count`` validated deltas reduced elsewhere, all of one staleness:
        ``weighted_sum = sum_i w_i * delta_i`` with ``sum_i w_i = total_weight`` under this
        buffer's weighting (e.g. one secure-aggregation sum over clients that trained from
        the same version). It counts as ``count`` updates and must fit in the buffer.
        ``metric_sums`` are sample-weighted sums, as in ``PartialAggregate``.
        """
        staleness = check_staleness(staleness)
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1:
            raise ValueError(f"count must be a positive integer, got {count!r}")
        if count > self.remaining:
            raise ValueError(f"a sum of {count} updates does not fit: the buffer (k={self.k}) "
                             f"has room for {self.remaining}")
        w = float(total_weight)
        if not math.isfinite(w) or w <= 0:
            raise ValueError(f"total_weight must be a finite number > 0, got {total_weight!r}")
        if not isinstance(weighted_sum, torch.Tensor) or tuple(weighted_sum.shape) != (self.dim,):
            shape = (tuple(weighted_sum.shape) if isinstance(weighted_sum, torch.Tensor)
                     else type(weighted_sum))
            raise ValueError(f"weighted_sum must have shape ({self.dim},), got {shape}")
        if weighted_sum.dtype != torch.float32:
            raise ValueError(f"weighted_sum must be float32, got {weighted_sum.dtype}")
        if not bool(torch.isfinite(weighted_sum).all()):
            raise ValueError("weighted_sum has non-finite values (NaN or inf)")
        ids = [str(c) for c in client_ids]
        if self.distinct_clients:
            dup = sorted(set(ids) & self._seen) + sorted(
                {c for c in ids if ids.count(c) > 1})
            if dup:
                raise ValueError(f"clients {dup[:5]} are already in this buffer "
                                 "(distinct_clients)")
        scale = self.staleness(staleness)
        if not w * scale > 0:
            raise ValueError(f"staleness weight {scale!r} at staleness {staleness} leaves the "
                             "sum no weight (underflow)")
        # At s = 1 the sum is merged untouched, as RoundTally merges a PartialAggregate.
        scaled = weighted_sum if scale == 1.0 else weighted_sum * scale
        self._acc.merge(scaled, w * scale, int(count))
        self._sample_weight += w
        self._note(staleness, scale, int(count), ids, int(num_samples), int(bytes_up),
                   dict(metric_sums or {}))

    def _note(self, staleness: int, scale: float, count: int, ids: list[str],
              num_samples: int, nbytes: int, metric_sums: Mapping[str, float]) -> None:
        self._staleness_sum += staleness * count
        self._staleness_max = max(self._staleness_max, staleness)
        self._staleness_min = (staleness if self._staleness_min is None
                               else min(self._staleness_min, staleness))
        self._scale_sum += scale * count
        self._client_ids.extend(ids)
        self._seen.update(ids)
        self._num_samples += num_samples
        self._bytes_up += nbytes
        for key, value in metric_sums.items():
            self._metric_sums[key] = self._metric_sums.get(key, 0.0) + float(value)

    # -- emptying -----------------------------------------------------------------------

    def mean(self) -> torch.Tensor:
        """``sum_i w_i s_i delta_i / sum_i w_i`` over the held updates (a new tensor; the
        buffer is unchanged)."""
        summed = self._acc.weighted_sum
        if summed is None or self.count == 0:
            raise ValueError("the buffer is empty: there is no mean to take")
        return summed / self._sample_weight

    def stats(self) -> dict[str, Any]:
        """What the held updates were (JSON-able): counts, weights, staleness, the
        sample-weighted mean of the clients' metrics, bytes uploaded, client ids."""
        n = self.count
        return {
            "count": n,
            "k": self.k,
            "total_weight": self._sample_weight,
            "effective_weight": self._acc.total_weight,
            "staleness_mean": self._staleness_sum / n if n else 0.0,
            "staleness_max": self._staleness_max,
            "staleness_min": self._staleness_min if self._staleness_min is not None else 0,
            "staleness_weight_mean": self._scale_sum / n if n else 0.0,
            "num_samples": self._num_samples,
            "bytes_up": self._bytes_up,
            "metrics": ({k: v / self._num_samples for k, v in self._metric_sums.items()}
                        if self._num_samples else {}),
            "client_ids": list(self._client_ids),
        }

    def flush(self) -> tuple[torch.Tensor, dict[str, Any]]:
        """The staleness-weighted mean delta and the buffer's ``stats()``; then empty it.

        Normally called when ``full``; a partly filled buffer may be flushed too (e.g. at
        the end of a run), its mean is then over the updates it holds. The caller applies
        the mean with its server optimizer: ``server_opt.step(weights, mean)``.
        """
        mean = self.mean()
        stats = self.stats()
        self._reset()
        return mean, stats

    # -- identity and checkpoints -------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The configuration (JSON-able), for the run identity."""
        return {"name": "fedbuff", "k": self.k, "weighting": self.weighting,
                "staleness": self.staleness.describe(),
                "distinct_clients": self.distinct_clients}

    def state_dict(self) -> dict[str, Any]:
        """A snapshot of a possibly partly filled buffer (the running sum is cloned), with
        plain numbers, strings and one tensor, so ``torch.load(weights_only=True)`` reads it."""
        summed = self._acc.weighted_sum
        return {
            "config": {**self.describe(), "dim": self.dim},
            "sum": None if summed is None or self.count == 0 else summed.detach().clone(),
            "effective_weight": self._acc.total_weight,
            "count": self.count,
            "sample_weight": self._sample_weight,
            "staleness_sum": self._staleness_sum,
            "staleness_max": self._staleness_max,
            "staleness_min": self._staleness_min,
            "scale_sum": self._scale_sum,
            "num_samples": self._num_samples,
            "bytes_up": self._bytes_up,
            "metric_sums": dict(self._metric_sums),
            "client_ids": list(self._client_ids),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` of an identically configured buffer (refused otherwise,
        naming what differs)."""
        if not isinstance(state, Mapping):
            raise ValueError(f"buffer state must be a mapping, got {type(state).__name__}")
        keys = ("config", "sum", "effective_weight", "count", "sample_weight", "staleness_sum",
                "staleness_max", "staleness_min", "scale_sum", "num_samples", "bytes_up",
                "metric_sums", "client_ids")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"buffer state lacks keys {missing}")
        mine, theirs = {**self.describe(), "dim": self.dim}, dict(state["config"])
        if mine != theirs:
            diff = {k: (theirs.get(k), mine.get(k)) for k in sorted(set(mine) | set(theirs))
                    if theirs.get(k) != mine.get(k)}
            raise ValueError(f"buffer configuration differs from the saved one "
                             f"(key: (saved, current)): {diff}")
        count = state["count"]
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= self.k:
            raise ValueError(f"buffer state has invalid count {count!r} (k={self.k})")
        summed = state["sum"]
        if count and (not isinstance(summed, torch.Tensor) or summed.dtype != torch.float32
                      or tuple(summed.shape) != (self.dim,)):
            raise ValueError(f"buffer state's sum must be a float32 tensor of shape "
                             f"({self.dim},) when it holds {count} updates")
        if len(state["client_ids"]) != count:
            raise ValueError(f"buffer state lists {len(state['client_ids'])} clients for "
                             f"{count} updates")
        self._reset()
        if count:
            # Adding into zeros reproduces the saved sum exactly.
            self._acc.merge(summed.detach().clone(), float(state["effective_weight"]), count)
        self._sample_weight = float(state["sample_weight"])
        self._staleness_sum = int(state["staleness_sum"])
        self._staleness_max = int(state["staleness_max"])
        smin = state["staleness_min"]
        self._staleness_min = None if smin is None else int(smin)
        self._scale_sum = float(state["scale_sum"])
        self._num_samples = int(state["num_samples"])
        self._bytes_up = int(state["bytes_up"])
        self._metric_sums = {str(k): float(v) for k, v in dict(state["metric_sums"]).items()}
        self._client_ids = [str(c) for c in state["client_ids"]]
        self._seen = set(self._client_ids)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, dim: int,
                    device: torch.device | str | None = None) -> FedBuffBuffer:
        """Build a buffer from ``describe()``'s dict (staleness as its own dict)."""
        staleness = dict(config.get("staleness", {"name": "inverse_sqrt"}))
        return cls(int(config["k"]), make_staleness(**staleness),
                   str(config.get("weighting", "samples")), dim=dim, device=device,
                   distinct_clients=bool(config.get("distinct_clients", False)))
