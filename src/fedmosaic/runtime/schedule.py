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

``FedBuffSchedule`` and ``FedAsyncSchedule`` run in simulation (results computed here, arrival
times from a virtual clock) or, with ``live=True``, over real clients through a
``LiveTransport``: then their events are stamped with the run's real elapsed time, and the
loop blocks, briefly, on the transport for the next result (see ``_AsyncSchedule``).
"""

from __future__ import annotations

import copy
import heapq
import logging
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

from fedmosaic.algorithms.fedasync import FedAsyncMixer
from fedmosaic.algorithms.fedbuff import FedBuffBuffer
from fedmosaic.algorithms.staleness import InverseSqrtStaleness, staleness_of
from fedmosaic.algorithms.strategy import ClientTask, client_seed
from fedmosaic.core.errors import (
    CheckpointError,
    ConfigError,
    InvalidUpdateError,
    RoundFailedError,
)
from fedmosaic.core.update import ClientUpdate
from fedmosaic.runtime.clock import round_duration
from fedmosaic.runtime.tally import ClientFailure, RoundTally
from fedmosaic.runtime.transport import LiveTransport, Transport

if TYPE_CHECKING:
    from fedmosaic.runtime.server import RunState, Server

__all__ = ["Event", "EventQueue", "FedAsyncSchedule", "FedBuffSchedule", "Schedule",
           "SecureBufferSource", "SyncSchedule", "UpdateBuffer"]

log = logging.getLogger(__name__)


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
        # (time, seq, event): the heap compares plain tuples (seq is unique, so never the
        # events), much cheaper than the dataclass's generated comparisons.
        self._heap: list[tuple[float, int, Event]] = []
        self._seq = 0

    def push(self, at: float, kind: str, payload: Any = None) -> Event:
        event = Event(float(at), self._seq, kind, payload)
        self._seq += 1
        heapq.heappush(self._heap, (event.time, event.seq, event))
        return event

    def pop(self) -> Event | None:
        return heapq.heappop(self._heap)[2] if self._heap else None

    def next_time(self) -> float | None:
        """When the next event happens (None: nothing pending)."""
        return self._heap[0][0] if self._heap else None

    def pending(self) -> list[Event]:
        """The pending events in the order they will be handled (for checkpoints)."""
        return [item[2] for item in sorted(self._heap)]

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
    number of completed rounds; a synchronous task's ``FitConfig.round`` (and its update's
    ``base_round``) is the round it trains in, so its base model is version ``round - 1``.

    With a ``clock`` (a ``ClientTimingModel``, or a factory of one taking the model's size in
    bytes) the round happens in simulated time, so that it compares fairly with the
    asynchronous schedules: only clients online at the round's start are sampled, the round
    lasts until its slowest client reports (``round_duration``), and with the clock's
    ``deadline`` clients later than that, or that went offline, are dropped (failures); the
    record gets ``sim_time`` (at the end of the round) and ``dropped_late``. The cohort then
    trains without partial sums (each client's duration needs its own sample count and steps),
    which changes the model only by float rounding on transports that sum where they train.
    """

    name = "sync"

    def __init__(self, clock: ClockLike = None) -> None:
        self.clock = clock

    def describe(self) -> dict[str, Any] | None:
        return None  # the clock is in the identity through the experiment's [clock] table

    def check(self, server: Server) -> None:
        self.clock = _bind_clock(self.clock, server.spec.nbytes)

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
        clock = self.clock
        if clock is not None:
            everyone = available
            available = [c for c in everyone if clock.available(c, state.sim_time)]
            if not available and everyone:  # nobody online: the round starts when one is
                wake = min(clock.next_available(c, state.sim_time) for c in everyone)
                if wake < float("inf"):
                    server.events.push(wake, "round")
                    return
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
        results = server.transport.fit(weights, tasks, weighting if clock is None else None)
        if clock is None:
            for result in results:
                tally.add(result)
            cohort = _Cohort(round_num, start, len(tasks), tally, shortfall)
            server.events.push(state.sim_time, "round_done", cohort)
            return
        # Under the clock: each client's arrival time, then the round waits for the slowest
        # (or its deadline) and only the clients back in time count.
        configs = {t.client_id: t.config for t in tasks}
        arrived, durations = [], {}
        for result in results:
            arrived.append(result)
            cid = getattr(result, "client_id", None)
            if isinstance(result, ClientUpdate) and cid in configs:
                samples, steps = task_work(result, configs[cid], server.trainer)
                out = clock.outcome(cid, round_num, state.sim_time, samples, steps)
                durations[cid] = out.end - state.sim_time if out.completed else float("inf")
        seconds, dropped = round_duration(durations, clock.deadline)
        late = set(dropped)
        for result in arrived:
            cid = getattr(result, "client_id", None)
            if cid in late and isinstance(result, ClientUpdate):
                tally.add(ClientFailure(cid, "missed the round deadline"
                                        if durations[cid] < float("inf") else "went offline"))
            else:
                tally.add(result)
        cohort = _Cohort(round_num, start, len(tasks), tally, shortfall,
                         {"sim_time": state.sim_time + seconds, "dropped_late": len(late)})
        server.events.push(state.sim_time + seconds, "round_done", cohort)

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


# -- asynchronous schedules -------------------------------------------------------------------
def task_seed(run_seed: int, round_num: int, client_id: str, repeat: int) -> int:
    """A client's training seed for a task from base version ``round_num - 1``: the
    synchronous ``client_seed`` for its first such task (so that an asynchronous run without
    staleness trains exactly as synchronous rounds do), a distinct one for each later task of
    the same client from the same version (else it would repeat its update bit for bit)."""
    if repeat == 0:
        return client_seed(run_seed, round_num, client_id)
    entropy = [run_seed, round_num, zlib.crc32(client_id.encode()), repeat]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _sample(available: Sequence[str], k: int, rng: np.random.Generator) -> list[str]:
    """``k`` of ``available`` uniformly without replacement, sorted: the same draw as
    ``ClientSampler.sample`` (sorted ids, ``rng.choice``, sorted result)."""
    ids = sorted(available)
    picked = rng.choice(len(ids), size=k, replace=False)
    return [ids[i] for i in np.sort(picked)]


