"""RayTransport: a round's clients trained by a pool of Ray actors, on one machine or a cluster.

When to use it
--------------
``SequentialTransport`` (like the other in-process transports) keeps everything in one
Python process: no serialization and no start-up cost, which makes it the fastest choice
while a round's training fits the cores of one machine. ``RayTransport`` pays for starting
worker processes and for moving weights and results through Ray's object store; in return
it trains many clients in parallel across processes and machines. Use it when a round's
local training is too slow for one process (many clients per round, larger models) or when
the compute lives on a Ray cluster. For the same seed it gives the same global model as
``SequentialTransport`` up to float rounding (partial sums are added in another order), and
two Ray runs with the same seed and number of workers give the same model bit for bit.

What travels where
------------------
The whole federated data set is put into Ray's object store once, when the transport is
built, and every actor reads it from there (on one machine that is shared memory, not a
copy per actor). On a multi-machine cluster it is transferred to each node that hosts an
actor, so it must fit in every such node's object store; the nodes also need ``fedmosaic``
installed (or a ``runtime_env`` in ``ray_init_kwargs`` that provides it). Each round the
global weights are put into the store once and shared by all actors; with a streaming
aggregator every actor sums its clients' updates itself, so one vector per actor comes back
instead of one per client.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any, TypeVar

import torch

from fedmosaic.algorithms.strategy import ClientTask
from fedmosaic.core.update import ClientUpdate
from fedmosaic.data.dataset import FederatedDataset
from fedmosaic.runtime.tally import ClientFailure, PartialAggregate, RoundTally, Weighting
from fedmosaic.runtime.transport import EvalResult, SequentialTransport, TransportResult
from fedmosaic.train.base import FitConfig, Trainer

log = logging.getLogger(__name__)

_T = TypeVar("_T")

__all__ = ["RayTransport", "balance_tasks"]


def _import_ray() -> ModuleType:
    """Ray, imported on first use so that ``import fedmosaic`` never needs it."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(
            "RayTransport needs Ray, which is not installed: pip install fedmosaic[ray]"
        ) from exc
    return ray


def balance_tasks(
    tasks: Sequence[ClientTask], sizes: dict[str, int], num_bins: int
) -> list[list[ClientTask]]:
    """Split ``tasks`` into ``num_bins`` groups of near-equal total client sample count.

    Greedy longest-processing-time: the largest client goes to the least-loaded group (ties
    to the lowest index), so the split depends only on the inputs. Within a group tasks keep
    their original order. A client missing from ``sizes`` counts as one sample, so that
    unknown ids still spread out (their training fails and is reported where it runs).
    """
    return _balance(tasks, [sizes.get(t.client_id, 0) for t in tasks], num_bins)


def _balance(items: Sequence[_T], sizes: Sequence[int], num_bins: int) -> list[list[_T]]:
    """``balance_tasks`` for any items, given each one's size (at least 1 counts)."""
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    cost = [max(1, n) for n in sizes]
    order = sorted(range(len(items)), key=lambda i: (-cost[i], i))
    loads = [0] * num_bins
    members: list[list[int]] = [[] for _ in range(num_bins)]
    for i in order:
        j = min(range(num_bins), key=lambda b: (loads[b], b))
        members[j].append(i)
        loads[j] += cost[i]
    return [[items[i] for i in sorted(idx)] for idx in members]


