"""The server core, written once for every transport and every schedule.

It is event-driven: a run pops events (a round's cohort dispatched or complete, a client's
update arriving) in simulated-time order and hands each to the run's ``Schedule``
(``runtime/schedule.py``), which decides what to dispatch and when to aggregate. Each
aggregation is a server step (``Server.commit``): server stages -> next model version ->
evaluate -> record -> checkpoint -> callbacks. Synchronous rounds (``SyncSchedule``, the
default) are one schedule among several.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmosaic.algorithms.strategy import FedAvg
from fedmosaic.core.errors import (
    CheckpointError,
    ConfigError,
    PrivacyBudgetExhausted,
    RoundFailedError,
)
from fedmosaic.core.params import ParamSpec
from fedmosaic.runtime.checkpoint import describe_identity_change, load_checkpoint, save_checkpoint
from fedmosaic.runtime.evaluation import FederatedEvaluation
from fedmosaic.runtime.schedule import EventQueue, Schedule, SyncSchedule
from fedmosaic.runtime.transport import Transport
from fedmosaic.train.base import Dataset, Trainer

log = logging.getLogger(__name__)

RoundCallback = Callable[[dict[str, Any]], None]


@dataclass
class RunState:
    """What a checkpoint restores: the last completed server step and everything after it
    depends on. ``round`` is the number of completed server steps, which is also the version
    of ``weights`` (version 0: the initial model); ``sim_time`` is the simulated time in
    seconds (advanced by a client timing model; 0 without one)."""

    round: int
    weights: torch.Tensor
    rng: np.random.Generator
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None  # why the run ended before its planned rounds, if it did
    sim_time: float = 0.0
    # A resumed asynchronous schedule's saved state (tasks in flight...), until it restores it.
    schedule_state: dict[str, Any] | None = None

    @property
    def version(self) -> int:
        """The model version: completed server steps (a synchronous run's round number)."""
        return self.round


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able description (guards resume against a changed run)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check_federated_eval(strategy: Any, transport: Any) -> None:
    """Refuse federated evaluation where it would break a guarantee or cannot run.

    Clients' evaluation metrics are computed from their private test data without noise, so
    they are outside any DP accounting: refused when the strategy gives a DP guarantee.
    """
    if not callable(getattr(transport, "evaluate", None)):
        raise ConfigError("federated_eval", "on", f"a transport with evaluate() "
                          f"({type(transport).__name__} has none)")
    if strategy.guarantees().get("differential_privacy"):
        raise ConfigError("federated_eval", "on", "off under central or distributed DP: each "
                          "client's evaluation metrics and test sample count would reach the "
                          "server without noise, outside the DP accounting; evaluate on a "
                          "central test set instead")


# A trainer's per-client accounting state before its first run (DPSGDTrainer's accountants),
# keyed weakly by the trainer: restored at the start of every fresh run, as the strategy's is.
_TRAINER_START: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _begin_trainer_run(trainer: Trainer) -> None:
    """Reset a trainer's accounting (``accounting_state`` / ``load_accounting_state``, the
    optional part of the Trainer interface a checkpoint saves) to its state before its first
    run: per-client DP-SGD spends of one run must not be counted into the next."""
    if not hasattr(trainer, "accounting_state"):
        return
    start = _TRAINER_START.get(trainer)
    if start is None:
        _TRAINER_START[trainer] = copy.deepcopy(trainer.accounting_state())
    else:
        trainer.load_accounting_state(copy.deepcopy(start))  # type: ignore[attr-defined]


class Server:
    """Runs a federated training with a strategy over a transport, server step by server step.

    ``schedule`` decides when clients are dispatched and when the server aggregates
    (``SyncSchedule``, the default: synchronous rounds); ``rounds`` is the number of server
    steps (model versions) to run. Evaluation is central (the global model on ``test_data``)
    and/or federated (``federated_eval``: clients evaluate it on their local test splits)
    every ``eval_every`` steps and after the last one, after the model update. With
    ``out_dir`` a checkpoint is written atomically after every step, and ``resume=True``
    continues from it.
    """

    def __init__(
        self,
        *,
        trainer: Trainer,
        strategy: FedAvg,
        transport: Transport,
        rounds: int,
        seed: int = 0,
        test_data: Dataset | None = None,
        eval_every: int = 1,
        out_dir: str | Path | None = None,
        identity: dict[str, Any] | None = None,
        callbacks: Sequence[RoundCallback] = (),
        federated_eval: FederatedEvaluation | None = None,
        schedule: Schedule | None = None,
        eval_threads: int | None = None,
        central_evaluate: Callable[[torch.Tensor, Dataset], dict[str, float] | None]
        | None = None,
    ) -> None:
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        if eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {eval_every}")
        if eval_threads is not None and (isinstance(eval_threads, bool) or
                                         not isinstance(eval_threads, int) or eval_threads < 1):
            raise ValueError(f"eval_threads must be a positive integer, got {eval_threads!r}")
        # torch threads for the central evaluation (None: the process's own setting). A
        # transport whose worker processes hold the cores while clients train leaves them idle
        # while the server evaluates: fm.simulate passes their count here.
        self.eval_threads = eval_threads
        # How the central evaluation runs when not here (fm.simulate passes one that has a
        # ParallelTransport's idle workers predict shares of the test set): ``(weights,
        # test_data) -> metrics``, as ``trainer.evaluate``, or None when it cannot, and the
        # server evaluates by itself on ``eval_threads``.
        self.central_evaluate = central_evaluate
        self.trainer, self.strategy, self.transport = trainer, strategy, transport
        self.rounds, self.seed, self.test_data = rounds, seed, test_data
        self.eval_every = eval_every
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.callbacks = list(callbacks)
        self.federated_eval = federated_eval
        # build_strategy attaches the experiment's schedule to the strategy it builds.
        self.schedule: Schedule = (schedule if schedule is not None else
                                   getattr(strategy, "schedule", None) or SyncSchedule())
        self._events: EventQueue | None = None
        if federated_eval is not None:
            check_federated_eval(strategy, transport)
        self.spec: ParamSpec = trainer.spec
        check = getattr(transport, "check_strategy", None)
        if check is not None:
            check(strategy)  # e.g. SecAgg+ refuses aggregators that need individual updates
        if getattr(strategy, "dispatch_transform", None) is not None and \
                not getattr(transport, "supports_dispatch", False):
            raise ConfigError("dispatch_transform", repr(strategy.dispatch_transform),
                              f"a transport that applies it ({type(transport).__name__} "
                              "does not; SequentialTransport does)")
        self.schedule.check(self)  # e.g. an asynchronous schedule refuses SecAgg+ or DP
        # Every run starts from the state the strategy (and a DP-SGD trainer's accountants)
        # had before its first run, so that an object reused across runs carries nothing
        # over; before the identity, which describes the strategy (e.g. calibrated noise).
        strategy.begin_run()
        _begin_trainer_run(trainer)
        # The identity's parts are saved with the checkpoint, so that a refused resume can
        # name the key that changed instead of only "something changed".
        # The schedule joins the strategy's part unless synchronous (None), so that runs made
        # before schedules existed keep their identity.
        described = strategy.describe()
        schedule_part = self.schedule.describe()
        if schedule_part is not None:
            described = {**described, "schedule": schedule_part}
        self.identity_detail: dict[str, Any] = json.loads(json.dumps(
            {"user": identity or {}, "seed": seed, "strategy": described,
             "spec": self.spec.to_json()}, sort_keys=True, default=str))
        self.identity = fingerprint(self.identity_detail)
        self._short_cohort_logged = False

    # -- state -----------------------------------------------------------------------------
    def fresh_state(self, initial_weights: torch.Tensor | None = None) -> RunState:
        weights = initial_weights if initial_weights is not None else \
            self.trainer.initial_weights(self.seed)
        self.spec.check_vector(weights)
        return RunState(round=0, weights=weights.clone(), rng=np.random.default_rng(self.seed))

    def restore(self) -> RunState:
        if self.out_dir is None:
            raise CheckpointError("resume needs an output directory")
        ckpt = load_checkpoint(self.out_dir)
        if ckpt.get("identity") != self.identity:
            saved = ckpt.get("identity_detail")  # absent in checkpoints of earlier versions
            change = (describe_identity_change(saved, self.identity_detail)
                      if isinstance(saved, dict) else None)
            raise CheckpointError(
                f"cannot resume the run in {self.out_dir}: "
                + (f"{change} (a different experiment)" if change else
                   "it belongs to a different experiment (seed, strategy, model or config "
                   "changed)"))
        if int(ckpt["round"]) > self.rounds:
            raise CheckpointError(
                f"the run in {self.out_dir} already completed {int(ckpt['round'])} rounds; "
                f"rounds = {self.rounds} is fewer")
        rng = np.random.default_rng()
        rng.bit_generator.state = ckpt["rng_state"]
        self.strategy.load_state_dict(ckpt["strategy"])
        weights = ckpt["weights"]
        self.spec.check_vector(weights)
        if ckpt.get("trainer_state") is not None and hasattr(self.trainer,
                                                              "load_accounting_state"):
            self.trainer.load_accounting_state(ckpt["trainer_state"])  # type: ignore[attr-defined]
        return RunState(round=int(ckpt["round"]), weights=weights, rng=rng,
                        history=list(ckpt["history"]), sim_time=float(ckpt.get("sim_time", 0.0)),
                        schedule_state=ckpt.get("schedule"))

    def checkpoint(self, state: RunState) -> None:
        if self.out_dir is None:
            return
        save_checkpoint(self.out_dir, {
            "identity": self.identity,
            "identity_detail": self.identity_detail,
            "round": state.round,
            "rounds": self.rounds,
            "weights": state.weights,
            "spec": self.spec.to_json(),
            "strategy": self.strategy.state_dict(),
            "rng_state": state.rng.bit_generator.state,
            "history": state.history,
            # Trainers that keep per-client state across rounds (DP-SGD accountants) save it
            # with the round it belongs to, so a resumed run remembers every client's spend.
            "trainer_state": (self.trainer.accounting_state()  # type: ignore[attr-defined]
                              if hasattr(self.trainer, "accounting_state") else None),
            # Only where there is something to keep, so that synchronous runs without a clock
            # write exactly the checkpoints they wrote before schedules existed.
            **({"sim_time": state.sim_time} if state.sim_time else {}),
            **({"schedule": schedule_state} if (schedule_state := self._schedule_state())
               is not None else {}),
        })

    def _schedule_state(self) -> dict[str, Any] | None:
        """The schedule's resumable state (tasks in flight...), if it keeps any."""
        get = getattr(self.schedule, "state_dict", None)
        return get(self) if get is not None and self._events is not None else None

    # -- the event loop --------------------------------------------------------------------
    @property
    def events(self) -> EventQueue:
        """The pending events of the run in progress (schedules push theirs here)."""
        if self._events is None:
            raise RuntimeError("no run in progress: events exist only inside Server.run")
        return self._events

    def run(
        self,
        *,
        resume: bool = False,
        initial_weights: torch.Tensor | None = None,
        stop_after: int | None = None,
    ) -> RunState:
        """Run until ``rounds`` server steps (or ``stop_after``, for tests of interruption)
        are complete: pop events in simulated-time order and hand each to the schedule."""
        if not resume:  # a second fresh run of this Server starts as clean as the first
            self.strategy.begin_run()
            _begin_trainer_run(self.trainer)
        state = self.restore() if resume else self.fresh_state(initial_weights)
        last = self.rounds if stop_after is None else min(self.rounds, stop_after)
        self._events = EventQueue()
        try:
            if state.round < last:
                self.schedule.start(self, state)
            while state.round < last:
                event = self._events.pop()
                if event is None:
                    raise RoundFailedError(
                        f"the {self.schedule.name} schedule has nothing left to do after "
                        f"{state.round} server steps: no client is training and none was "
                        "dispatched")
                state.sim_time = max(state.sim_time, event.time)
                self.schedule.handle(self, state, event)
                if state.round < last and self._events.next_time() != event.time:
                    self.schedule.settle(self, state)  # every event of this instant is in
        except PrivacyBudgetExhausted as exc:
            log.warning("stopping before round %d: %s", state.round + 1, exc)
            state.stopped = str(exc)
        finally:
            self._events = None
        return state

    def commit(
        self,
        state: RunState,
        weights: torch.Tensor,
        *,
        head: dict[str, Any],
        client_metrics: dict[str, float],
        extra: dict[str, Any],
        start: float,
        tail: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Take one server step: ``weights`` (the strategy's aggregate applied) become model
        version ``state.round + 1`` after the server stages; the step is evaluated (every
        ``eval_every`` steps and the last), recorded, checkpointed and reported to the
        callbacks. The record is ``head``, the clients' mean metrics (unless the strategy
        suppresses them), ``extra`` (the strategy's and the stages' metrics), ``tail``, the
        evaluation and ``wall_time`` (seconds since ``start``, a ``perf_counter`` reading)."""
        s = self.strategy
        version = state.round + 1
        for stage in s.server_stages:
            weights, stage_metrics = stage.apply(version, weights)
            extra = {**extra, **stage_metrics}
        state.weights = weights
        state.round = version
        record: dict[str, Any] = dict(head)
        if s.client_metrics == "record":
            # Computed from private data without noise: a DP run may suppress them.
            record.update(client_metrics)
        record.update(extra)
        if tail:
            record.update(tail)
        if self.test_data is not None and (
            version % self.eval_every == 0 or version == self.rounds
        ):
            ev = None if self.central_evaluate is None else \
                self.central_evaluate(state.weights, self.test_data)
            if ev is None:
                with _torch_threads(self.eval_threads):
                    ev = self.trainer.evaluate(state.weights, self.test_data)
            record.update({f"test_{k}": v for k, v in ev.items() if k != "num_samples"})
        if self.federated_eval is not None and (
            version % self.eval_every == 0 or version == self.rounds
        ):
            record.update(self.federated_evaluate(version, state.weights))
        record["wall_time"] = time.perf_counter() - start
        state.history.append(record)
        self.checkpoint(state)
        for cb in self.callbacks:
            cb(record)
        return record

    def federated_evaluate(self, round_num: int, weights: torch.Tensor) -> dict[str, Any]:
        """Federated evaluation of ``weights``: the selected clients evaluate it on their
        local test splits; the record entries of ``FederatedEvaluation.summarize``."""
        fe = self.federated_eval
        assert fe is not None
        selected = fe.select(self.transport.available_clients(), seed=self.seed,
                             round_num=round_num)

        def results() -> Any:  # a generator of EvalReport | ClientFailure
            # Called lazily, inside summarize: a transport that raises, even on the call
            # itself, costs this round's evaluation reports, never the trained round.
            if selected:
                yield from self.transport.evaluate(weights, selected, round_num)

        return fe.summarize(results(), selected, round_num, model_bytes=self.spec.nbytes)

    def cohort_shortfall(self, available: Sequence[str]) -> dict[str, Any]:
        """Fewer clients available than ``clients_per_round``: the sampler takes them all.
        Never silent: logged once per run, and every such round records how many there were
        (``clients_available``). The CLI refuses it outright when the population is known."""
        wanted = self.strategy.clients_per_round
        if wanted is None or wanted <= len(available):
            return {}
        if not self._short_cohort_logged:
            log.warning("clients_per_round = %d but only %d clients are available: the round "
                        "takes all of them (recorded as clients_available in each such round)",
                        wanted, len(available))
            self._short_cohort_logged = True
        return {"clients_available": len(available)}


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` inside the block (None: unchanged)."""
    if threads is None or threads == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