@dataclass
class _Task:
    """A dispatched task, delivered at its simulated arrival time. A client's fit is a pure
    function of (base weights, data, config), so its result is computed either at dispatch
    (eager) or, with lazy batching, only when the first task of its base version is about to
    arrive (``result`` is None until then; ``client_task`` is what to train)."""

    seq: int
    client_id: str
    base_version: int
    result: Any  # ClientUpdate | ClientFailure | None (not trained yet)
    dispatched: float
    completed: bool = True
    # The model it was dispatched with: FedAsync mixes x_base + delta, lazy batching trains
    # from it, and a checkpoint keeps it so that a resumed run can recompute the task.
    base_weights: torch.Tensor | None = None
    config_round: int = 0
    seed: int | None = None
    client_task: ClientTask | None = None  # set while the result is not computed
    arrive: float = 0.0
    work: tuple[int, int] | None = None  # predicted (samples, steps) its arrival came from


ClockLike = Any  # a fedmosaic.runtime.clock.ClientTimingModel, or a factory model_bytes -> one


def _bind_clock(clock: ClockLike, model_bytes: int) -> Any:
    """A timing model given as a factory (``build_schedule``'s, which needs the model size)
    is built once the server knows the model."""
    if clock is None or hasattr(clock, "outcome"):
        return clock
    return clock(model_bytes)


def task_work(update: Any, config: Any, trainer: Any) -> tuple[int, int]:
    """(samples processed, optimizer steps) of a finished task, for the timing model: the
    client's sample count times its epochs (the task's, else the trainer's), and the steps it
    reported."""
    steps = int(update.metrics.get("steps", 1)) if hasattr(update, "metrics") else 1
    return _work(int(update.num_samples), steps, config, trainer)


def _work(num_samples: int, steps: int, config: Any, trainer: Any) -> tuple[int, int]:
    """(samples processed, optimizer steps) for the timing model, as ``task_work``."""
    epochs = config.epochs if config.epochs is not None else getattr(trainer, "epochs", 1)
    return int(num_samples) * int(epochs or 1), max(int(steps), 1)


def predicted_work(server: Server, task: ClientTask,
                   transport: Any = None) -> tuple[int, int] | None:
    """(samples, steps) that ``task_work`` will give for ``task``'s result, known before
    training: the client's training-set size (``Transport.num_samples`` if the transport has
    it, else the size of its in-process data) and ``Transport.full_steps`` capped by the
    task's ``max_steps``. None where the transport cannot tell (a real network: clients
    straggle for real) or the client cannot train at all (unknown, no data: it fails at once,
    as an eager task does)."""
    # ``transport``: the one the task trains on (default the server's; FedBuff under SecAgg+
    # trains on the secure transport's inner one).
    transport = server.transport if transport is None else transport
    cid, cfg = task.client_id, task.config
    try:
        steps = transport.full_steps(cid, cfg)
        count = getattr(transport, "num_samples", None)
        if callable(count):
            n = count(cid)
        else:
            data = getattr(transport, "data", None)
            n = len(data.client(cid).train) if data is not None else None
    except Exception:  # an unknown client: trained eagerly, and fails there, at dispatch
        return None
    if steps is None or n is None or n < 1:
        return None
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    return _work(n, steps, cfg, server.trainer)


@runtime_checkable
class AsyncPrivacy(Protocol):
    """A DP strategy that releases and accounts each asynchronous server step
    (``fedmosaic.privacy.async_dp.AsyncDPFedAvg``): FedBuff's buffer becomes its
    ``dp_buffer`` (clip, noise on the sum, fixed K), FedAsync's update its
    ``release_update`` (clipped and noised before mixing)."""

    def check_schedule(self, schedule: str) -> None: ...

    def bind(self, run_seed: int) -> None: ...

    def dp_buffer(self, inner: FedBuffBuffer) -> UpdateBuffer: ...

    def release_update(self, update: ClientUpdate, staleness: int,
                       dim: int) -> tuple[ClientUpdate, dict[str, Any]]: ...


def _check_async_dp(server: Server, schedule: str) -> None:
    """Central DP under an asynchronous schedule: only a strategy that accounts each server
    step (``AsyncPrivacy``), and in simulation at least K clients for FedBuff (a DP buffer
    takes one update per client)."""
    s = server.strategy
    if not isinstance(s, AsyncPrivacy):
        raise ConfigError("strategy.schedule", schedule, "'sync' for this DP strategy "
                          f"({type(s).__name__}): its accounting assumes sampled synchronous "
                          "rounds (distributed DP: noise shares summed over one synchronous "
                          "cohort); central DP under FedBuff or FedAsync is AsyncDPFedAvg "
                          "(fedmosaic.privacy.async_dp; [privacy] mode = 'central' builds it)")
    s.check_schedule(schedule)
    s.bind(server.seed)
    sched = server.schedule
    if isinstance(sched, FedBuffSchedule) and not sched.live:
        population = len(server.transport.available_clients())
        if population < sched.buffer_size:
            raise ConfigError("strategy.buffer_size", sched.buffer_size,
                              f"at most the {population} clients under DP (a DP buffer takes "
                              "at most one update per client)")


def refuse_async(server: Server, schedule: str) -> None:
    """Refuse, with the reason, what an asynchronous schedule cannot run soundly yet."""
    s, transport = server.strategy, server.transport
    guarantees = getattr(transport, "guarantees", None)
    if guarantees is not None and guarantees().get("secure_aggregation"):
        refusal = _secure_aggregation_refusal(server, schedule)
        if refusal is not None:
            raise ConfigError("strategy.schedule", schedule, refusal)
    if s.guarantees().get("differential_privacy"):
        _check_async_dp(server, schedule)
    if s.defence is not None:
        raise ConfigError("strategy.schedule", schedule, "'sync' with a robust aggregator or "
                          "anomaly detection: they compare a whole cohort of updates, which an "
                          "asynchronous step does not have (not yet supported)")
    if s.straggler_fraction > 0:
        raise ConfigError("strategy.stragglers", s.straggler_fraction, "0 with an asynchronous "
                          "schedule: slow clients come from the clock ([clock]), not from "
                          "truncated local work")


