"""FedBuff with SecAgg+ over each buffer: the server learns each buffer's weighted sum only.

FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation",
AISTATS) was designed for secure aggregation: its server steps on the *sum* of K buffered
updates, so the K clients that fill a buffer can run one SecAgg+ instance among themselves
(Bell et al., CCS 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead"; Bonawitz et al., CCS 2017) and the server learns that sum and nothing about any
one update. ``SecureFedBuffBuffer`` is that buffer, with ``FedBuffBuffer``'s interface
(``add``, ``full``, ``flush``, ``state_dict``), so ``FedBuffSchedule`` runs it unchanged; it is
built by the transport that runs the protocol (``SecAggPlusTransport.secure_buffer``).

**What each client submits.** A client whose task finishes keeps its update and tells the
server it is done (in simulation: ``add``). When the K-th one is done the buffer *closes*:
the server tells each of the K clients its staleness weight ``s_i = s(staleness_i)`` (it
knows every staleness: it sent each task's model), and each client masks and submits, as in
a synchronous SecAgg+ round (``SecAggPlusTransport``),

    ``(w_i s_i / W) * delta_i`` clipped per coordinate to ``[-clip, clip]``,
    then ``clip * w_i / W`` and ``clip``,

with ``w_i`` its FedAvg weight (its sample count, or 1 with uniform weighting) and ``W`` the
largest weight a client may claim. The unmasked sum gives ``sum_i w_i s_i delta_i``,
``sum_i w_i`` and the number of contributors, so ``flush`` returns FedBuff's mean
``sum_i w_i s_i delta_i / sum_i w_i`` (``FedBuffBuffer``'s rule) over the clients whose masked
input arrived. The weights in the sum without ``s_i`` keep the paper's normalisation: staleness
shrinks the step.

**Dropouts** during the protocol (the transport's dropout plan, scripted per protocol stage)
become failures (``stats()["failures"]``): the sum, the total weight and the count are the
survivors'. An instance that aborts (too few survivors to unmask safely) or has no survivor
applies nothing (``flush`` returns ``None`` as the mean) and every member is a failure.

**What never leaves a client.** The buffer keeps each client's pending input privately until
the instance runs (the simulated clients' own memory) and exposes only what the server
learns in a deployment: which clients are in the buffer and their staleness (the server
dispatched their tasks), the unmasked sum, its total weight and count, and the protocol's
costs. No per-client metric, sample count or byte count is reported.

**Checkpoints.** The held inputs are the clients' state, never the server's, so they are never
written to a checkpoint: ``state_dict`` of a buffer holding inputs is refused. A FedBuff
server takes a checkpoint only with the step it commits right after a flush, when the buffer
is empty; updates that arrive after it are tasks in flight in that checkpoint and recomputed on
resume (``_AsyncSchedule.state_dict``), so a resumed run equals the uninterrupted one.

**A client twice in one buffer** cannot be: a SecAgg+ instance has one member per identity.
``FedBuffSchedule`` therefore gives a member of the open buffer no new task until the buffer
closes (it waits for the instance; plain FedBuff would let a fast client fill two places), and
``add`` refuses a second update from a member (``InvalidUpdateError``), as
``FedBuffBuffer(distinct_clients=True)`` does.

**Memory.** The pending inputs: K update vectors (the clients' memory in a deployment), then
one ``(K, dim + 2)`` float64 array while the instance runs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedmosaic.algorithms.aggregate import FedAvgAggregator, WeightedMeanAccumulator
from fedmosaic.algorithms.fedbuff import check_buffer_settings
from fedmosaic.algorithms.staleness import (
    StalenessFunction,
    check_staleness,
)
from fedmosaic.core.errors import ConfigError, InvalidUpdateError
from fedmosaic.core.update import ClientUpdate, validate_update
from fedmosaic.privacy.secagg.errors import SecAggAbortError
from fedmosaic.privacy.secagg.graph import secagg_plus_parameters
from fedmosaic.privacy.secagg.quantize import Quantizer, decode_weighted, weighted_row
from fedmosaic.privacy.secagg.simulate import DEFAULT_CORRUPTED_FRACTION, secure_sum
from fedmosaic.runtime.tally import ClientFailure

__all__ = ["SecureFedBuffBuffer"]

log = logging.getLogger(__name__)

DropoutPlan = Callable[[int, int], dict[str, set[int]] | None]


@dataclass(frozen=True, eq=False)
class _Pending:
    """One client's input, held by the client until its buffer's instance runs."""

    client_id: str
    delta: torch.Tensor
    weight: float  # w_i
    scale: float  # s_i = s(staleness_i)
    staleness: int


class SecureFedBuffBuffer:
    """A FedBuff buffer of ``k`` clients whose updates are summed by one SecAgg+ instance.

    ``staleness`` and ``weighting`` as in ``FedBuffBuffer``; ``clip``, ``max_weight``
    (``W``), ``bits``, ``dropout_rate`` and ``corrupted_fraction`` are the SecAgg+ settings of
    ``SecAggPlusTransport``; ``seed`` makes keys, masks and rounding reproducible (tests only);
    ``dropout_plan(n, instance)`` scripts which members drop at which stage (None: nobody);
    ``report(summary)`` receives each instance's costs and parameters (the transport's
    ``last_round``). ``k`` must be a population SecAgg+ parameters exist for (``ConfigError``
    on ``strategy.buffer_size`` otherwise, with the reason).
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
        clip: float = 1.0,
        max_weight: float = 1.0,
        bits: int = 32,
        dropout_rate: float = 0.1,
        corrupted_fraction: float = DEFAULT_CORRUPTED_FRACTION,
        seed: int | None = None,
        dropout_plan: DropoutPlan | None = None,
        report: Callable[[dict[str, Any]], None] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        staleness = check_buffer_settings(k, dim, weighting, self.WEIGHTINGS, staleness)
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"clip must be a finite number > 0, got {clip!r}")
        if not (math.isfinite(max_weight) and max_weight > 0):
            raise ValueError(f"max_weight must be a finite number > 0, got {max_weight!r}")
        try:
            # The instance of a full buffer has k members: refuse a k no parameters exist for
            # now rather than abort every buffer of the run.
            secagg_plus_parameters(int(k), dropout_rate, corrupted_fraction)
        except ValueError as exc:
            raise ConfigError(
                "strategy.buffer_size", k,
                f"a buffer size SecAgg+ can run over (each buffer is one SecAgg+ instance of "
                f"buffer_size clients; for dropout rate {dropout_rate} and corrupted fraction "
                f"{corrupted_fraction}: {exc})") from exc
        self.k, self.dim = int(k), int(dim)
        self.staleness = staleness
        self.weighting = weighting
        self.clip, self.max_weight, self.bits = float(clip), float(max_weight), int(bits)
        self.quantizer = Quantizer(self.clip, self.bits, num_clients=self.k)  # checks bits
        self.dropout_rate = float(dropout_rate)
        self.corrupted_fraction = float(corrupted_fraction)
        self.seed = seed
        self._dropout_plan = dropout_plan
        self._report = report
        self.device = device
        self._aggregator = FedAvgAggregator(weighting)
        self.instances = 0  # SecAgg+ instances run (numbers each one: seeds, dropout plan)
        self._pending: list[_Pending] = []

    # -- state --------------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Clients holding an input for this buffer."""
        return len(self._pending)

    @property
    def remaining(self) -> int:
        return max(self.k - self.count, 0)

    @property
    def full(self) -> bool:
        """True once ``k`` clients hold an input: time to ``flush`` (run the instance)."""
        return self.count >= self.k

    @property
    def client_ids(self) -> list[str]:
        """The buffer's members in arrival order (the server knows them: it dispatched their
        tasks)."""
        return [p.client_id for p in self._pending]

    def weight_of(self, update: ClientUpdate) -> float:
        return self._aggregator.weight_of(update)

    # -- filling (client side) ----------------------------------------------------------

    def add(self, update: ClientUpdate, staleness: int) -> float:
        """Client ``update.client_id`` finished a task from a model ``staleness`` versions
        old and holds ``update`` for this buffer's instance. Returns its effective weight
        ``w * s`` (which it will submit scaled by ``1 / W``).

        The client's own software refuses to submit what it could not submit once masked
        (``InvalidUpdateError``, the buffer unchanged): an update ``validate_update``
        rejects, a weight outside ``(0, W]``, a second update from a client already in the
        buffer, or a staleness weight that underflows to 0. A bad ``staleness`` or a full
        buffer is the caller's error (``ValueError``).
        """
        staleness = check_staleness(staleness)
        if self.full:
            raise ValueError(f"the buffer already holds k={self.k} clients: flush it first")
        update = validate_update(update, numel=self.dim)
        cid = str(update.client_id)
        if cid in {p.client_id for p in self._pending}:
            raise InvalidUpdateError(cid, "second update in this buffer: a SecAgg+ instance "
                                          "has one member per client")
        weight = float(self.weight_of(update))
        if not 0 < weight <= self.max_weight:
            raise InvalidUpdateError(cid, f"not submitted: weight {weight} outside (0, "
                                          f"{self.max_weight}] (the largest weight a client "
                                          "may claim under secure aggregation)")
        scale = float(self.staleness(staleness))
        if not weight * scale > 0:
            raise InvalidUpdateError(
                cid, f"staleness weight {scale!r} at staleness {staleness} leaves the update "
                "no weight (underflow): bound the staleness or soften the function")
        self._pending.append(_Pending(cid, update.delta, weight, scale, staleness))
        return weight * scale

    def _input(self, p: _Pending) -> np.ndarray:
        """What client ``p`` masks once told its staleness weight: its scaled delta, then its
        scaled weight and a count, the last two multiples of ``clip`` so never clipped (at
        ``s = 1`` exactly ``SecAggPlusTransport``'s input for a synchronous round)."""
        return weighted_row(p.delta.double().numpy(), p.weight, self.clip, self.max_weight,
                            scale=p.scale)

    # -- closing (the SecAgg+ instance) -------------------------------------------------

    def flush(self) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """Run the buffer's SecAgg+ instance among its members and empty the buffer.

        Returns FedBuff's mean ``sum_i w_i s_i delta_i / sum_i w_i`` over the survivors
        (None if the instance aborted or nobody survived: nothing to apply) and the stats
        the server learns (``FedBuffBuffer.stats``' keys, counted over the survivors, with
        no client metrics, plus ``failures``: a ``ClientFailure`` per member that dropped out
        or whose instance aborted, and ``secagg``: the instance's parameters and costs).
        A partly filled buffer may be flushed too (at least 2 members).
        """
        pending, self._pending = self._pending, []
        n = len(pending)
        if n == 0:
            raise ValueError("the buffer is empty: there is no mean to take")
        self.instances += 1
        instance = self.instances
        ids = [p.client_id for p in pending]
        failures: list[ClientFailure] = []
        if n < 2:
            reason = "a SecAgg+ instance needs at least 2 members, the buffer had 1"
            return None, self._stats([], pending, [ClientFailure(ids[0], reason)], {})
        plan = self._dropout_plan(n, instance) if self._dropout_plan is not None else None
        try:
            res = secure_sum(np.stack([self._input(p) for p in pending]), clip=self.clip,
                             bits=self.bits, dropout=plan,
                             seed=None if self.seed is None else self.seed * 1_000_003 + instance,
                             dropout_rate=self.dropout_rate,
                             corrupted_fraction=self.corrupted_fraction)
        except SecAggAbortError as exc:
            log.warning("FedBuff buffer %d: secure aggregation aborted: %s", instance, exc)
            failures = [ClientFailure(c, f"secure aggregation aborted: {exc}") for c in ids]
            return None, self._stats([], pending, failures, {"instance": instance,
                                                              "aborted": str(exc)})
        survivors = sorted(res.survivors)
        kept = set(survivors)
        failures = [ClientFailure(c, "dropped out during secure aggregation")
                    for i, c in enumerate(ids) if i not in kept]
        summary = {
            "instance": instance, "clients": n, "survivors": len(survivors),
            "degree": res.degree, "threshold": res.threshold,
            "bytes_up": int(res.bytes_up_per_client.sum()),
            "bytes_down": int(res.bytes_down_per_client.sum()),
            "client_seconds": float(res.client_seconds.sum()),
            "server_seconds": float(res.server_seconds),
        }
        if self._report is not None:
            self._report(dict(summary))
        weighted, total_weight, count = decode_weighted(res.sum, self.clip, self.max_weight)
        if count == 0:
            return None, self._stats([], pending, failures, summary)
        # As SecAggPlusTransport and RoundTally: one float32 sum merged into a running
        # accumulator, divided by the decoded total weight (so K = cohort at zero staleness
        # is the synchronous SecAgg+ round bit for bit).
        acc = WeightedMeanAccumulator(self.dim, device=self.device)
        acc.merge(weighted, total_weight, count)
        return acc.result(), self._stats([pending[i] for i in survivors], pending, failures,
                                         summary, total_weight=acc.total_weight, count=count)

    def _stats(self, survived: list[_Pending], pending: list[_Pending],
               failures: list[ClientFailure], summary: dict[str, Any], *,
               total_weight: float = 0.0, count: int = 0) -> dict[str, Any]:
        staleness = [p.staleness for p in survived]
        return {
            "count": count,
            "k": self.k,
            "members": len(pending),
            "total_weight": total_weight,
            "staleness_mean": sum(staleness) / len(staleness) if staleness else 0.0,
            "staleness_max": max(staleness, default=0),
            "staleness_min": min(staleness, default=0),
            "staleness_weight_mean": (sum(p.scale for p in survived) / len(survived)
                                      if survived else 0.0),
            "num_samples": 0,  # not revealed: only the sum of the weights is
            "bytes_up": int(summary.get("bytes_up", 0)),
            "metrics": {},  # per-client training metrics never leave a client
            "client_ids": [p.client_id for p in survived],
            "failures": failures,
            "secagg": summary,
        }

    # -- identity and checkpoints -------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {"name": "secure_fedbuff", "k": self.k, "weighting": self.weighting,
                "staleness": self.staleness.describe(), "distinct_clients": True,
                "clip": self.clip, "max_weight": self.max_weight, "bits": self.bits}

    def state_dict(self) -> dict[str, Any]:
        """The server's part of the buffer (its configuration and the instance counter).
        A buffer holding clients' inputs is refused: they are the clients' state and never
        reach the server, nor its checkpoints (a FedBuff step is checkpointed right after
        its buffer's flush)."""
        if self._pending:
            raise ValueError(
                f"the secure buffer holds {self.count} clients' pending inputs: they are the "
                "clients' state, never written to the server's checkpoint (checkpoint right "
                "after a flush)")
        return {"config": {**self.describe(), "dim": self.dim}, "instances": self.instances}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` of an identically configured buffer (refused otherwise,
        naming what differs)."""
        if not isinstance(state, Mapping) or "config" not in state or "instances" not in state:
            raise ValueError("secure buffer state must be a mapping with 'config' and "
                             f"'instances' (a SecureFedBuffBuffer.state_dict()), got {state!r}")
        mine, theirs = {**self.describe(), "dim": self.dim}, dict(state["config"])
        if mine != theirs:
            diff = {k: (theirs.get(k), mine.get(k)) for k in sorted(set(mine) | set(theirs))
                    if theirs.get(k) != mine.get(k)}
            raise ValueError(f"buffer configuration differs from the saved one "
                             f"(key: (saved, current)): {diff}")
        instances = state["instances"]
        if isinstance(instances, bool) or not isinstance(instances, int) or instances < 0:
            raise ValueError(f"secure buffer state has invalid instances {instances!r}")
        self._pending = []
        self.instances = instances
