"""An in-process ``LiveTransport`` for tests of the live asynchronous schedules.

Thread-free and deterministic: time is counted in *ticks*. ``submit`` trains each task at
once (a ``SequentialTransport`` on the weights it was given) and holds the result until its
release tick, ``tick at submission + delay``; ``next_result(timeout)`` returns a released
result if one is ready now, else lets one tick pass (the wait a real transport would
block for) and returns one released then, or None. ``next_result(0)`` never lets time pass.
Results released at the same tick come out in submission order. Every call is recorded, so
tests can count the waits (no busy spin) and see what was submitted, delivered and cancelled.

The fake keeps the ``LiveTransport`` contract and checks the caller's side of it: one open
task per client (a second submission for a client with an open task is an error), and the
base weights of a task are not modified between its submission and its result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from fedmosaic.algorithms.strategy import ClientTask
from fedmosaic.core.update import ClientUpdate
from fedmosaic.runtime.tally import ClientFailure, PartialAggregate
from fedmosaic.runtime.transport import SequentialTransport, TransportResult
from fedmosaic.train.base import FitConfig, Trainer


@dataclass
class _Open:
    order: int  # submission order, among every task of this transport
    release: int  # the tick its result is ready
    version: int
    result: TransportResult
    base: torch.Tensor  # the weights the caller handed over (must stay unchanged)
    base_copy: torch.Tensor


class FakeLiveTransport:
    """See the module docstring. ``delay(client_id, k)`` is the k-th task's delay of a client
    in ticks (default 0); ``fail`` maps clients to the reason their tasks fail (after
    training, as a dropped client); ``reject`` clients' uploads are refused by the transport
    (a ``PartialAggregate`` with only ``rejected``); ``corrupt`` clients send an update with a
    NaN in it (the schedule must reject it); ``offline`` clients are refused at submission;
    ``claim_base``, if set, is the base version every update claims (a client's word, which
    the schedule must ignore); ``stray`` results are returned first, as if they had ended,
    though no open task is theirs (a transport breaking its contract)."""

    def __init__(self, trainer: Trainer, federated_data: Any, *,
                 delay: Callable[[str, int], int] | dict[str, int] | None = None,
                 fail: dict[str, str] | None = None, reject: set[str] | None = None,
                 corrupt: set[str] | None = None, offline: set[str] | None = None,
                 claim_base: int | None = None,
                 stray: Sequence[tuple[str, TransportResult]] = ()) -> None:
        self.inner = SequentialTransport(trainer, federated_data)
        if isinstance(delay, dict):
            table = dict(delay)
            self.delay: Callable[[str, int], int] = lambda cid, k: table.get(cid, 0)
        else:
            self.delay = delay or (lambda cid, k: 0)
        self.fail, self.reject = dict(fail or {}), set(reject or ())
        self.corrupt, self.offline = set(corrupt or ()), set(offline or ())
        self.claim_base = claim_base
        self.stray = list(stray)
        self.tick = 0
        self.open: dict[str, _Open] = {}
        self._order = 0
        self._tasks_of: dict[str, int] = {}
        self.calls: list[float] = []  # the timeout of every next_result call
        self.submitted: list[tuple[str, int, int]] = []  # (client, version, config round)
        self.delivered: list[tuple[str, int, str]] = []  # (client, version, result kind)
        self.cancelled: list[tuple[str, list[str]]] = []  # (reason, clients still open)
        self.refused = 0  # tasks refused at submission
        self.bases: dict[int, torch.Tensor] = {}  # version -> the weights first sent for it

    # -- Transport (what Server needs besides the live part) ---------------------------------
    def available_clients(self) -> list[str]:
        return self.inner.available_clients()

    def full_steps(self, client_id: str, config: FitConfig) -> int:
        return self.inner.full_steps(client_id, config)

    def fit(self, weights: torch.Tensor, tasks: Sequence[ClientTask],
            weighting: Any = None) -> Iterator[TransportResult]:
        raise AssertionError("a live schedule must never call fit")

    def evaluate(self, weights: torch.Tensor, client_ids: Sequence[str],
                 round_num: int) -> Iterator[Any]:
        return self.inner.evaluate(weights, client_ids, round_num)

    # -- LiveTransport ----------------------------------------------------------------------
    def submit(self, weights: torch.Tensor, version: int,
               tasks: Sequence[ClientTask]) -> list[ClientFailure]:
        failures = []
        for task in tasks:
            cid = task.client_id
            if cid in self.offline:
                failures.append(ClientFailure(cid, "not connected"))
                self.refused += 1
                continue
            if cid in self.open:
                raise AssertionError(f"client {cid} was given a second task while one is open")
            self.submitted.append((cid, version, task.config.round))
            self.bases.setdefault(version, weights.clone())
            result = next(iter(self.inner.fit(weights, [task])))
            if self.claim_base is not None and isinstance(result, ClientUpdate):
                result = replace(result, base_round=self.claim_base)
            if cid in self.fail:
                result = ClientFailure(cid, self.fail[cid])
            elif cid in self.reject:
                result = PartialAggregate(weighted_sum=None, rejected=[
                    f"update from client '{cid}' rejected: wrong task id"])
            elif cid in self.corrupt and isinstance(result, ClientUpdate):
                delta = result.delta.clone()
                delta[0] = float("nan")
                result = replace(result, delta=delta)
            k = self._tasks_of.get(cid, 0)
            self._tasks_of[cid] = k + 1
            self.open[cid] = _Open(self._order, self.tick + int(self.delay(cid, k)), version,
                                   result, weights, weights.clone())
            self._order += 1
        return failures

    def _ready(self) -> tuple[str, _Open] | None:
        ready = [(o.release, o.order, cid) for cid, o in self.open.items()
                 if o.release <= self.tick]
        if not ready:
            return None
        cid = min(ready)[2]
        return cid, self.open.pop(cid)

    def next_result(self, timeout: float) -> tuple[str, TransportResult] | None:
        self.calls.append(timeout)
        if self.stray:
            return self.stray.pop(0)
        got = self._ready()
        if got is None and timeout > 0:
            self.tick += 1  # the caller waited: time passes
            got = self._ready()
        if got is None:
            return None
        cid, task = got
        if not torch.equal(task.base, task.base_copy):
            raise AssertionError(f"the base weights of client {cid}'s task were modified")
        self.delivered.append((cid, task.version, type(task.result).__name__))
        return cid, task.result

    def cancel_all(self, reason: str) -> None:
        self.cancelled.append((reason, sorted(self.open)))
        self.open.clear()