def _secure_aggregation_refusal(server: Server, schedule: str) -> str | None:
    """Why an asynchronous schedule cannot run over this secure-aggregation transport (what
    it should be instead), or None: FedBuff in simulation over a ``SecureBufferSource`` runs
    one SecAgg+ instance per buffer."""
    if schedule != "fedbuff":
        return ("'sync' or 'fedbuff' with secure aggregation: FedAsync takes a server step on "
                "each update alone, so there is no sum over several clients to mask")
    if isinstance(server.schedule, FedBuffSchedule) and server.schedule.live:
        return ("'sync' with secure aggregation on fedmosaic server: SecAgg+ over each FedBuff "
                "buffer runs in simulation only (fedmosaic run); over gRPC a SecAgg+ instance "
                "is one synchronous cohort (net/secagg.py), with no per-buffer instance among "
                "asynchronous clients yet")
    if not isinstance(server.transport, SecureBufferSource):
        return (f"'sync' with {type(server.transport).__name__}: it reports secure aggregation "
                "but cannot run it per FedBuff buffer (no SecureBufferSource.secure_buffer; "
                "SecAggPlusTransport can)")
    return None


class _AsyncSchedule(ABC):
    """Keeps ``concurrency`` clients training; each arrival goes to ``_arrive``.

    Dispatch happens when every event of a simulated instant has been handled (``settle``),
    from the model current then: clients that finish together are all aggregated before
    anyone is sent the next model. Clients are drawn uniformly from the available ones not
    training (the clock's availability windows apply) with the run's generator. Without a
    clock every task takes no simulated time.

    **Lazy batching** (``lazy=True``, the default). A task's arrival time needs only its
    sample count and steps (``predicted_work``), known before training, so a dispatch only
    schedules the arrival. When a task is about to be delivered, every pending task with the
    same base version (up to ``lazy_chunk``, soonest arrivals first) trains in one
    ``Transport.fit`` call (batched transports vmap it) and the results wait for their own
    arrival times. Between two FedBuff steps every refill shares one base version, so batches
    of about ``buffer_size`` form where eager dispatch trained one client at a time; tasks
    that drop off-line before finishing are never trained. Each fit is a pure function of
    (base weights, data, config) and training draws nothing from the run's generator, so the
    results are the eager ones bit for bit on ``SequentialTransport`` (on a batched transport,
    up to the float rounding of another cohort composition). Two exceptions, both eager:
    a stateful trainer (``accounting_state``: a DP-SGD trainer's per-client spend follows the
    order of fits) and a task whose work the transport cannot predict (``full_steps`` None,
    unknown client). One difference remains under a clock: a client whose training *raises*
    is reported at its predicted arrival time instead of at dispatch (eager: the failure is
    known when it is computed). If a fit reports other work than predicted (a trainer whose
    ``full_steps`` disagrees with its ``fit``), lazy batching is switched off for the rest of
    the run with a warning, since that task's arrival time came from the prediction.
    ``lazy=False`` trains every dispatch at once (the behaviour before lazy batching).

    **Live mode** (``live=True``: ``fedmosaic server``, real clients over a ``LiveTransport``).
    Results arrive in real time, so nothing is trained or timed here: a dispatch *submits*
    each task (``LiveTransport.submit``, base weights the current version, one copy per
    version shared by its tasks) and returns at once. Arrivals come through the same
    ``Server.run`` loop: while tasks are open, one ``await`` event is pending; handling it
    blocks on ``next_result(poll)`` (``poll`` seconds at most, so the loop never spins and
    never waits on one client), then collects without waiting whatever else has already
    ended, and pushes each as a ``result`` event of one instant; once they are handled,
    ``settle`` refills the free places (a client that finishes gets new work at once) and
    pushes the next ``await``. A result is matched to its open task by client id (one task
    per client at a time); its staleness is the current version minus the version the task
    was submitted with (the server's record, never the client's); then it is taken as in
    simulation (``_arrive``; failures and rejected updates free the place and count in the
    step's record). ``sim_time`` in the records is the run's real elapsed time in seconds
    (from ``time.monotonic``), summed over restarts: a resumed run continues from the
    checkpoint's value and the time the server was down is not counted. When the last step
    is taken, or anything raises out of the schedule, every open task is ended with
    ``LiveTransport.cancel_all``. (``Server.run``'s ``stop_after``, a test hook for
    interruptions, leaves them open, as a kill does.) A live schedule takes no ``[clock]``
    and needs a ``LiveTransport`` (``check`` refuses anything else).

    Checkpoints in live mode hold no task in flight: its update would be computed on a
    remote machine after the checkpoint, and cannot be recomputed. FedBuff's buffer is
    empty at every checkpoint (a step is checkpointed right after its buffer is flushed).
    A run resumed from a checkpoint (a restarted server) therefore submits fresh tasks from
    the checkpoint's version: the work in flight when the server stopped, and the updates
    buffered since the last step, are lost (clients' time, never an applied update), and no
    update is applied twice, since a task of the previous server instance is unknown to
    the new one (``LiveTransport``: task ids are per server instance).
    """

    name = "async"

    def __init__(self, concurrency: int, clock: ClockLike = None, *, lazy: bool = True,
                 lazy_chunk: int = 256, live: bool = False, poll: float = 0.5) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be an integer >= 1, got {concurrency!r}")
        if isinstance(lazy_chunk, bool) or not isinstance(lazy_chunk, int) or lazy_chunk < 1:
            raise ValueError(f"lazy_chunk must be an integer >= 1, got {lazy_chunk!r}")
        if isinstance(poll, bool) or not isinstance(poll, (int, float)) or \
                not 0 < poll < float("inf"):
            raise ValueError(f"poll must be a number of seconds > 0, got {poll!r}")
        self.concurrency = concurrency
        self.clock = clock
        self.lazy = bool(lazy)
        self.lazy_chunk = lazy_chunk
        self.live = bool(live)
        self.poll = float(poll)
        self._reset()

    def _reset(self) -> None:
        self._inflight: dict[int, _Task] = {}
        self._seq = 0
        self._tasks_of: dict[str, int] = {}  # tasks dispatched per client (clock task index)
        self._wake_at: float | None = None  # the earliest pending wake-up
        self._bad_in_a_row = 0  # tasks without a usable update since the last good one
        self._repeat: dict[str, tuple[int, int]] = {}  # client -> (version, tasks from it)
        self._base: tuple[int, torch.Tensor] | None = None  # (version, its model), shared
        self._lazy_off: str | None = None  # why lazy batching was switched off in this run
        self.fits = 0  # Transport.fit calls that trained tasks (batching diagnostics)
        self._small_population_told = False  # concurrency above the population: said once
        # Live mode: client -> its open task's seq; the real-time origin of sim_time.
        self._live_of: dict[str, int] = {}
        self._t0 = time.monotonic()
        self._elapsed0 = 0.0
        self._cancelled = False
        self._awaiting = False  # an "await" event is pending (never two)
        self._new_step()

    def _new_step(self) -> None:
        self._step_start = time.perf_counter()
        self._dispatched = 0
        self._failures = 0
        self._rejected = 0

    def describe(self) -> dict[str, Any] | None:
        # "live" only when set, so that simulated runs keep their identity; a checkpoint of
        # a simulated run (tasks to recompute) and a live one (none) never resume each other.
        return {"name": self.name, "concurrency": self.concurrency,
                **({"live": True} if self.live else {})}

    def check(self, server: Server) -> None:
        refuse_async(server, self.name)  # the same refusals in live mode
        if self.live:
            if self.clock is not None:
                raise ConfigError("clock", type(self.clock).__name__, "no [clock] with a live "
                                  f"{self.name} schedule (real clients, fedmosaic server): "
                                  "their time is real, and a simulated clock would contradict "
                                  "it; [clock] is for simulation")
            if not isinstance(server.transport, LiveTransport):
                raise ConfigError("transport", type(server.transport).__name__,
                                  f"a LiveTransport (submit, next_result, cancel_all) for a "
                                  f"live {self.name} schedule; in simulation build the "
                                  "schedule with live=False")
        self.clock = _bind_clock(self.clock, server.spec.nbytes)

    def start(self, server: Server, state: RunState) -> None:
        self._reset()
        saved, state.schedule_state = state.schedule_state, None
        if self.live:
            self._t0, self._elapsed0 = time.monotonic(), state.sim_time
            with self._cancel_on_error(server):
                if saved is not None:
                    self._restore_live(saved)
                self._settle_live(server, state)
            return
        if saved is not None:
            self._restore(server, state, saved)
        # As after the event whose step was checkpointed: dispatch once every event of this
        # instant has been handled.
        if server.events.next_time() != state.sim_time:
            self._dispatch(server, state)

    def settle(self, server: Server, state: RunState) -> None:
        if self.live:
            with self._cancel_on_error(server):
                self._settle_live(server, state)
            return
        self._dispatch(server, state)

    # -- live mode -----------------------------------------------------------------------------
    def _elapsed(self) -> float:
        """Real seconds this run has been served (``sim_time`` in live mode)."""
        return self._elapsed0 + (time.monotonic() - self._t0)

    @contextmanager
    def _cancel_on_error(self, server: Server) -> Iterator[None]:
        """Anything raising out of the live schedule ends the run: end the open tasks."""
        try:
            yield
        except BaseException as exc:
            self._cancel(server, f"the run stopped: {type(exc).__name__}: {exc}")
            raise

    def _cancel(self, server: Server, reason: str) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        self._inflight.clear()
        self._live_of.clear()
        try:
            server.transport.cancel_all(reason)  # type: ignore[attr-defined]
        except Exception:  # never hide the error that ended the run
            log.exception("%s: cancel_all failed", self.name)

    def _settle_live(self, server: Server, state: RunState) -> None:
        """Refill the free places, then wait for the next result (one ``await`` pending)."""
        while True:
            failed_at_once = self._dispatch(server, state)
            # Everything refused at once (clients gone since available_clients): try others;
            # _unusable fails the run if that goes on.
            if self._inflight or not failed_at_once:
                break
        if self._inflight and not self._awaiting:  # no task: Server.run says nothing is left
            server.events.push(self._elapsed(), "await")
            self._awaiting = True

    def _await(self, server: Server) -> None:
        """Block up to ``poll`` seconds for a result; take, without waiting, the others that
        have ended too; push them all as ``result`` events of one instant."""
        transport: Any = server.transport
        got = transport.next_result(self.poll)
        if got is None:
            return  # settle pushes the next await
        arrived = [got]
        # Until every open task has ended (a stray result for a client without an open task
        # does not count) or nothing else has.
        ended = {str(got[0])} & self._live_of.keys()
        while len(ended) < len(self._live_of):
            more = transport.next_result(0.0)
            if more is None:
                break
            arrived.append(more)
            ended |= {str(more[0])} & self._live_of.keys()
        now = self._elapsed()
        for cid, result in arrived:
            server.events.push(now, "result", (str(cid), result))

    def _handle_live(self, server: Server, state: RunState, event: Event) -> None:
        if event.kind == "await":
            self._awaiting = False
            self._await(server)
            return
        if event.kind != "result":  # pragma: no cover - only this schedule pushes its events
            raise ValueError(f"the live {self.name} schedule has no event {event.kind!r}")
        cid, result = event.payload
        seq = self._live_of.pop(cid, None)
        if seq is None:  # the transport broke its contract: never apply what was not asked
            log.warning("version %d: a result from client %s, which has no open task: "
                        "ignored", state.round, cid)
            return
        task = self._inflight.pop(seq)
        if isinstance(result, ClientUpdate) and str(result.client_id) != cid:
            result = ClientFailure(cid, f"its task's result names client "
                                        f"{result.client_id!r}")
        task.result = result
        self._take(server, state, task)
        if state.round >= server.rounds:
            self._cancel(server, "the run finished")

    def _submit(self, server: Server, state: RunState, tasks: list[ClientTask]) -> int:
        """Submit ``tasks`` from the current version; the number refused at once."""
        base, version = self._base_weights(state), state.round
        failed = server.transport.submit(base, version, tasks)  # type: ignore[attr-defined]
        refused = {f.client_id for f in failed}
        for task in tasks:
            cid = task.client_id
            if cid in refused:
                continue
            self._inflight[self._seq] = _Task(self._seq, cid, version, None, state.sim_time,
                                              True, base, task.config.round, task.config.seed)
            self._live_of[cid] = self._seq
            self._seq += 1
            self._dispatched += 1
        for f in failed:
            self._failures += 1
            self._unusable(state, f.client_id, f.reason)
        return len(failed)

    def _restore_live(self, saved: dict[str, Any]) -> None:
        if saved.get("name") != self.name:
            raise CheckpointError(f"the checkpoint's schedule state is {saved.get('name')!r}'s, "
                                  f"not {self.name!r}'s")
        if saved.get("tasks") or not saved.get("live"):
            raise CheckpointError("the checkpoint was written by a simulated asynchronous run; "
                                  "a live schedule cannot resume its tasks in flight")
        self._repeat = {str(c): (int(v[0]), int(v[1])) for c, v in saved["repeat"].items()}

    # -- resume --------------------------------------------------------------------------------
    def state_dict(self, server: Server) -> dict[str, Any]:
        """The tasks in flight (client, base version, config, arrival time), the base models
        they were dispatched with (one per version in flight), pending wake-ups and the
        per-client task counters: plain data and tensors, for the checkpoint of a step. The
        tasks' results are not saved, whether computed yet or not (lazy batching): a resumed
        run recomputes them (a fit is a pure function of weights, data and config), lazily
        at their saved arrival times, or at once when lazy batching is off.

        Live mode saves no task (see the class docstring): only the per-client counters."""
        if self.live:
            return {"name": self.name, "live": True, "tasks": [], "wakes": [], "bases": {},
                    "tasks_of": {}, "repeat": {c: list(v) for c, v in self._repeat.items()}}
        tasks, wakes, bases = [], [], {}
        for event in server.events.pending():
            if event.kind == "wake":
                wakes.append(event.time)
                continue
            t = self._inflight[event.payload]
            tasks.append({"client": t.client_id, "base": t.base_version, "at": event.time,
                          "dispatched": t.dispatched, "completed": t.completed,
                          "round": t.config_round, "seed": t.seed})
            bases[str(t.base_version)] = t.base_weights
        return {"name": self.name, "tasks": tasks, "wakes": wakes, "bases": bases,
                "tasks_of": dict(self._tasks_of),
                "repeat": {c: list(v) for c, v in self._repeat.items()}}

    def _restore(self, server: Server, state: RunState, saved: dict[str, Any]) -> None:
        if saved.get("name") != self.name:
            raise CheckpointError(f"the checkpoint's schedule state is {saved.get('name')!r}'s, "
                                  f"not {self.name!r}'s")
        self._tasks_of = {str(c): int(n) for c, n in saved["tasks_of"].items()}
        self._repeat = {str(c): (int(v[0]), int(v[1])) for c, v in saved["repeat"].items()}
        s = server.strategy
        by_base: dict[int, list[ClientTask]] = {}
        for row in saved["tasks"]:
            cfg = s.fit_config(int(row["round"]), seed=row["seed"])
            by_base.setdefault(int(row["base"]), []).append(
                ClientTask(str(row["client"]), cfg, s.client_stages, s.dispatch_transform))
        if self._lazy_ok(server):
            # The saved arrival times stand: the tasks train when the first of their base
            # version is delivered, exactly as in the run that wrote the checkpoint.
            lazy = {t.client_id: t for group in by_base.values() for t in group}
            for row in saved["tasks"]:
                task = lazy[str(row["client"])]
                self._inflight[self._seq] = _Task(
                    self._seq, task.client_id, int(row["base"]), None,
                    float(row["dispatched"]), bool(row["completed"]),
                    saved["bases"][str(row["base"])], int(row["round"]), row["seed"],
                    client_task=task, arrive=float(row["at"]),
                    work=predicted_work(server, task, self._fitter(server)))
                server.events.push(float(row["at"]), "arrival", self._seq)
                self._seq += 1
            for weights in saved["bases"].values():
                server.spec.check_vector(weights)
            for at in saved["wakes"]:
                server.events.push(float(at), "wake")
            self._wake_at = min((float(a) for a in saved["wakes"]), default=None)
            return
        results: dict[str, Any] = {}
        # The checkpoint's trainer state already counts these tasks' fits (a DP-SGD trainer's
        # per-client spend): recomputing them must not count them twice.
        trainer = server.trainer
        accounting = (copy.deepcopy(trainer.accounting_state())  # type: ignore[attr-defined]
                      if hasattr(trainer, "accounting_state") else None)
        for base, group in by_base.items():
            weights = saved["bases"][str(base)]
            server.spec.check_vector(weights)
            for r in self._fitter(server).fit(weights, group, None):
                results[r.client_id] = r
        if accounting is not None:
            trainer.load_accounting_state(accounting)  # type: ignore[attr-defined]
        for row in saved["tasks"]:  # in the order they were pending
            cid = str(row["client"])
            result = results.get(cid, ClientFailure(cid, "the transport returned no result"))
            self._inflight[self._seq] = _Task(
                self._seq, cid, int(row["base"]), result, float(row["dispatched"]),
                bool(row["completed"]), saved["bases"][str(row["base"])], int(row["round"]),
                row["seed"])
            server.events.push(float(row["at"]), "arrival", self._seq)
            self._seq += 1
        for at in saved["wakes"]:
            server.events.push(float(at), "wake")
        self._wake_at = min((float(a) for a in saved["wakes"]), default=None)

    def handle(self, server: Server, state: RunState, event: Event) -> None:
        if self.live:
            with self._cancel_on_error(server):
                self._handle_live(server, state, event)
            return
        if event.kind == "wake":  # a client came online: settle dispatches
            if self._wake_at is not None and event.time >= self._wake_at:
                self._wake_at = None
            return
        task = self._inflight.pop(event.payload)
        if task.result is None and task.completed:
            self._train_pending(server, task)
        self._take(server, state, task)

    def _take(self, server: Server, state: RunState, task: _Task) -> None:
        """One task ended: its update arrives (``_arrive``), or it counts as a failure or a
        rejection and frees its place."""
        if not task.completed or isinstance(task.result, ClientFailure):
            self._failures += 1
            reason = task.result.reason if isinstance(task.result, ClientFailure) else \
                "went offline before finishing"
            self._unusable(state, task.client_id, reason)
            return
        if not isinstance(task.result, ClientUpdate):
            self._rejected += 1
            # A PartialAggregate with only ``rejected``: the transport refused the update.
            rejected = getattr(task.result, "rejected", None)
            self._unusable(state, task.client_id, "; ".join(map(str, rejected)) if rejected
                           else f"sent a {type(task.result).__name__}, not an update")
            return
        update = replace(task.result, base_round=task.base_version)  # the server's record
        try:
            staleness = staleness_of(update, state.round)
            self._arrive(server, state, task, update, staleness)
        except InvalidUpdateError as exc:
            self._rejected += 1
            self._unusable(state, task.client_id, str(exc))
            return
        self._bad_in_a_row = 0

    def _unusable(self, state: RunState, client_id: str, reason: str) -> None:
        """A task that brought no usable update. Many in a row (every client failing) fail the
        run, as a synchronous round without enough updates does, instead of redispatching
        forever."""
        log.warning("version %d: client %s: %s", state.round, client_id, reason)
        self._bad_in_a_row += 1
        limit = 10 * self.concurrency + 10
        if self._bad_in_a_row >= limit:
            raise RoundFailedError(
                f"{self.name}: {self._bad_in_a_row} tasks in a row brought no usable update "
                f"at version {state.round} (last: client {client_id}: {reason})")

    @abstractmethod
    def _arrive(self, server: Server, state: RunState, task: _Task, update: ClientUpdate,
                staleness: int) -> None:
        """Take one arrived update (FedBuff buffers it, FedAsync mixes it in)."""

    def _fitter(self, server: Server) -> Any:
        """The transport the tasks train on: the server's. (FedBuff over a
        ``SecureBufferSource`` trains on its ``client_transport()``: its clients mask their
        updates only when their buffer closes.)"""
        return server.transport

    def _holding(self, server: Server) -> set[str]:
        """Clients not training but not free either (none here; FedBuff under SecAgg+: the
        members of the open buffer, who wait for its instance)."""
        return set()

    # -- lazy batching -------------------------------------------------------------------------
    def _lazy_ok(self, server: Server) -> bool:
        """Whether tasks may train lazily now: switched on, not switched off by a wrong
        prediction, and a stateless trainer (a DP-SGD trainer's accounting follows the order
        of its fits, which lazy batching changes)."""
        return (self.lazy and not self.live and self._lazy_off is None
                and not hasattr(server.trainer, "accounting_state"))

    def _train_pending(self, server: Server, first: _Task) -> None:
        """Train ``first`` with every other untrained task of its base version (soonest
        arrivals first, ``lazy_chunk`` at most) in one ``Transport.fit`` call, and keep each
        result with its task until its arrival."""
        same = sorted((t for t in self._inflight.values()
                       if t.result is None and t.completed
                       and t.base_version == first.base_version),
                      key=lambda t: (t.arrive, t.seq))
        group = [first, *same[: self.lazy_chunk - 1]]
        tasks = [t.client_task for t in group]
        assert first.base_weights is not None and all(t is not None for t in tasks)
        results = {r.client_id: r
                   for r in self._fitter(server).fit(first.base_weights, tasks, None)}
        self.fits += 1
        for t, ct in zip(group, tasks, strict=True):
            assert ct is not None
            cid = t.client_id
            t.result = results.get(cid, ClientFailure(cid, "the transport returned no result"))
            t.client_task = None
            if isinstance(t.result, ClientUpdate) and t.work is not None:
                got = task_work(t.result, ct.config, server.trainer)
                if got != t.work and self._lazy_off is None:
                    self._lazy_off = (f"client {cid}'s fit did (samples, steps) = {got}, not "
                                      f"the {t.work} predicted from full_steps")
                    log.warning("%s: lazy batching off for the rest of the run: %s (its "
                                "arrival time came from the prediction)", self.name,
                                self._lazy_off)

    def _base_weights(self, state: RunState) -> torch.Tensor:
        """The current model, copied once per version (immune to in-place edits of
        ``state.weights``) and shared by every task dispatched from it."""
        if self._base is None or self._base[0] != state.round:
            self._base = (state.round, state.weights.clone())
        return self._base[1]

    def _dispatch(self, server: Server, state: RunState) -> int:
        """Fill the free places: train (or schedule lazily) in simulation, submit in live
        mode. Returns the number of tasks a live transport refused at once (0 otherwise)."""
        tasks = self._next_tasks(server, state)
        if not tasks:
            return 0
        if self.live:
            return self._submit(server, state, tasks)
        self._simulate_tasks(server, state, tasks)
        return 0

    def _next_tasks(self, server: Server, state: RunState) -> list[ClientTask]:
        """The tasks for the free places: clients drawn from the available ones not training
        (and online, under a clock), each with its config and seed."""
        want = self.concurrency - len(self._inflight)
        if want <= 0:
            return []
        now, clock = state.sim_time, self.clock
        busy = {t.client_id for t in self._inflight.values()} | self._holding(server)
        population = server.transport.available_clients()
        if len(population) < self.concurrency and not self._small_population_told:
            # Never silent (as clients_per_round): the run keeps every client busy instead.
            log.warning("concurrency = %d but only %d clients are available: all of them "
                        "train at once", self.concurrency, len(population))
            self._small_population_told = True
        free = [c for c in population if c not in busy]
        online = [c for c in free if clock is None or clock.available(c, now)]
        if len(online) < want and clock is not None and len(free) > len(online):
            # Too few clients online to keep ``concurrency`` busy: come back when the next
            # offline one comes online (one pending wake-up at a time).
            offline = set(free) - set(online)
            wake = min(clock.next_available(c, now) for c in offline)
            if wake < float("inf") and (self._wake_at is None or wake < self._wake_at):
                server.events.push(wake, "wake")
                self._wake_at = wake
        if not online:
            return []
        picked = _sample(online, min(want, len(online)), state.rng)
        s, version = server.strategy, state.round
        tasks = []
        for cid in picked:
            last_version, repeat = self._repeat.get(cid, (-1, 0))
            repeat = repeat + 1 if last_version == version else 0
            self._repeat[cid] = (version, repeat)
            cfg = s.fit_config(version + 1, seed=task_seed(server.seed, version + 1, cid,
                                                           repeat))
            tasks.append(ClientTask(cid, cfg, s.client_stages, s.dispatch_transform))
        return tasks

    def _simulate_tasks(self, server: Server, state: RunState, tasks: list[ClientTask]) -> None:
        """Train the tasks (or predict their work, lazily) and schedule their arrivals."""
        now, clock = state.sim_time, self.clock
        version = state.round
        predicted: dict[str, tuple[int, int]] = {}
        if self._lazy_ok(server):
            for task in tasks:
                work = predicted_work(server, task, self._fitter(server))
                if work is not None:
                    predicted[task.client_id] = work
        eager = [t for t in tasks if t.client_id not in predicted]
        results = ({r.client_id: r for r in self._fitter(server).fit(state.weights, eager,
                                                                       None)}
                   if eager else {})
        if eager:
            self.fits += 1
        base = self._base_weights(state)
        for task in tasks:
            cid = task.client_id
            work = predicted.get(cid)
            result = None if work is not None else \
                results.get(cid, ClientFailure(cid, "the transport returned no result"))
            index = self._tasks_of.get(cid, 0)
            self._tasks_of[cid] = index + 1
            arrive, completed = now, True
            if clock is not None and not isinstance(result, ClientFailure):
                samples, steps = work if work is not None else \
                    task_work(result, task.config, server.trainer)
                outcome = clock.outcome(cid, index, now, samples, steps)
                arrive, completed = outcome.end, outcome.completed
            self._inflight[self._seq] = _Task(self._seq, cid, version, result, now, completed,
                                              base, task.config.round, task.config.seed,
                                              client_task=task if work is not None else None,
                                              arrive=arrive, work=work)
            server.events.push(arrive, "arrival", self._seq)
            self._seq += 1
        self._dispatched += len(tasks)

    def _head(self, server: Server, state: RunState, updates: int,
              bytes_up: int) -> dict[str, Any]:
        version = state.round + 1
        return {"round": version, "version": version, "sim_time": state.sim_time,
                "updates": updates, "clients_dispatched": self._dispatched,
                "failures": self._failures, "rejected": self._rejected,
                "bytes_down": self._dispatched * server.spec.nbytes, "bytes_up": bytes_up,
                "in_flight": len(self._inflight)}


