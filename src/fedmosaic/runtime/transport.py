"""Transports: how the server loop reaches clients. Only this layer differs between
in-process simulation, batched or Ray simulation and a real network deployment."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch

from fedmosaic.algorithms.strategy import ClientTask
from fedmosaic.core.update import ClientUpdate
from fedmosaic.runtime.evaluation import EvalReport
from fedmosaic.runtime.tally import ClientFailure, PartialAggregate, Weighting
from fedmosaic.train.base import FitConfig, Trainer

log = logging.getLogger(__name__)


TransportResult = ClientUpdate | ClientFailure | PartialAggregate
EvalResult = EvalReport | ClientFailure


@runtime_checkable
class Transport(Protocol):
    """Dispatches a round's tasks and yields results as they arrive.

    A result is one client's ``ClientUpdate``, a ``ClientFailure``, or, when the server passes
    a ``weighting`` (its aggregator is a weighted sum), a ``PartialAggregate`` of several
    clients already validated and summed where they trained (Ray actors, vmapped batches).
    Without ``weighting`` the transport must yield individual updates.

    ``evaluate`` is federated evaluation: each named client evaluates ``weights`` on its
    local test split and the transport yields one ``EvalReport`` (sample count and metrics)
    or one ``ClientFailure`` per client (a client without a test split, a raising trainer,
    a client that does not answer); it never raises for one client's problem.
    """

    def available_clients(self) -> list[str]: ...

    def full_steps(self, client_id: str, config: FitConfig) -> int | None:
        """Local steps a full fit under ``config`` takes for this client, if known."""
        ...

    def fit(
        self, weights: torch.Tensor, tasks: Sequence[ClientTask],
        weighting: Weighting | None = None,
    ) -> Iterator[TransportResult]: ...

    def evaluate(
        self, weights: torch.Tensor, client_ids: Sequence[str], round_num: int,
    ) -> Iterator[EvalResult]: ...


@runtime_checkable
class LiveTransport(Protocol):
    """A transport whose results arrive in real time (real clients): tasks are submitted
    without waiting, and results are collected one at a time as they come.

    The asynchronous schedules run over it in *live* mode (``FedBuffSchedule(...,
    live=True)``, ``runtime/schedule.py``): the server loop submits a task whenever a client
    is free and blocks on ``next_result`` with a short timeout between events, so slow or
    silent clients never block the federation. The schedule keeps at most one open task per
    client and matches each result to its task by client id; the task's base version (hence
    its staleness) is the server's own record, never the client's word.

    Contract, besides the methods' own:

    - **Task ids are per server instance.** A task submitted by one transport instance can
      only be answered to that instance; after a restart (``kill -9`` and resume from the
      last checkpoint) the tasks of the previous instance are unknown, and their late uploads
      must be refused by the transport, never delivered. A resumed run submits fresh tasks
      from the checkpoint's version, so no update is ever applied twice.
    - **Every open task ends.** A task that is neither answered nor failed at once yields
      exactly one result, eventually: the transport's deadline and liveness checks turn a
      silent client into a ``ClientFailure``; ``cancel_all`` ends the rest without results.
    - **Evaluation leaves tasks open.** ``Server`` may call the transport's ``evaluate``
      (federated evaluation) between steps while fit tasks are open; that must not end them.
    """

    def available_clients(self) -> list[str]:
        """Connected clients (blocks until the minimum is connected, or raises
        ``RoundFailedError``, as ``Transport.available_clients``)."""
        ...

    def submit(self, weights: torch.Tensor, version: int,
               tasks: Sequence[ClientTask]) -> list[ClientFailure]:
        """Hand each task to its client (non-blocking); ``weights`` is model version
        ``version``, the base of every task (the caller must not modify it afterwards).
        Returns the tasks that failed at once (client not connected); every other task later
        yields exactly one result from ``next_result``."""
        ...

    def next_result(self, timeout: float) -> tuple[str, TransportResult] | None:
        """(client_id, result) of the next task that ended: a ``ClientUpdate`` (its tensors
        owned by the caller), a ``ClientFailure`` (dropped, deadline, refused, training
        failed) or a ``PartialAggregate`` with only ``rejected`` (an invalid update); None if
        none ended within ``timeout`` seconds."""
        ...

    def cancel_all(self, reason: str) -> None:
        """End every open task now (run finished or stopped); their results are never
        delivered."""
        ...


class SequentialTransport:
    """In-process simulation: one reused model trains the selected clients one after another.

    Weights travel as tensors in memory: no serialization, no model rebuild per client.
    A client whose training raises is reported as a ``ClientFailure``; the round goes on.
    ``evaluate`` runs the trainer's ``evaluate`` on each client's ``ClientData.test``.
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

    def evaluate(
        self, weights: torch.Tensor, client_ids: Sequence[str], round_num: int,
    ) -> Iterator[EvalResult]:
        """Each client evaluates ``weights`` on its local test split, one after another."""
        for cid in client_ids:
            yield evaluate_client(self.trainer, self.data, weights, cid, round_num)


def evaluate_client(
    trainer: Trainer, federated_data: object, weights: torch.Tensor, client_id: str,
    round_num: int,
) -> EvalResult:
    """One client's federated evaluation in process: its report, or why there is none."""
    try:
        test = federated_data.client(client_id).test  # type: ignore[attr-defined]
        if test is None or len(test) == 0:
            return ClientFailure(client_id, "no local test split")
        metrics = dict(trainer.evaluate(weights, test))
        # The trainer counts the samples itself; the client reports its split's size.
        metrics.pop("num_samples", None)
        return EvalReport(client_id, len(test), {str(k): float(v) for k, v in metrics.items()})
    except Exception as exc:  # a failing client must never stop the evaluation
        log.warning("client %s failed to evaluate round %d: %s", client_id, round_num, exc)
        return ClientFailure(client_id, f"{type(exc).__name__}: {exc}")
