"""SecAggPlusTransport: aggregate a round's updates with SecAgg+ so the server learns only
their sum (Bell et al., CCS 2020; Bonawitz et al., CCS 2017).

The simulated clients train through any inner transport; then each client encodes its update
for the secure sum and the SecAgg+ protocol runs between the clients and the server through
the real message encoding (``secagg.simulate``). What the server receives is a single
``PartialAggregate`` built from the unmasked *sum*:

* each client submits ``(w_i / W) * delta_i`` clipped per coordinate to ``[-clip, clip]``,
  followed by two extra coordinates ``clip * w_i / W`` and ``clip``, where ``w_i`` is its
  aggregation weight and ``W`` the declared maximum weight; the sum then yields the weighted
  sum of the deltas, the total weight and the number of contributors, and nothing per client;
* per-client training metrics are not reported (they would leak per-client information);
* bytes on the wire are those of the protocol's messages, counted exactly.

Only aggregators that need nothing but a weighted sum can run on it: a robust aggregator
(median, Krum, ...) or central-DP clipping needs each update and is refused when the run is
configured (``check_strategy``). Combine with differential privacy through client-side stages
(each client clips and adds its share of the noise), never with server-side clipping.

Integer encoders. Instead of the float ``Quantizer`` the transport can carry an
:class:`~fedmosaic.privacy.secagg.quantize.IntegerEncoder` that each client runs itself and that
produces the ring elements directly: the distributed Skellam mechanism
(``fedmosaic.privacy.skellam``) clips, scales, rotates, rounds and adds integer noise there.
It is given as ``encoder=`` or, more usually, supplied by the strategy
(``DistributedSkellam.secagg_encoder``), which the transport picks up in ``check_strategy``.
Updates are then summed unweighted (uniform weighting), the count of contributors is the
number of SecAgg+ survivors (which the server learns from the protocol anyway), each client
draws its noise from its own generator (``SecureNoise`` with ``secure_noise=True``, otherwise
``SeededNoise`` from the client's round seed: deterministic noise, simulation only), and a
round with more submissions than the encoder's ``max_clients`` -- the size its modular-clipping
bound was designed for -- is refused before anything is masked.

FedBuff (asynchronous, simulation only). ``secure_buffer`` builds a
:class:`~fedmosaic.privacy.secagg.buffer.SecureFedBuffBuffer`: the K clients that fill a FedBuff
buffer run one SecAgg+ instance with this transport's settings, each submitting its staleness-
and sample-weighted update, and ``client_transport`` is the inner transport the asynchronous
schedule trains on (``fedmosaic.runtime.schedule.SecureBufferSource``). Integer encoders are
refused there (their noise and accounting are per synchronous round).
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Generator, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from fedmosaic.algorithms.strategy import ClientTask
from fedmosaic.core.errors import ConfigError
from fedmosaic.core.update import ClientUpdate
from fedmosaic.privacy.randomness import SecureNoise, SeededNoise
from fedmosaic.privacy.secagg.buffer import SecureFedBuffBuffer
from fedmosaic.privacy.secagg.errors import SecAggAbortError
from fedmosaic.privacy.secagg.quantize import (
    IntegerEncoder,
    check_sum_bounds,
    decode_weighted,
    weighted_row,
)
from fedmosaic.privacy.secagg.simulate import (
    DEFAULT_CORRUPTED_FRACTION,
    DROPOUT_STAGES,
    secure_sum,
    secure_sum_int,
)
from fedmosaic.runtime.tally import ClientFailure, PartialAggregate, Weighting
from fedmosaic.runtime.transport import EvalResult, Transport, TransportResult
from fedmosaic.train.base import FitConfig

log = logging.getLogger(__name__)

# Simulated clients' encoder noise: their round seed XOR this (a stream of its own).
_ENCODER_SEED = 0x5CE11A3


class SecAggPlusTransport:
    """Wraps a transport; the server side only ever sees the SecAgg+ sum of a round.

    ``clip`` bounds every submitted coordinate (after scaling by ``w_i / W``);
    ``max_weight`` is ``W``, the largest aggregation weight a client may claim (its sample
    count under FedAvg's sample weighting; 1 for uniform weighting), so that a client cannot
    inflate its influence beyond ``W``. ``dropout_rate`` is the rate the protocol parameters
    (neighbourhood degree, threshold) are designed for; ``simulate_dropout`` makes that
    fraction of clients actually drop, each at a random protocol stage. ``seed`` makes keys and
    masks reproducible for tests and benchmarks only (predictable masks protect nothing);
    ``None`` draws them from the OS CSPRNG. ``encoder`` replaces the float quantizer by an
    integer encoder run on each client (see the module docstring); ``secure_noise`` makes each
    client draw the encoder's randomness from ``SecureNoise`` (what a deployment does) instead
    of a generator seeded from its round seed.
    """

    requires_streaming_aggregator = True

    def __init__(
        self,
        inner: Transport,
        *,
        clip: float = 1.0,
        max_weight: float = 1.0,
        bits: int = 32,
        dropout_rate: float = 0.1,
        corrupted_fraction: float = DEFAULT_CORRUPTED_FRACTION,
        simulate_dropout: float = 0.0,
        seed: int | None = None,
        encoder: IntegerEncoder | None = None,
        secure_noise: bool = False,
    ) -> None:
        check_sum_bounds(clip, max_weight)
        if not 0 <= corrupted_fraction < 1:
            raise ValueError(f"corrupted_fraction must be in [0, 1), got {corrupted_fraction}")
        if not 0 <= simulate_dropout < 1:
            raise ValueError(f"simulate_dropout must be in [0, 1), got {simulate_dropout}")
        self.inner = inner
        self.clip, self.max_weight, self.bits = float(clip), float(max_weight), bits
        self.dropout_rate = max(dropout_rate, simulate_dropout)
        self.simulate_dropout = simulate_dropout
        # The fraction of members that may collude with the server; t and k are sized for it.
        self.corrupted_fraction = float(corrupted_fraction)
        self.seed = seed
        if encoder is not None and not isinstance(encoder, IntegerEncoder):
            raise TypeError(f"encoder must implement IntegerEncoder, got {type(encoder).__name__}")
        self.encoder = encoder
        self.secure_noise = bool(secure_noise)
        self._encoder_provider: Any = None
        self.last_round: dict[str, Any] = {}
        self._buffer_k: int | None = None  # set when FedBuff runs one instance per buffer

    def check_strategy(self, strategy: Any) -> None:
        """Refuse, with the reason, a strategy that needs to see individual updates, and
        adopt the strategy's integer encoder (``secagg_encoder``) if it has one (over gRPC
        ``fedmosaic.net.secagg.SecAggRoundDriver.check_strategy`` does the same)."""
        provider = getattr(strategy, "secagg_encoder", None)
        if provider is not None:
            if self.encoder is not None:
                raise ConfigError(
                    "encoder", type(self.encoder).__name__,
                    f"no encoder on the transport: {type(strategy).__name__} supplies its own "
                    "integer encoder (its accountant must match what the clients encode)")
            self._encoder_provider = provider
            attach = getattr(strategy, "attach_secure_aggregation", None)
            if attach is not None:
                attach(self)
        self._check_aggregator(strategy)

    @staticmethod
    def _check_aggregator(strategy: Any) -> None:
        aggregator = strategy.aggregator
        if not getattr(aggregator, "streaming", False):
            name = type(aggregator).__name__
            raise ConfigError(
                "aggregator", name,
                "a weighted-sum aggregator under SecAgg+: the server only learns the sum of the "
                "masked updates, so an aggregator that inspects or clips individual updates "
                "(robust aggregation, central-DP clipping) cannot run; use client-side stages "
                "(distributed DP) instead")

    def guarantees(self) -> dict[str, Any]:
        """What the secure aggregation protects, for the run report, after whatever the inner
        transport reports (e.g. that the run was under a simulated attack)."""
        last = self.last_round
        inner = getattr(self.inner, "guarantees", None)
        encoding: Any = "fixed-point Quantizer (no noise)"
        if self.encoder is not None or self._encoder_provider is not None:
            encoding = last.get("encoder") or "integer encoder supplied by the strategy"
        return {
            **(inner() if inner is not None else {}),
            "secure_aggregation": {
                "protocol": "SecAgg+ (Bell et al. 2020), pairwise and self masks, Shamir "
                            "t-of-k shares over a sparse neighbour graph",
                "ring_bits": last.get("bits", self.bits),
                "clip": self.clip, "max_weight": self.max_weight,
                "designed_dropout_rate": self.dropout_rate,
                "tolerated_corrupted_fraction": self.corrupted_fraction,
                "neighbourhood_degree": last.get("degree"), "threshold": last.get("threshold"),
                "masks": "reproducible from a seed (simulation only)" if self.seed is not None
                         else "OS CSPRNG",
                "encoding": encoding,
                **({"client_noise": self._noise_label()}
                   if self.encoder is not None or self._encoder_provider is not None else {}),
                **({"instances": f"one per FedBuff buffer of {self._buffer_k} clients, each "
                                 "told its staleness weight by the server before masking"}
                   if self._buffer_k is not None else {}),
            },
            "server_sees": "only the sum of the surviving clients' updates (plus their count "
                           "and total weight); a client's input stays hidden unless at least "
                           "the threshold of its neighbours collude with the server",
        }

    def available_clients(self) -> list[str]:
        return self.inner.available_clients()

    # -- FedBuff: one SecAgg+ instance per buffer (fedmosaic.runtime.schedule.SecureBufferSource)
    def secure_buffer(self, k: int, staleness: Any = None, weighting: str = "samples", *,
                      dim: int, device: torch.device | str | None = None) -> SecureFedBuffBuffer:
        """A FedBuff buffer of ``k`` clients summed by one SecAgg+ instance each, with this
        transport's settings (clip, ``max_weight``, bits, dropout rate and plan, corrupted
        fraction, seed); its instances report to ``last_round``. ``FedBuffSchedule`` takes it
        in place of ``FedBuffBuffer`` and trains through ``client_transport()``.

        Refused (``ConfigError``) with an integer encoder (distributed Skellam): its clients
        encode unweighted updates, and its noise calibration, minimum-contributors rule and
        accounting are those of a synchronous round (``DistributedSkellam.finish_round``),
        which a FedBuff step does not run. A ``k`` no SecAgg+ parameters exist for is refused
        too (``strategy.buffer_size``)."""
        if self.encoder is not None or self._encoder_provider is not None:
            raise ConfigError(
                "strategy.schedule", "fedbuff",
                "'sync' with an integer SecAgg+ encoder (distributed Skellam): its clients "
                "encode unweighted updates (no staleness weight), and its noise calibration, "
                "minimum contributors and privacy accounting are per synchronous round; "
                "FedBuff over SecAgg+ runs with the fixed-point quantizer only")
        self._buffer_k = int(k)
        return SecureFedBuffBuffer(
            k, staleness, weighting, dim=dim, clip=self.clip, max_weight=self.max_weight,
            bits=self.bits, dropout_rate=self.dropout_rate,
            corrupted_fraction=self.corrupted_fraction, seed=self.seed,
            dropout_plan=self._dropout_plan, report=self._note_instance, device=device)

    def client_transport(self) -> Transport:
        """The transport the clients train on before they mask (the inner one): an
        asynchronous schedule trains its tasks there and hands each update to the client's
        side of its buffer's instance, never to the server."""
        return self.inner

    def _note_instance(self, summary: dict[str, Any]) -> None:
        self.last_round = summary

    def full_steps(self, client_id: str, config: FitConfig) -> int | None:
        return self.inner.full_steps(client_id, config)

    def evaluate(
        self, weights: torch.Tensor, client_ids: Sequence[str], round_num: int,
    ) -> Iterator[EvalResult]:
        """Federated evaluation through the inner transport, outside the secure sum: each
        client's metrics and test sample count reach the server in plaintext (the run's
        guarantees say so when federated evaluation is on)."""
        yield from self.inner.evaluate(weights, client_ids, round_num)

    def fit(
        self, weights: torch.Tensor, tasks: Sequence[ClientTask],
        weighting: Weighting | None = None,
    ) -> Iterator[TransportResult]:
        if weighting is None:
            raise ConfigError("aggregator", None, "a weighted-sum aggregator under SecAgg+")
        round_num = tasks[0].config.round if tasks else 0
        encoder = self.encoder
        if encoder is None and self._encoder_provider is not None:
            encoder = self._encoder_provider(round_num, dim=int(weights.numel()),
                                             noise_secure=self.secure_noise)
        if encoder is not None:
            yield from self._fit_integer(encoder, weights, tasks, weighting, round_num)
            return
        updates = yield from self._individual_updates(weights, tasks)
        rejected, rows, ids = [], [], []
        for u in updates:
            # The client's own software refuses to submit a broken update: once masked, the
            # server could not tell.
            weight = float(weighting.weight_of(u))
            if not (torch.isfinite(u.delta).all() and 0 < weight <= self.max_weight):
                rejected.append(f"update from client '{u.client_id}' not submitted: non-finite "
                                f"values or weight {weight} outside (0, {self.max_weight}]")
                continue
            rows.append(weighted_row(u.delta.double().numpy(), weight, self.clip,
                                     self.max_weight))
            ids.append(u.client_id)
        if len(rows) < 2:
            yield PartialAggregate(weighted_sum=None, rejected=[
                *rejected, f"SecAgg+ needs at least 2 clients, {len(rows)} submitted"])
            return
        plan = self._dropout_plan(len(rows), round_num)
        try:
            res = secure_sum(np.stack(rows), clip=self.clip, bits=self.bits, dropout=plan,
                             seed=None if self.seed is None else self.seed * 1_000_003 + round_num,
                             dropout_rate=self.dropout_rate,
                             corrupted_fraction=self.corrupted_fraction)
        except SecAggAbortError as exc:
            log.warning("round %d: secure aggregation aborted: %s", round_num, exc)
            for cid in ids:
                yield ClientFailure(cid, f"secure aggregation aborted: {exc}")
            return
        survivors = set(res.survivors)
        for i, cid in enumerate(ids):
            if i not in survivors:
                yield ClientFailure(cid, "dropped out during secure aggregation")
        weighted, total_weight, count = decode_weighted(res.sum, self.clip, self.max_weight)
        self.last_round = {
            "round": round_num, "clients": len(rows), "survivors": len(survivors),
            "degree": res.degree, "threshold": res.threshold,
            "bytes_up": int(res.bytes_up_per_client.sum()),
            "bytes_down": int(res.bytes_down_per_client.sum()),
            "client_seconds": float(res.client_seconds.sum()),
            "server_seconds": float(res.server_seconds),
        }
        if count == 0:
            yield PartialAggregate(weighted_sum=None, rejected=rejected)
            return
        yield PartialAggregate(
            weighted_sum=weighted, total_weight=total_weight, count=count,
            num_samples=0, metric_sums={}, bytes_up=self.last_round["bytes_up"],
            client_ids=[ids[i] for i in sorted(survivors)], rejected=rejected)

    def _noise_label(self) -> str:
        return ("SecureNoise (ChaCha20 keyed from os.urandom on each client)" if self.secure_noise
                else "deterministic noise: simulation only (seeded from each client's round "
                     "seed, which the server knows)")

    def _client_rng(self, task: ClientTask | None) -> np.random.Generator:
        """The client's own generator for its encoder (rounding and noise)."""
        if self.secure_noise or task is None:
            return SecureNoise().numpy()
        return SeededNoise(task.config.seed ^ _ENCODER_SEED).numpy()

    def _individual_updates(
        self, weights: torch.Tensor, tasks: Sequence[ClientTask],
    ) -> Generator[TransportResult, None, list[ClientUpdate]]:
        """Train the cohort through the inner transport: failures pass through (yielded),
        updates are returned for the secure sum."""
        updates: list[ClientUpdate] = []
        for result in self.inner.fit(weights, tasks, None):
            if isinstance(result, ClientUpdate):
                updates.append(result)
            elif isinstance(result, ClientFailure):
                yield result
            else:  # pragma: no cover - the inner transport was asked for single updates
                raise TypeError(f"inner transport returned {type(result).__name__}")
        return updates

    def _fit_integer(
        self, encoder: IntegerEncoder, weights: torch.Tensor, tasks: Sequence[ClientTask],
        weighting: Weighting, round_num: int,
    ) -> Iterator[TransportResult]:
        """The round with an integer encoder: each client encodes (clip, round, noise) its
        own update into the ring; the server decodes the unmasked sum."""
        by_id = {t.client_id: t for t in tasks}
        updates = yield from self._individual_updates(weights, tasks)
        rejected: list[str] = []
        kept: list[ClientUpdate] = []
        for u in updates:
            weight = float(weighting.weight_of(u))
            if not torch.isfinite(u.delta).all() or weight != 1.0:
                rejected.append(f"update from client '{u.client_id}' not submitted: non-finite "
                                f"values or weight {weight} != 1 (an integer encoder sums "
                                "unweighted updates: use uniform weighting)")
                continue
            kept.append(u)
        if len(kept) > encoder.max_clients:
            reason = (f"{len(kept)} clients submitted but the encoder's modular-clipping bound "
                      f"holds for at most {encoder.max_clients}; round refused before masking")
            log.warning("round %d: %s", round_num, reason)
            for u in kept:
                yield ClientFailure(u.client_id, reason)
            return
        if len(kept) < 2:
            yield PartialAggregate(weighted_sum=None, rejected=[
                *rejected, f"SecAgg+ needs at least 2 clients, {len(kept)} submitted"])
            return
        encode_seconds = np.zeros(len(kept))
        rows = []
        for i, u in enumerate(kept):
            tick = time.perf_counter()
            rows.append(encoder.encode(u.delta.double().numpy(),
                                       self._client_rng(by_id.get(u.client_id)), round_num))
            encode_seconds[i] = time.perf_counter() - tick
        ids = [u.client_id for u in kept]
        plan = self._dropout_plan(len(rows), round_num)
        try:
            res = secure_sum_int(
                np.stack(rows), bits=encoder.bits, dropout=plan,
                seed=None if self.seed is None else self.seed * 1_000_003 + round_num,
                dropout_rate=self.dropout_rate, corrupted_fraction=self.corrupted_fraction)
        except SecAggAbortError as exc:
            log.warning("round %d: secure aggregation aborted: %s", round_num, exc)
            for cid in ids:
                yield ClientFailure(cid, f"secure aggregation aborted: {exc}")
            return
        survivors = sorted(res.survivors)
        for i, cid in enumerate(ids):
            if i not in set(survivors):
                yield ClientFailure(cid, "dropped out during secure aggregation")
        self.last_round = {
            "round": round_num, "clients": len(rows), "survivors": len(survivors),
            "degree": res.degree, "threshold": res.threshold,
            "bytes_up": int(res.bytes_up_per_client.sum()),
            "bytes_down": int(res.bytes_down_per_client.sum()),
            "client_seconds": float(res.client_seconds.sum() + encode_seconds.sum()),
            "server_seconds": float(res.server_seconds),
            "encoder": encoder.describe(), "bits": encoder.bits,
        }
        if not survivors:
            yield PartialAggregate(weighted_sum=None, rejected=rejected)
            return
        total = encoder.decode(res.sum, round_num)
        yield PartialAggregate(
            weighted_sum=torch.from_numpy(total).to(torch.float32),
            total_weight=float(len(survivors)), count=len(survivors), num_samples=0,
            metric_sums={}, bytes_up=self.last_round["bytes_up"],
            client_ids=[ids[i] for i in survivors], rejected=rejected)

    def _dropout_plan(self, n: int, round_num: int) -> dict[str, set[int]] | None:
        if self.simulate_dropout <= 0:
            return None
        seed = zlib.crc32(f"{self.seed}:{round_num}".encode())
        rng = np.random.default_rng(seed)
        plan: dict[str, set[int]] = {stage: set() for stage in DROPOUT_STAGES}
        for client in np.flatnonzero(rng.random(n) < self.simulate_dropout):
            plan[DROPOUT_STAGES[int(rng.integers(len(DROPOUT_STAGES)))]].add(int(client))
        return plan