class UpdateBuffer(Protocol):
    """What ``FedBuffSchedule`` needs of its buffer: ``FedBuffBuffer``, or a secure one
    (``fedmosaic.privacy.secagg.buffer.SecureFedBuffBuffer``). ``flush`` returns the mean to
    apply (None: nothing to apply, e.g. an aborted SecAgg+ instance) and the stats, whose
    optional ``failures`` are ``ClientFailure``s of members lost while the buffer closed."""

    @property
    def count(self) -> int: ...

    @property
    def full(self) -> bool: ...

    @property
    def client_ids(self) -> list[str]: ...

    def add(self, update: ClientUpdate, staleness: int) -> float: ...

    def flush(self) -> tuple[torch.Tensor | None, dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Any) -> None: ...


@runtime_checkable
class SecureBufferSource(Protocol):
    """A secure-aggregation transport that sums each FedBuff buffer in one instance of its
    protocol (``SecAggPlusTransport``): it builds the buffer (``secure_buffer``) and names the
    transport its clients train on before they mask (``client_transport``)."""

    def secure_buffer(self, k: int, staleness: Any = None, weighting: str = "samples", *,
                      dim: int, device: Any = None) -> UpdateBuffer: ...

    def client_transport(self) -> Transport: ...


# Consecutive buffers whose secure instance gave nothing to apply before the run fails.
_EMPTY_BUFFERS_LIMIT = 3