def _first_line(exc: BaseException) -> str:
    """A one-line reason: Ray's errors carry multi-line tracebacks and hints."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _on_cpu(result: TransportResult) -> TransportResult:
    """The result with its tensors on the CPU: the driver may have no accelerator."""
    if isinstance(result, ClientUpdate):
        result.delta = result.delta.detach().to("cpu")
    return result


class _Worker:
    """The body of one Ray actor: one trainer (one model) reused for all of its clients."""

    def __init__(
        self, trainer_factory: Callable[[], Trainer], federated_data: FederatedDataset,
        torch_threads: int,
    ) -> None:
        # Several actors share a machine's cores: without a cap each would start one thread
        # per core and they would oversubscribe the CPU.
        torch.set_num_threads(torch_threads)
        # Arrays read from the object store are read-only views of shared memory; trainers
        # only read them, so torch's "not writable" warning is noise here.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        # Training one client after another is exactly what SequentialTransport does;
        # reusing it keeps the updates (delta, metrics, failures) identical.
        self._local = SequentialTransport(trainer_factory(), federated_data)

    def ready(self) -> bool:
        """Returns once the constructor has run (trainer built, data received)."""
        return True

    def fit(
        self, weights: torch.Tensor, tasks: Sequence[ClientTask], weighting: Weighting | None,
    ) -> list[TransportResult]:
        """Train ``tasks`` one after another; with ``weighting`` return one partial sum."""
        results = (_on_cpu(r) for r in self._local.fit(weights, tasks))
        if weighting is None:
            return list(results)
        round_num = max(t.config.round for t in tasks)
        tally = RoundTally(weighting, weights.numel(), round_num, device="cpu")
        for result in results:
            tally.add(result)
        return [tally.to_partial()]

    def evaluate(
        self, weights: torch.Tensor, client_ids: Sequence[str], round_num: int,
    ) -> list[EvalResult]:
        """Federated evaluation of ``client_ids`` on their local test splits, in order."""
        return list(self._local.evaluate(weights, client_ids, round_num))


class RayTransport:
    """Trains each round's clients on ``num_workers`` Ray actors.

    Every actor builds its trainer once with ``trainer_factory`` (which must be picklable,
    e.g. a ``functools.partial`` of ``TorchTrainer``) and receives the federated data once.
    A round's tasks are split across the actors, balanced by client sample count; each
    actor trains its clients one after another and, when the server passes a ``weighting``,
    sums their updates into one ``PartialAggregate``. A client whose training raises is a
    ``ClientFailure``; an actor that dies turns each of its clients into a failure and is
    replaced with a fresh one. Federated evaluation (``evaluate``) runs on the actors too,
    next to the data they already hold, balanced by test-split size.

    ``address=None`` starts a local Ray instance sized for the workers; an address
    (``"auto"``, ``"ray://host:10001"``) connects to an existing cluster. If Ray is already
    initialised it is reused. ``ray_init_kwargs`` are passed to ``ray.init`` and override
    the defaults chosen here. ``close()`` (or leaving a ``with`` block) kills the actors
    and shuts Ray down if this transport started it.
    """

    def __init__(
        self,
        trainer_factory: Callable[[], Trainer],
        federated_data: FederatedDataset,
        *,
        num_workers: int = 2,
        address: str | None = None,
        cpus_per_worker: float = 1.0,
        torch_threads: int = 1,
        ray_init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be a positive integer, got {num_workers!r}")
        if not cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {cpus_per_worker!r}")
        if isinstance(torch_threads, bool) or not isinstance(torch_threads, int) \
                or torch_threads < 1:
            raise ValueError(f"torch_threads must be a positive integer, got {torch_threads!r}")
        ray = _import_ray()
        self._ray = ray
        self.data = federated_data
        self.num_workers = num_workers
        self._trainer_factory = trainer_factory
        self._torch_threads = torch_threads
        self._driver_trainer: Trainer | None = None
        self._test_size_cache: dict[str, int] | None = None
        self._actors: list[Any] = []
        self._data_ref: Any = None
        self._closed = False
        self._owns_ray = False
        if ray.is_initialized():
            if address is not None:
                log.info("Ray is already initialised; reusing it instead of connecting to %s",
                         address)
        else:
            init_kwargs: dict[str, Any] = {
                # Ray's own start-up chatter and every actor's output forwarded to this
                # process would bury the run's log; failures are reported here anyway.
                "logging_level": logging.WARNING,
                "log_to_driver": False,
            }
            if address is None:
                # "local", not None: None would join a cluster named by RAY_ADDRESS or left
                # by ``ray start`` on this machine instead of starting a private one.
                init_kwargs["address"] = "local"
                init_kwargs["num_cpus"] = max(1, math.ceil(num_workers * cpus_per_worker))
                init_kwargs["include_dashboard"] = False
            else:
                init_kwargs["address"] = address
            init_kwargs.update(ray_init_kwargs or {})
            ray.init(**init_kwargs)
            self._owns_ray = True
        try:
            # Put once: every actor, including replacements, reads this one copy.
            self._data_ref = ray.put(federated_data)
            self._actor_class = ray.remote(_Worker).options(
                num_cpus=cpus_per_worker, max_restarts=0
            )
            self._actors = [self._spawn() for _ in range(num_workers)]
            try:
                ray.get([a.ready.remote() for a in self._actors])
            except ray.exceptions.RayError as exc:
                # Fail here, not with every client failing every round (e.g. a factory that
                # raises, or fedmosaic missing on the cluster's nodes).
                raise RuntimeError(
                    f"Ray workers failed to start: {_first_line(exc)}"
                ) from exc
        except BaseException:
            self.close()
            raise

    # -- Transport protocol ------------------------------------------------------------------
    def available_clients(self) -> list[str]:
        return list(self.data.client_ids)

    def full_steps(self, client_id: str, config: FitConfig) -> int:
        n = len(self.data.client(client_id).train)
        if self._driver_trainer is None:
            # Only straggler simulation asks this; one model on the driver answers it
            # without a round trip to an actor per client.
            self._driver_trainer = self._trainer_factory()
        return self._driver_trainer.full_steps(n, config)

    def fit(
        self, weights: torch.Tensor, tasks: Sequence[ClientTask],
        weighting: Weighting | None = None,
    ) -> Iterator[TransportResult]:
        """Dispatch ``tasks`` to the actors and yield their results, in actor order."""
        if self._closed:
            raise RuntimeError("RayTransport is closed")
        if not tasks:
            return
        ray = self._ray
        weights_ref = ray.put(weights.detach().to("cpu"))  # once per round, shared by all
        pending: dict[Any, tuple[int, list[ClientTask]]] = {}
        for idx, group in enumerate(balance_tasks(tasks, self.data.sizes(), len(self._actors))):
            if group:
                ref = self._actors[idx].fit.remote(weights_ref, group, weighting)
                pending[ref] = (idx, group)
        # Results are handed on in actor order, not completion order: the server's sum then
        # adds the same partial sums in the same order every run, so a seed fixes the model
        # bit for bit. The round waits for every actor anyway.
        for ref, (idx, group) in pending.items():
            try:
                results = ray.get(ref)
            except ray.exceptions.RayError as exc:
                yield from self._lost(idx, group, exc)
                continue
            for result in results:
                self._log_failures(result)
                yield result

    def evaluate(
        self, weights: torch.Tensor, client_ids: Sequence[str], round_num: int,
    ) -> Iterator[EvalResult]:
        """Federated evaluation on the actors, where the data already is.

        The clients are split across the actors balanced by test-split size; each actor
        evaluates its clients one after another exactly as ``SequentialTransport`` does, and
        the reports are yielded in actor order. An actor call that fails turns its clients
        into failures (and a lost actor is replaced), as in ``fit``.
        """
        if self._closed:
            raise RuntimeError("RayTransport is closed")
        if not client_ids:
            return
        ray = self._ray
        weights_ref = ray.put(weights.detach().to("cpu"))
        ids = list(client_ids)
        sizes = [self._test_sizes().get(c, 0) for c in ids]
        pending: dict[Any, tuple[int, list[str]]] = {}
        for idx, group in enumerate(_balance(ids, sizes, len(self._actors))):
            if group:
                ref = self._actors[idx].evaluate.remote(weights_ref, group, round_num)
                pending[ref] = (idx, group)
        for ref, (idx, group) in pending.items():
            try:
                results = ray.get(ref)
            except ray.exceptions.RayError as exc:
                yield from self._lost_clients(idx, group, round_num, exc)
                continue
            yield from results

    def _test_sizes(self) -> dict[str, int]:
        if self._test_size_cache is None:
            self._test_size_cache = {
                c.client_id: 0 if c.test is None else len(c.test) for c in self.data.clients}
        return self._test_size_cache

    def _lost(
        self, idx: int, group: list[ClientTask], exc: BaseException
    ) -> Iterator[ClientFailure]:
        """Failures for every client of a batch whose actor call failed as a whole."""
        rounds = {t.config.round for t in group}
        yield from self._lost_clients(idx, [t.client_id for t in group], max(rounds), exc)

    def _lost_clients(
        self, idx: int, client_ids: list[str], round_num: int, exc: BaseException
    ) -> Iterator[ClientFailure]:
        """Failures for every client of an actor call that failed as a whole."""
        if isinstance(exc, self._ray.exceptions.RayTaskError):
            # Raised inside the actor's method: the actor itself is still usable.
            reason = f"Ray worker {idx} failed: {_first_line(exc)}"
        else:
            # The actor died, or its node or result was lost: start its replacement now so
            # that it warms up while the other actors finish the round.
            reason = f"Ray worker {idx} lost: {_first_line(exc)}"
            self._replace(idx)
        for cid in client_ids:
            log.warning("client %s failed in round %d: %s", cid, round_num, reason)
            yield ClientFailure(cid, reason)

    @staticmethod
    def _log_failures(result: TransportResult) -> None:
        if isinstance(result, ClientFailure):
            failures = [result]
        elif isinstance(result, PartialAggregate):
            failures = result.failures
        else:
            return
        for f in failures:
            log.warning("client %s failed: %s", f.client_id, f.reason)

    # -- actors ------------------------------------------------------------------------------
    @property
    def actors(self) -> list[Any]:
        """The current actor handles (a copy; replacements change it)."""
        return list(self._actors)

    def _spawn(self) -> Any:
        return self._actor_class.remote(self._trainer_factory, self._data_ref,
                                        self._torch_threads)

    def _replace(self, idx: int) -> None:
        try:
            self._ray.kill(self._actors[idx], no_restart=True)
        except Exception as exc:  # already gone: nothing left to kill
            log.debug("killing lost Ray worker %d: %s", idx, exc)
        self._actors[idx] = self._spawn()
        log.warning("Ray worker %d was lost and has been replaced", idx)

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Kill the actors; shut Ray down if this transport started it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        ray = self._ray
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as exc:  # a dead actor or a lost connection: nothing to free
                log.debug("killing Ray worker: %s", exc)
        self._actors = []
        # Dropping the reference lets a shared Ray instance free the data set's memory.
        self._data_ref = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> RayTransport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
