"""Reducing a round's client results: one code path for the server and for transports that
sum updates where they are produced (a Ray actor, a batch of vmapped clients)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import torch

from fedmosaic.algorithms.aggregate import WeightedMeanAccumulator
from fedmosaic.core.errors import InvalidUpdateError
from fedmosaic.core.update import ClientUpdate, validate_update

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientFailure:
    """A client that did not return an update this round, and why."""

    client_id: str
    reason: str


@dataclass
class PartialAggregate:
    """Validated client updates already summed: ``weighted_sum = sum_i w_i * delta_i``.

    ``metric_sums`` are sample-weighted sums (``sum_i n_i * metric_i``); ``bytes_up`` is what
    the individual deltas would have cost on the wire.
    """

    weighted_sum: torch.Tensor | None
    total_weight: float = 0.0
    count: int = 0
    num_samples: int = 0
    metric_sums: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0
    client_ids: list[str] = field(default_factory=list)
    failures: list[ClientFailure] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)


class Weighting(Protocol):
    """What the tally needs from an aggregator: each update's aggregation weight.

    An aggregator may also define ``prepare(update, tally) -> delta`` to transform each
    validated update before it is summed (a DP clip); such an aggregator must not be handed
    to transports as a remote ``weighting`` unless they apply ``prepare`` too, so it sets
    ``streaming = False``.
    """

    def weight_of(self, update: ClientUpdate) -> float: ...


class RoundTally:
    """Validates and sums one round's results as they arrive.

    Every update is checked with ``validate_update`` before it touches the sum; invalid ones
    are rejected with a logged reason, failures are recorded, and the round goes on.
    """

    def __init__(self, weighting: Weighting, numel: int, round_num: int,
                 device: torch.device | str | None = None) -> None:
        self.weighting, self.numel, self.round = weighting, numel, round_num
        self.acc = WeightedMeanAccumulator(numel, device=device)
        self.num_samples = 0
        self.metric_sums: dict[str, float] = {}
        self.bytes_up = 0
        self.client_ids: list[str] = []
        self._seen: set[str] = set()  # membership per update must be O(1): cohorts of 10,000
        self.failures: list[ClientFailure] = []
        self.rejected: list[str] = []
        # Scratch space for aggregator stages (e.g. how many updates a DP clip bound held).
        self.stage_stats: dict[str, float] = {}
        # Robust aggregation needs every update, not only their sum; only then are they kept.
        self.keep_updates = bool(getattr(weighting, "keep_updates", False))
        self.updates: list[torch.Tensor] = []
        self.update_weights: list[float] = []

    @property
    def count(self) -> int:
        return self.acc.count

    def add(self, result: ClientUpdate | ClientFailure | PartialAggregate | object) -> None:
        if isinstance(result, PartialAggregate):
            self._merge(result)
        elif isinstance(result, ClientFailure):
            self.failures.append(result)
        else:
            self._add_update(result)

    def _add_update(self, result: object) -> None:
        try:
            update = validate_update(result, numel=self.numel, current_round=self.round)
        except InvalidUpdateError as exc:
            log.warning("round %d: %s", self.round, exc)
            self.rejected.append(str(exc))
            return
        if update.client_id in self._seen:
            msg = f"update from client '{update.client_id}' rejected: second update this round"
            log.warning("round %d: %s", self.round, msg)
            self.rejected.append(msg)
            return
        prepare = getattr(self.weighting, "prepare", None)
        delta = update.delta if prepare is None else prepare(update, self)
        weight = self.weighting.weight_of(update)
        self.acc.add(delta, weight)
        if self.keep_updates:
            self.updates.append(delta)
            self.update_weights.append(weight)
        self.client_ids.append(update.client_id)
        self._seen.add(update.client_id)
        self.num_samples += update.num_samples
        self.bytes_up += update.nbytes
        for key, value in update.metrics.items():
            self.metric_sums[key] = self.metric_sums.get(key, 0.0) + value * update.num_samples

    def _merge(self, part: PartialAggregate) -> None:
        self.failures.extend(part.failures)
        self.rejected.extend(part.rejected)
        dup = self._seen.intersection(part.client_ids)
        if dup:
            # A whole partial sum cannot be split again: refuse it rather than double-count.
            msg = f"partial aggregate rejected: clients {sorted(dup)[:5]} already reported"
            log.warning("round %d: %s", self.round, msg)
            self.rejected.append(msg)
            return
        if part.count == 0 or part.weighted_sum is None:
            return
        if self.keep_updates:
            msg = (f"partial aggregate of {part.count} updates rejected: the aggregator needs "
                   "each update, not their sum")
            log.warning("round %d: %s", self.round, msg)
            self.rejected.append(msg)
            return
        self.acc.merge(part.weighted_sum, part.total_weight, part.count)
        self.client_ids.extend(part.client_ids)
        self._seen.update(part.client_ids)
        self.num_samples += part.num_samples
        self.bytes_up += part.bytes_up
        for key, value in part.metric_sums.items():
            self.metric_sums[key] = self.metric_sums.get(key, 0.0) + value

    def stacked_updates(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """The kept updates as an ``(n, d)`` matrix, their weights ``(n,)`` and client ids
        (only when the weighting asked for ``keep_updates``)."""
        if not self.keep_updates:
            raise ValueError("this tally kept only the running sum (its weighting does not "
                             "set keep_updates)")
        if not self.updates:
            return torch.zeros(0, self.numel), torch.zeros(0, dtype=torch.float64), []
        return (torch.stack(self.updates), torch.tensor(self.update_weights,
                                                        dtype=torch.float64),
                list(self.client_ids))

    def mean_metrics(self) -> dict[str, float]:
        """Sample-weighted mean of every client metric."""
        if self.num_samples == 0:
            return {}
        return {k: v / self.num_samples for k, v in self.metric_sums.items()}

    def to_partial(self) -> PartialAggregate:
        """This tally as a ``PartialAggregate``, to ship to the server."""
        return PartialAggregate(
            weighted_sum=self.acc.weighted_sum if self.count else None,
            total_weight=self.acc.total_weight, count=self.count,
            num_samples=self.num_samples, metric_sums=dict(self.metric_sums),
            bytes_up=self.bytes_up, client_ids=list(self.client_ids),
            failures=list(self.failures), rejected=list(self.rejected),
        )