class FedBuffSchedule(_AsyncSchedule):
    """FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous
    Aggregation", AISTATS): ``concurrency`` clients train at once; each arriving update is
    added to a ``FedBuffBuffer`` with its staleness weight (by default ``1/sqrt(1 +
    staleness)``); when ``buffer_size`` are held the server optimizer steps on their mean
    (as ``FedAvg.finish_round`` does), then the freed clients' places are refilled.

    With ``buffer_size = concurrency =`` the cohort and every client arriving before the
    step (zero staleness), it is synchronous FedAvg bit for bit.

    **Secure aggregation per buffer** (simulation only). Over a ``SecureBufferSource``
    (``SecAggPlusTransport``) the buffer is the transport's ``secure_buffer``: the K clients
    that fill it run one SecAgg+ instance when it closes, each submitting its staleness- and
    sample-weighted update, so the server learns the buffer's weighted sum, total weight and
    count only; the tasks train on the transport's ``client_transport()``. Members that drop
    out during the instance count as failures (the step covers the survivors); a buffer whose
    instance aborts or has no survivor takes no step, and ``_EMPTY_BUFFERS_LIMIT`` such buffers
    in a row fail the run (``RoundFailedError``). No client metric is recorded; ``bytes_up``
    is the protocol's. A member of the open buffer gets no new task until the buffer closes
    (a SecAgg+ instance has one member per client), so ``buffer_size`` must not exceed the
    population. With K = concurrency = the cohort and zero staleness it is the synchronous
    SecAgg+ round bit for bit (same inputs, instance numbers and seeds).

    ``live=True`` runs it over real clients (a ``LiveTransport``; see ``_AsyncSchedule``),
    ``poll`` seconds at most per wait for a result.
    """

    name = "fedbuff"

    def __init__(self, buffer_size: int, concurrency: int, *, staleness: Any = None,
                 clock: ClockLike = None, lazy: bool = True, lazy_chunk: int = 256,
                 live: bool = False, poll: float = 0.5) -> None:
        super().__init__(concurrency, clock, lazy=lazy, lazy_chunk=lazy_chunk, live=live,
                         poll=poll)
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError(f"buffer_size must be an integer >= 1, got {buffer_size!r}")
        self.buffer_size = buffer_size
        self.staleness = staleness if staleness is not None else InverseSqrtStaleness()
        self.buffer: UpdateBuffer | None = None
        self._empty_buffers = 0  # consecutive flushes with nothing to apply (SecAgg+ aborts)
        # (secure buffer source, clients held by the open buffer) of the run in progress, set
        # by start: isinstance against a runtime-checkable Protocol inspects each of its
        # members, too slow for every dispatch and fit of a simulation.
        self._kind: tuple[bool, bool] | None = None

    def describe(self) -> dict[str, Any] | None:
        return {**(super().describe() or {}), "buffer_size": self.buffer_size,
                "staleness": self.staleness.describe()}

    def check(self, server: Server) -> None:
        self._kind = None  # a new server: decided again at its run's start
        super().check(server)  # refuse_async: SecAgg+ only in simulation, over a source
        self._make_buffer(server, None)  # e.g. a buffer size SecAgg+ cannot run over
        if not isinstance(server.transport, SecureBufferSource):
            return
        population = len(server.transport.available_clients())
        if population < self.buffer_size:
            raise ConfigError("strategy.buffer_size", self.buffer_size,
                              f"at most the {population} clients with secure aggregation (a "
                              "SecAgg+ instance has one member per client)")
        if server.strategy.guarantees().get("differential_privacy"):
            # A secure buffer's mean goes to strategy.apply, not to a DP strategy's release
            # (fixed denominator, noise check, accounting): never silently skip those.
            raise ConfigError("strategy.schedule", self.name, "'sync' for central or "
                              "distributed DP with secure aggregation: a secure FedBuff step "
                              "applies the buffer's mean without the DP strategy's release "
                              "and accounting (not yet supported)")

    def _make_buffer(self, server: Server, device: Any) -> UpdateBuffer:
        s, transport = server.strategy, server.transport
        if isinstance(transport, SecureBufferSource):
            return transport.secure_buffer(self.buffer_size, self.staleness, s.weighting,
                                           dim=server.spec.numel, device=device)
        if isinstance(s, AsyncPrivacy):  # central DP: clip, noise the sum, fixed K
            return s.dp_buffer(FedBuffBuffer(self.buffer_size, self.staleness, s.weighting,
                                             dim=server.spec.numel, device=device,
                                             distinct_clients=True))
        return FedBuffBuffer(self.buffer_size, self.staleness, s.weighting,
                             dim=server.spec.numel, device=device)

    def _run_kind(self, server: Server) -> tuple[bool, bool]:
        if self._kind is None:  # outside a run: ask
            secure = isinstance(server.transport, SecureBufferSource)
            return secure, secure or isinstance(server.strategy, AsyncPrivacy)
        return self._kind

    def _fitter(self, server: Server) -> Any:
        transport = server.transport
        return transport.client_transport() if self._run_kind(server)[0] else transport

    def _holding(self, server: Server) -> set[str]:
        # A SecAgg+ instance has one member per client: a member of the open buffer holds
        # its input until the buffer closes and gets no new task meanwhile. Under DP too:
        # a DP buffer takes one update per client (its sensitivity is one clipped update).
        if self.buffer is None or not self._run_kind(server)[1]:
            return set()
        return set(self.buffer.client_ids)

    def start(self, server: Server, state: RunState) -> None:
        self._kind = None
        self._kind = self._run_kind(server)
        self.buffer = self._make_buffer(server, state.weights.device)
        self._empty_buffers = 0
        saved = state.schedule_state
        if saved is not None and saved.get("buffer") is not None:
            self.buffer.load_state_dict(saved["buffer"])
        super().start(server, state)

    def state_dict(self, server: Server) -> dict[str, Any]:
        assert self.buffer is not None
        if self.live:
            # Checkpoints are written by Server.commit, right after the buffer was flushed:
            # nothing buffered is ever left out of a live checkpoint.
            assert self.buffer.count == 0, "a live FedBuff checkpoint with a non-empty buffer"
            return {**super().state_dict(server), "buffer": None}
        return {**super().state_dict(server), "buffer": self.buffer.state_dict()}

    def _arrive(self, server: Server, state: RunState, task: _Task, update: ClientUpdate,
                staleness: int) -> None:
        assert self.buffer is not None
        self.buffer.add(update, staleness)
        if not self.buffer.full:
            return
        mean, stats = self.buffer.flush()
        for failure in stats.get("failures", ()):  # lost while the buffer closed (SecAgg+)
            self._failures += 1
            log.warning("version %d: client %s: %s", state.round, failure.client_id,
                        failure.reason)
        if mean is None:
            self._empty_buffers += 1
            if self._empty_buffers >= _EMPTY_BUFFERS_LIMIT:
                reason = stats["failures"][0].reason if stats.get("failures") else "no sum"
                raise RoundFailedError(
                    f"{self.name}: {self._empty_buffers} buffers in a row gave no sum to apply "
                    f"at version {state.round} (last: {reason})")
            return
        self._empty_buffers = 0
        weights = server.strategy.apply(state.weights, mean.to(state.weights.device))
        head = {**self._head(server, state, stats["count"], stats["bytes_up"]),
                "staleness_mean": stats["staleness_mean"],
                "staleness_max": stats["staleness_max"]}
        server.commit(state, weights, head=head, client_metrics=stats["metrics"],
                      extra=stats.get("extra", {}), start=self._step_start)
        self._new_step()


