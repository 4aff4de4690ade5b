"""Transports: how the server loop reaches clients. Only this layer differs between
in-process simulation, batched or Ray simulation and a real network deployment."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch

from fedmosaic.algorithms.strategy import ClientTask
from fedmosaic.core.update import ClientUpdate
from fedmosaic.runtime.tally import ClientFailure, PartialAggregate, Weighting
from fedmosaic.train.base import FitConfig, Trainer

log = logging.getLogger(__name__)


TransportResult = ClientUpdate | ClientFailure | PartialAggregate


@runtime_checkable
class Transport(Protocol):
    """Dispatches a round's tasks and yields results as they arrive.

    A result is one client's ``ClientUpdate``, a ``ClientFailure``, or, when the server passes
    a ``weighting`` (its aggregator is a weighted sum), a ``PartialAggregate`` of several
    clients already validated and summed where they trained (Ray actors, vmapped batches).
    Without ``weighting`` the transport must yield individual updates.
    """

    def available_clients(self) -> list[str]: ...

    def full_steps(self, client_id: str, config: FitConfig) -> int | None:
        """Local steps a full fit under ``config`` takes for this client, if known."""
        ...

    def fit(
        self, weights: torch.Tensor, tasks: Sequence[ClientTask],
        weighting: Weighting | None = None,
    ) -> Iterator[TransportResult]: ...


class SequentialTransport:
    """In-process simulation: one reused model trains the selected clients one after another.

    Weights travel as tensors in memory: no serialization, no model rebuild per client.
    A client whose training raises is reported as a ``ClientFailure``; the round goes on.
    It applies a task's ``dispatch`` transform (per-client fingerprints): the client trains
    from the weights it received, and its delta is relative to them.
    """

    supports_dispatch = True

    def __init__(self, trainer: Trainer, federated_data: object) -> None:
        self.trainer = trainer
        self.data = federated_data

    def available_clients(self) -> list[str]:
        return list(self.data.client_ids)  # type: ignore[attr-defined]

    def full_steps(self, client_id: str, config: FitConfig) -> int:
        n = len(self.data.client(client_id).train)  # type: ignore[attr-defined]
        return self.trainer.full_steps(n, config)

    def fit(
        self, weights: torch.Tensor, tasks: Sequence[ClientTask],
        weighting: Weighting | None = None,
    ) -> Iterator[TransportResult]:
        # One process: individual updates cost nothing to ship, so ``weighting`` is unused.
        for task in tasks:
            try:
                train = self.data.client(task.client_id).train  # type: ignore[attr-defined]
                sent = task.received(weights)
                result = self.trainer.fit(sent, train, task.config)
                delta = task.finish(result.weights - sent)
            except Exception as exc:  # a failing client must never stop the round
                log.warning("client %s failed in round %d: %s", task.client_id,
                            task.config.round, exc)
                yield ClientFailure(task.client_id, f"{type(exc).__name__}: {exc}")
                continue
            yield ClientUpdate(
                client_id=task.client_id, delta=delta, num_samples=result.num_samples,
                base_round=task.config.round, metrics={**result.metrics, "steps": result.steps},
            )
