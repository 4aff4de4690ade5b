"""Schedules: when the server dispatches work to clients and when it takes a server step.

The server core (``runtime/server.py``) is event-driven: it pops events from a queue ordered
by simulated time (an update arrived, a round's cohort is complete) and hands each to its
``Schedule``, which decides what to dispatch and when to aggregate. A server step
(``Server.commit``) turns the aggregate into the next model *version*: server stages,
evaluation, the record, the checkpoint and the callbacks are per step, whatever the schedule.

``SyncSchedule`` is synchronous federated learning (McMahan et al. 2017): every step samples a
cohort, waits for all of it and aggregates. It reproduces the synchronous loop the server had
before the core became event-driven, bit for bit (same generator draws in the same order, same
records and checkpoints; ``tests/runtime/test_schedules.py`` compares it with a frozen copy).
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from fedmosaic.core.errors import RoundFailedError
from fedmosaic.runtime.tally import RoundTally

if TYPE_CHECKING:
    from fedmosaic.runtime.server import RunState, Server

__all__ = ["Event", "EventQueue", "Schedule", "SyncSchedule"]


@dataclass(order=True)
class Event:
    """Something that happens at simulated time ``time``: events at the same time are handled
    in the order they were scheduled (``seq``), so a run is deterministic."""

    time: float
    seq: int
    kind: str = field(compare=False)
    payload: Any = field(compare=False, default=None)


class EventQueue:
    """The server's pending events, earliest first (a binary heap)."""

    def __init__(self) -> None:
        self._heap: list[Event] = []
        self._seq = 0

    def push(self, at: float, kind: str, payload: Any = None) -> Event:
        event = Event(float(at), self._seq, kind, payload)
        self._seq += 1
        heapq.heappush(self._heap, event)
        return event

    def pop(self) -> Event | None:
        return heapq.heappop(self._heap) if self._heap else None

    def next_time(self) -> float | None:
        """When the next event happens (None: nothing pending)."""
        return self._heap[0].time if self._heap else None

    def pending(self) -> list[Event]:
        """The pending events in the order they will be handled (for checkpoints)."""
        return sorted(self._heap)

    def __len__(self) -> int:
        return len(self._heap)


class Schedule(Protocol):
    """Decides, event by event, what the server dispatches and when it takes a step.

    ``start`` schedules the first events of a run (fresh or resumed); ``handle`` reacts to one
    event (it may dispatch work through the server and call ``Server.commit``); ``settle`` is
    called when every event of one simulated instant has been handled (a schedule that keeps
    clients busy refills here, so that updates arriving together are all aggregated before
    anyone is sent the next model). ``describe`` is the schedule's part of the run identity
    (None for the synchronous schedule, so that runs made before schedules existed keep their
    identity); ``check`` refuses, at construction, a server set-up the schedule cannot run.
    """

    name: str

    def describe(self) -> dict[str, Any] | None: ...

    def check(self, server: Server) -> None: ...

    def start(self, server: Server, state: RunState) -> None: ...

    def handle(self, server: Server, state: RunState, event: Event) -> None: ...

    def settle(self, server: Server, state: RunState) -> None: ...


@dataclass
class _Cohort:
    """A synchronous round in flight: what its completion needs to take the step."""

    round_num: int
    start: float  # perf_counter at the round's start (its record's wall_time)
    tasks: int
    tally: RoundTally
    shortfall: dict[str, Any]
    extra_record: dict[str, Any] = field(default_factory=dict)


class SyncSchedule:
    """Synchronous rounds: sample a cohort, dispatch it, wait for every result, aggregate.

    One round is two events: ``round`` (the strategy samples and configures the cohort and the
    transport trains it; results stream into a ``RoundTally``) and ``round_done`` (the strategy
    finishes the round and the server commits the step). The round's model version is the
    number of completed rounds, so ``ClientUpdate.base_round`` is the round a client trained
    in (its base model is version ``base_round - 1``).
    """

    name = "sync"

    def describe(self) -> dict[str, Any] | None:
        return None

    def check(self, server: Server) -> None:
        return None

    def start(self, server: Server, state: RunState) -> None:
        server.events.push(state.sim_time, "round")

    def settle(self, server: Server, state: RunState) -> None:
        return None

    def handle(self, server: Server, state: RunState, event: Event) -> None:
        if event.kind == "round":
            self._dispatch(server, state)
        elif event.kind == "round_done":
            self._finish(server, state, event.payload)
        else:  # pragma: no cover - only this schedule pushes events for itself
            raise ValueError(f"the synchronous schedule has no event {event.kind!r}")

    def _dispatch(self, server: Server, state: RunState) -> None:
        round_num = state.round + 1
        start = time.perf_counter()
        available = server.transport.available_clients()
        s = server.strategy
        shortfall = server.cohort_shortfall(available)
        s.before_round(round_num, available)  # may stop the run (privacy budget)
        full_steps = None
        if s.straggler_fraction > 0:
            probe = s.fit_config(round_num, seed=0)
            full_steps = {c: server.transport.full_steps(c, probe) for c in available}
        tasks = s.configure_fit(round_num, available, state.rng, run_seed=server.seed,
                                full_steps=full_steps)
        if getattr(s, "dispatch_transform", None) is not None:
            tasks = [replace(t, dispatch=s.dispatch_transform) for t in tasks]
        weights = state.weights
        tally = RoundTally(s.aggregator, server.spec.numel, round_num, device=weights.device)
        weighting = s.aggregator if getattr(s.aggregator, "streaming", False) else None
        for result in server.transport.fit(weights, tasks, weighting):
            tally.add(result)
        cohort = _Cohort(round_num, start, len(tasks), tally, shortfall)
        server.events.push(state.sim_time, "round_done", cohort)

    def _finish(self, server: Server, state: RunState, cohort: _Cohort) -> None:
        s, tally, round_num = server.strategy, cohort.tally, cohort.round_num
        if tally.count < s.min_updates:
            raise RoundFailedError(
                f"round {round_num}: {tally.count} valid updates, strategy needs at least "
                f"{s.min_updates} ({len(tally.failures)} clients failed, "
                f"{len(tally.rejected)} rejected)"
            )
        weights, extra = s.finish_round(round_num, state.weights, tally)
        head: dict[str, Any] = {
            "round": round_num,
            "clients_selected": cohort.tasks,
            "updates": tally.count,
            "failures": len(tally.failures),
            "rejected": len(tally.rejected),
            "bytes_down": cohort.tasks * server.spec.nbytes,
            "bytes_up": tally.bytes_up,
            **cohort.shortfall,
        }
        server.commit(state, weights, head=head, client_metrics=tally.mean_metrics(),
                      extra=extra, tail=cohort.extra_record, start=cohort.start)
        server.events.push(state.sim_time, "round")
