"""SecretSharingTransport: a round's updates summed by several non-colluding aggregators that
each see only additive shares (``fedmosaic.privacy.shares``; Prio, NSDI 2017).

The simulated clients train through any inner transport; each then encodes its update as
SecAgg+ clients do (``(w_i / W) * delta_i`` clipped per coordinate to ``[-clip, clip]``, plus
the two bookkeeping coordinates ``clip * w_i / W`` and ``clip``, in fixed point mod
``2**bits``; or the strategy's integer encoder, e.g. distributed Skellam's noise), splits it
into one share per aggregator and sends them through the real messages. The server side
receives one ``PartialAggregate`` built from the combined sum: the weighted sum of the
deltas, the total weight and the number of contributors, nothing per client (no per-client
training metrics either).

As with SecAgg+, only aggregators that need nothing but a weighted sum can run on it: a
robust rule (median, Krum, ...) or central-DP clipping needs each update and is refused when
the run is configured (``check_strategy``); differential privacy composes through client-side
noise (distributed DP).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from fedmosaic.algorithms.strategy import ClientTask
from fedmosaic.core.errors import ConfigError
from fedmosaic.core.update import ClientUpdate
from fedmosaic.privacy.randomness import SecureNoise, SeededNoise
from fedmosaic.privacy.secagg.crypto import DeterministicRandom, system_random_bytes
from fedmosaic.privacy.secagg.quantize import (
    IntegerEncoder,
    Quantizer,
    check_sum_bounds,
    decode_weighted,
    weighted_row,
)
from fedmosaic.privacy.shares import shared_sum
from fedmosaic.runtime.tally import ClientFailure, PartialAggregate, Weighting
from fedmosaic.runtime.transport import EvalResult, Transport, TransportResult
from fedmosaic.train.base import FitConfig

log = logging.getLogger(__name__)

# Simulated clients' encoder randomness: their round seed XOR this (a stream of its own).
_ENCODER_SEED = 0x5A4E5


class SecretSharingTransport:
    """Wraps a transport; the server side only ever sees the combined sum of ``aggregators``
    aggregators' share sums.

    ``clip``, ``max_weight`` and ``bits`` are SecAgg+'s (``SecAggPlusTransport``): the clip of
    every submitted coordinate, the largest aggregation weight a client may claim, and the
    ring ``Z_(2^bits)`` (32 or 64; the fixed-point levels shrink with the number of clients so
    that the sum never wraps). ``simulate_dropout`` makes that fraction of clients reach only
    some aggregators (they are left out of the sum). ``seed`` makes shares and rounding
    reproducible for tests and benchmarks only; ``None`` draws them from the OS CSPRNG.
    """

    requires_streaming_aggregator = True

    def __init__(self, inner: Transport, *, aggregators: int = 2, clip: float = 1.0,
                 max_weight: float = 1.0, bits: int = 32, simulate_dropout: float = 0.0,
                 seed: int | None = None, secure_noise: bool = False) -> None:
        if isinstance(aggregators, bool) or not isinstance(aggregators, int) or \
                not 2 <= aggregators <= 16:
            raise ValueError(f"aggregators must be an integer in [2, 16], got {aggregators!r}")
        if bits not in (32, 64):
            raise ValueError(f"bits must be 32 or 64, got {bits!r}")
        check_sum_bounds(clip, max_weight)
        if not 0 <= simulate_dropout < 1:
            raise ValueError(f"simulate_dropout must be in [0, 1), got {simulate_dropout}")
        self.inner = inner
        self.aggregators, self.bits = aggregators, bits
        self.clip, self.max_weight = float(clip), float(max_weight)
        self.simulate_dropout = float(simulate_dropout)
        self.seed = seed
        self.secure_noise = bool(secure_noise)
        self._encoder_provider: Any = None
        self.last_round: dict[str, Any] = {}

    # -- configuration -----------------------------------------------------------------------
    def check_strategy(self, strategy: Any) -> None:
        """Refuse a strategy that needs individual updates; adopt its integer encoder
        (``secagg_encoder``: distributed Skellam) if it has one."""
        if not getattr(strategy.aggregator, "streaming", False):
            raise ConfigError(
                "aggregator", type(strategy.aggregator).__name__,
                "a weighted-sum aggregator under secret sharing: each aggregator sees only "
                "shares and the server only their combined sum, so an aggregator that inspects "
                "or clips individual updates (robust aggregation, central-DP clipping) cannot "
                "run; use client-side stages (distributed DP) instead")
        provider = getattr(strategy, "secagg_encoder", None)
        if provider is not None:
            self._encoder_provider = provider
            attach = getattr(strategy, "attach_secure_aggregation", None)
            if attach is not None:
                attach(self)

    def guarantees(self) -> dict[str, Any]:
        inner = getattr(self.inner, "guarantees", None)
        last = self.last_round
        return {
            **(inner() if inner is not None else {}),
            "secure_aggregation": {
                "protocol": f"additive secret sharing over {self.aggregators} aggregators "
                            "(Prio, Corrigan-Gibbs and Boneh 2017): all shares but one are "
                            "AES-256-CTR streams of 32-byte seeds",
                "ring_bits": last.get("bits", self.bits),
                "clip": self.clip, "max_weight": self.max_weight,
                "assumes": "the aggregators do not all collude (run by different "
                           "organisations); integrity is not protected (an aggregator can "
                           "alter its sum, a client can submit any in-range value)",
                "shares": "reproducible from a seed (simulation only)" if self.seed is not None
                          else "OS CSPRNG",
                "encoding": last.get("encoder") or (
                    "integer encoder supplied by the strategy" if self._encoder_provider
                    else "fixed-point Quantizer (no noise)"),
            },
            "server_sees": "only the sum of the included clients' updates (plus their count "
                           "and total weight); each aggregator sees values indistinguishable "
                           "from uniform; all aggregators together would see every update",
        }

    # -- Transport protocol ------------------------------------------------------------------
    def available_clients(self) -> list[str]:
        return self.inner.available_clients()

    def full_steps(self, client_id: str, config: FitConfig) -> int | None:
        return self.inner.full_steps(client_id, config)

    def evaluate(self, weights: torch.Tensor, client_ids: Sequence[str],
                 round_num: int) -> Iterator[EvalResult]:
        """Federated evaluation through the inner transport, outside the sharing."""
        yield from self.inner.evaluate(weights, client_ids, round_num)

    def fit(self, weights: torch.Tensor, tasks: Sequence[ClientTask],
            weighting: Weighting | None = None) -> Iterator[TransportResult]:
        if weighting is None:
            raise ConfigError("aggregator", None, "a weighted-sum aggregator under secret "
                              "sharing")
        round_num = tasks[0].config.round if tasks else 0
        by_id = {t.client_id: t for t in tasks}
        encoder: IntegerEncoder | None = None
        if self._encoder_provider is not None:
            encoder = self._encoder_provider(round_num, dim=int(weights.numel()),
                                             noise_secure=self.secure_noise)
        updates: list[ClientUpdate] = []
        for result in self.inner.fit(weights, tasks, None):
            if isinstance(result, ClientUpdate):
                updates.append(result)
            else:
                yield result  # a failure passes through
        rejected, kept = [], []
        for u in updates:
            # The client's own software refuses to submit a broken update: once shared, no
            # aggregator could tell.
            weight = float(weighting.weight_of(u))
            bad_weight = weight != 1.0 if encoder is not None else \
                not 0 < weight <= self.max_weight
            if not torch.isfinite(u.delta).all() or bad_weight:
                rejected.append(f"update from client '{u.client_id}' not submitted: non-finite "
                                f"values or weight {weight} out of range")
                continue
            kept.append((u, weight))
        if encoder is not None and len(kept) > encoder.max_clients:
            reason = (f"{len(kept)} clients submitted but the encoder's bound holds for at "
                      f"most {encoder.max_clients}; round refused before sharing")
            for u, _ in kept:
                yield ClientFailure(u.client_id, reason)
            return
        if len(kept) < 2:  # a "sum" of one update is that update
            yield PartialAggregate(weighted_sum=None, rejected=[
                *rejected, f"secret sharing needs at least 2 clients, {len(kept)} submitted"])
            return
        bits = encoder.bits if encoder is not None else self.bits
        quantizer = Quantizer(self.clip, bits=bits, num_clients=len(kept))
        rows = []
        for u, weight in kept:
            rng = self._client_rng(by_id.get(u.client_id), noise=encoder is not None)
            if encoder is not None:
                rows.append(encoder.encode(u.delta.double().numpy(), rng, round_num))
                continue
            rows.append(quantizer.encode(weighted_row(u.delta.double().numpy(), weight,
                                                      self.clip, self.max_weight), rng))
        res = shared_sum(np.stack(rows), aggregators=self.aggregators, bits=bits,
                         reached=self._dropouts(len(rows), round_num),
                         random_bytes=self._random_bytes(round_num))
        ids = [u.client_id for u, _ in kept]
        included = set(res.included)
        for i, cid in enumerate(ids):
            if i not in included:
                yield ClientFailure(cid, "did not reach every aggregator: left out of the sum")
        self.last_round = {
            "round": round_num, "clients": len(rows), "included": len(included),
            "aggregators": self.aggregators, "bits": bits,
            "bytes_up": int(res.bytes_up_per_client.sum()),
            "client_seconds": float(res.client_seconds.sum()),
            "aggregator_seconds": [float(s) for s in res.aggregator_seconds],
            **({"encoder": encoder.describe()} if encoder is not None else {}),
        }
        if len(included) < 2:  # never release one client's update as a sum
            yield PartialAggregate(weighted_sum=None, rejected=[
                *rejected, f"secret sharing needs at least 2 clients in the sum, "
                           f"{len(included)} reached every aggregator"])
            return
        members = [ids[i] for i in res.included]
        if encoder is not None:
            total = encoder.decode(res.total, round_num)
            yield PartialAggregate(
                weighted_sum=torch.from_numpy(total).to(torch.float32),
                total_weight=float(len(members)), count=len(members), num_samples=0,
                metric_sums={}, bytes_up=self.last_round["bytes_up"], client_ids=members,
                rejected=rejected)
            return
        weighted, total_weight, count = decode_weighted(quantizer.decode(res.total), self.clip,
                                                        self.max_weight)
        yield PartialAggregate(
            weighted_sum=weighted, total_weight=total_weight, count=count, num_samples=0,
            metric_sums={}, bytes_up=self.last_round["bytes_up"], client_ids=members,
            rejected=rejected)

    # -- randomness --------------------------------------------------------------------------
    def _client_rng(self, task: ClientTask | None, noise: bool) -> np.random.Generator:
        """The client's own generator: for an encoder's DP noise (``noise``) a CSPRNG
        (``SecureNoise``) unless the run is a seeded simulation; for the fixed-point
        rounding, which never leaves the client except inside the sum, NumPy's generator
        seeded from the OS (a tenth of SecureNoise's set-up cost per client)."""
        if task is not None and self.seed is not None and not self.secure_noise:
            return SeededNoise(task.config.seed ^ _ENCODER_SEED).numpy()
        return SecureNoise().numpy() if noise else np.random.default_rng()

    def _random_bytes(self, round_num: int) -> Any:
        if self.seed is None:
            return system_random_bytes
        return DeterministicRandom(self.seed * 1_000_003 + round_num, label=b"shares")

    def _dropouts(self, n: int, round_num: int) -> dict[int, int] | None:
        """Clients that reach only their first few aggregators (simulated dropouts)."""
        if self.simulate_dropout <= 0:
            return None
        rng = np.random.default_rng([0 if self.seed is None else self.seed, round_num])
        return {int(i): int(rng.integers(self.aggregators))
                for i in np.flatnonzero(rng.random(n) < self.simulate_dropout)}
