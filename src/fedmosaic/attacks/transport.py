"""``AdversarialTransport``: a transport wrapper that lets marked clients misbehave.

Honest results pass through unchanged; malicious clients' uploads are replaced by their
attack's crafted update. Everything still reaches the server through the usual path
(``RoundTally`` validation, the strategy's aggregator), exactly as a real attacker's upload
would.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import torch

from fedmosaic.algorithms.strategy import ClientTask
from fedmosaic.attacks.base import Attack, BenignStats, RoundView
from fedmosaic.core.errors import InvalidUpdateError
from fedmosaic.core.update import ClientUpdate, validate_update
from fedmosaic.runtime.tally import PartialAggregate, Weighting
from fedmosaic.runtime.transport import EvalResult, Transport, TransportResult
from fedmosaic.train.base import FitConfig

log = logging.getLogger(__name__)

# Crafted updates draw their randomness from the client's round seed, on a stream apart
# from the client stages' (``ClientTask.finish``).
_ATTACK_STREAM = 0xA77AC4


class AdversarialTransport:
    """Runs ``inner`` and replaces the uploads of the ``malicious`` clients by ``attack``.

    Data poisoning is not done here: the inner transport must already train on a federation
    from :func:`~fedmosaic.attacks.poison_federation`. When the attack alters uploads and a
    malicious client is in the round, the inner transport is called with ``weighting=None``
    so that each update arrives individually; omniscient attacks (ALIE, IPM) hold the
    malicious updates back until every benign update of the round has passed through (and
    been summarised in O(D) memory), then release the crafted ones.

    ``reported(round)`` is how many malicious clients' results reached the server in that
    round (``AttackMonitor`` records it in the run history).
    """

    def __init__(self, inner: Transport, attack: Attack, malicious: Collection[str]) -> None:
        if not isinstance(attack, Attack):
            raise TypeError(f"attack must be a fedmosaic.attacks.Attack, got "
                            f"{type(attack).__name__}")
        self.inner, self.attack = inner, attack
        self.malicious = frozenset(str(c) for c in malicious)
        unknown = self.malicious - set(inner.available_clients())
        if unknown:
            raise ValueError(f"malicious clients not known to the transport: "
                             f"{sorted(unknown)[:5]}")
        self._round, self._malicious_reported = 0, 0
        log.warning("SIMULATED ATTACK (evaluation only): %s on %d of %d clients",
                    attack.name, len(self.malicious), len(inner.available_clients()))

    # -- the Transport protocol, delegated -----------------------------------------------
    def available_clients(self) -> list[str]:
        return self.inner.available_clients()

    def full_steps(self, client_id: str, config: FitConfig) -> int | None:
        return self.inner.full_steps(client_id, config)

    def evaluate(
        self, weights: torch.Tensor, client_ids: Sequence[str], round_num: int,
    ) -> Iterator[EvalResult]:
        """Federated evaluation through the inner transport: the simulated attacks poison
        training (data or uploads), not evaluation reports, which pass through unchanged."""
        yield from self.inner.evaluate(weights, client_ids, round_num)

    @property
    def supports_dispatch(self) -> bool:
        """Whether the inner transport applies per-client dispatch transforms."""
        return bool(getattr(self.inner, "supports_dispatch", False))

    def check_strategy(self, strategy: Any) -> None:
        check = getattr(self.inner, "check_strategy", None)
        if check is not None:
            check(strategy)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()

    def guarantees(self) -> dict[str, Any]:
        """The inner transport's guarantees plus a record that this run was attacked."""
        inner = getattr(self.inner, "guarantees", None)
        out = dict(inner()) if inner is not None else {}
        out["simulated_attack"] = {
            **self.attack.describe(), "malicious_clients": len(self.malicious),
            "clients": len(self.inner.available_clients()),
            "note": "figures of this run are under a simulated attack (evaluation only)",
        }
        return out

    def reported(self, round_num: int) -> int:
        """Malicious clients whose results reached the server in ``round_num``."""
        return self._malicious_reported if round_num == self._round else 0

    # -- the round --------------------------------------------------------------------------
    def fit(
        self, weights: torch.Tensor, tasks: Sequence[ClientTask],
        weighting: Weighting | None = None,
    ) -> Iterator[TransportResult]:
        round_num = tasks[0].config.round if tasks else 0
        self._round, self._malicious_reported = round_num, 0
        seeds = {t.client_id: t.config.seed for t in tasks if t.client_id in self.malicious}
        m = len(seeds)
        if not self.attack.poisons_updates or m == 0:
            # Uploads are honest (data poisoning only): the inner transport may sum them.
            for result in self.inner.fit(weights, tasks, weighting):
                self._count(result)
                yield result
            return
        stats = BenignStats(weights.numel()) if self.attack.omniscient else None
        held: list[ClientUpdate] = []
        for result in self.inner.fit(weights, tasks, None):
            if isinstance(result, PartialAggregate):
                raise TypeError(f"{type(self.inner).__name__} returned a partial aggregate "
                                "although it was asked for individual updates")
            if isinstance(result, ClientUpdate) and result.client_id in seeds:
                if stats is None:
                    result = self._craft(result, round_num, len(tasks), m, seeds, None)
                else:
                    held.append(result)
                    continue
            elif stats is not None and isinstance(result, ClientUpdate):
                self._observe(stats, result, weights.numel(), round_num)
            self._count(result)
            yield result
        for update in held:
            if stats is not None and stats.count < self.attack.min_benign:
                log.warning("round %d: %s needs %d valid benign updates, saw %d; client %s "
                            "uploads its honest update", round_num, self.attack.name,
                            self.attack.min_benign, stats.count, update.client_id)
            else:
                update = self._craft(update, round_num, len(tasks), m, seeds, stats)
            self._count(update)
            yield update

    def _observe(self, stats: BenignStats, update: ClientUpdate, numel: int,
                 round_num: int) -> None:
        # The attackers summarise what the server would accept: a malformed benign update
        # would be rejected there, and must not poison the statistics either.
        try:
            validate_update(update, numel=numel, current_round=round_num)
        except InvalidUpdateError:
            return
        stats.add(update.delta)

    def _craft(self, update: ClientUpdate, round_num: int, n: int, m: int,
               seeds: dict[str, int], stats: BenignStats | None) -> ClientUpdate:
        gen = torch.Generator().manual_seed(seeds[update.client_id] ^ _ATTACK_STREAM)
        mean = std = None
        if stats is not None:
            mean = stats.mean
            std = stats.std() if stats.count >= 2 else None
        view = RoundView(round=round_num, n=n, m=m, generator=gen,
                         benign_count=stats.count if stats else 0,
                         benign_mean=mean, benign_std=std)
        delta = self.attack.craft_update(update.delta, view)
        return dataclasses.replace(update, delta=delta.to(torch.float32).contiguous())

    def _count(self, result: object) -> None:
        if isinstance(result, ClientUpdate):
            hit = result.client_id in self.malicious
        elif isinstance(result, PartialAggregate):
            hit = sum(1 for c in result.client_ids if c in self.malicious)
        else:
            hit = 0
        self._malicious_reported += int(hit)