class FedAsyncSchedule(_AsyncSchedule):
    """FedAsync (Xie et al. 2019, "Asynchronous Federated Optimization"): every arriving
    update is one server step, ``x <- (1 - a_t) x + a_t (x_base + delta)`` with ``a_t = alpha
    * s(staleness)`` (``FedAsyncMixer``); ``concurrency`` clients train at once. The proximal
    term of FedProx reaches the clients through the strategy's ``proximal_mu`` as usual. The
    server optimizer is not used (the mixing is the server update). ``live=True`` runs it
    over real clients (a ``LiveTransport``; see ``_AsyncSchedule``).
    """

    name = "fedasync"

    def __init__(self, alpha: float, concurrency: int, *, staleness: Any = None,
                 clock: ClockLike = None, lazy: bool = True, lazy_chunk: int = 256,
                 live: bool = False, poll: float = 0.5) -> None:
        super().__init__(concurrency, clock, lazy=lazy, lazy_chunk=lazy_chunk, live=live,
                         poll=poll)
        self.mixer = FedAsyncMixer(alpha, staleness)

    def describe(self) -> dict[str, Any] | None:
        return {**(super().describe() or {}), **self.mixer.describe(), "name": self.name}

    def _arrive(self, server: Server, state: RunState, task: _Task, update: ClientUpdate,
                staleness: int) -> None:
        assert task.base_weights is not None
        dp: dict[str, Any] = {}
        if isinstance(server.strategy, AsyncPrivacy):  # central DP: clip and noise first
            update, dp = server.strategy.release_update(update, staleness, server.spec.numel)
        weights, metrics = self.mixer.mix_update(state.weights, task.base_weights, update,
                                                 staleness)
        head = {**self._head(server, state, 1, update.nbytes), "staleness_mean": staleness,
                "staleness_max": staleness}
        server.commit(state, weights, head=head,
                      client_metrics={k: float(v) for k, v in update.metrics.items()},
                      extra={"alpha_t": metrics["alpha_t"], **dp}, start=self._step_start)
        self._new_step()
