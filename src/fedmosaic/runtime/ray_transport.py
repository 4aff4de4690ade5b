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
With a ``FederatedDataset`` the whole data set is put into Ray's object store once, when the
transport is built, and every actor reads it from there (on one machine that is shared
memory, not a copy per actor; on a cluster it is transferred to each node that hosts an
actor). With a client *source* (``fedmosaic.data.source``) only the recipe travels: each
actor loads the clients it trains on its own node, keeping a bounded cache, and the driver
never holds client data (issue #21). Each round the global weights are put into the store
once and shared by all actors; with a streaming aggregator every actor sums its clients'
updates itself, so one vector per actor comes back instead of one per client. The nodes
need ``fedmosaic`` installed, or a ``runtime_env`` that provides it.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import operator
import os
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import torch

from fedmosaic.algorithms.strategy import ClientTask
from fedmosaic.core.errors import FedmosaicError
from fedmosaic.core.update import ClientUpdate
from fedmosaic.data.dataset import FederatedDataset
from fedmosaic.data.source import ClientSource, LazyFederation, check_source
from fedmosaic.runtime.tally import ClientFailure, PartialAggregate, RoundTally, Weighting
from fedmosaic.runtime.transport import EvalResult, SequentialTransport, TransportResult
from fedmosaic.train.base import FitConfig, Trainer

log = logging.getLogger(__name__)

_T = TypeVar("_T")

__all__ = ["RayTransport", "WorkersLostError", "balance_tasks"]


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


# Every FitConfig field but the per-client ones, so that a field added later travels too.
_shared_fields = operator.attrgetter(*[f.name for f in dataclasses.fields(FitConfig)
                                       if f.name not in ("seed", "max_steps")])


class _TaskPack:
    """A group's tasks as they travel to an actor: what the tasks share, once, and the ids,
    seeds and step caps as plain lists. Pickling a thousand ``ClientTask`` objects costs
    the driver (which shares the cores with the workers) more than the round's dispatch
    otherwise; tasks that differ in anything else travel as they are."""

    def __init__(self, tasks: Sequence[ClientTask]) -> None:
        first = tasks[0]
        shared = dataclasses.replace(first.config, seed=0, max_steps=None)
        key = _shared_fields(first.config)
        same = all(t.stages is first.stages and t.dispatch is first.dispatch and
                   _shared_fields(t.config) == key for t in tasks)
        self.tasks: list[ClientTask] | None = None if same else list(tasks)
        self.shared, self.stages, self.dispatch = shared, first.stages, first.dispatch
        self.ids = [t.client_id for t in tasks]
        self.seeds = [t.config.seed for t in tasks]
        self.steps = [t.config.max_steps for t in tasks]

    def unpack(self) -> list[ClientTask]:
        if self.tasks is not None:
            return self.tasks
        return [ClientTask(cid, dataclasses.replace(self.shared, seed=seed, max_steps=steps),
                           self.stages, self.dispatch)
                for cid, seed, steps in zip(self.ids, self.seeds, self.steps, strict=True)]


def _on_cpu(result: TransportResult) -> TransportResult:
    """The result with its tensors on the CPU: the driver may have no accelerator."""
    if isinstance(result, ClientUpdate):
        result.delta = result.delta.detach().to("cpu")
    return result


class _Worker:
    """The body of one Ray actor: one trainer (one model) reused for all of its clients.

    ``data`` is a whole ``FederatedDataset`` (from the object store) or a client source,
    which the actor loads client by client into a ``LazyFederation`` bounded by
    ``cache_bytes``: then no client data ever passes through the driver."""

    def __init__(
        self, trainer_factory: Callable[[], Trainer], data: Any, torch_threads: int,
        cache_bytes: int = 256 * 2**20, inner: str = "sequential",
    ) -> None:
        # Several actors share a machine's cores: without a cap each would start one thread
        # per core and they would oversubscribe the CPU.
        torch.set_num_threads(torch_threads)
        # Arrays read from the object store are read-only views of shared memory; trainers
        # only read them, so torch's "not writable" warning is noise here.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self._data = data if isinstance(data, FederatedDataset) else \
            LazyFederation(data, cache_bytes=cache_bytes)
        trainer = trainer_factory()
        self._local: Any
        # With a source, a batched worker gathers only its share of each round (use_data).
        self._per_round = inner == "batched" and not isinstance(self._data, FederatedDataset)
        if inner == "batched":
            # The actor's share of a round as vmapped cohorts, where that is faster than
            # one client after another (BatchedTransport decides, and says why not).
            from fedmosaic.runtime.batched import BatchedTransport

            self._local = BatchedTransport(
                trainer, _Share(self._data, []) if self._per_round else self._data)  # type: ignore[arg-type]
        else:
            # Training one client after another is exactly what SequentialTransport does;
            # reusing it keeps the updates (delta, metrics, failures) identical.
            self._local = SequentialTransport(trainer, self._data)
        self.decision = getattr(self._local, "decision", "sequential")
        # A per-round batched transport holds only its last share: evaluate over the whole
        # source, one client after another (as evaluation runs anyway).
        self._evaluator = SequentialTransport(trainer, self._data) if self._per_round \
            else self._local

    def ready(self) -> bool:
        """Returns once the constructor has run (trainer built, data received)."""
        return True

    def where(self) -> dict[str, Any]:
        """Which node and process this actor is, how it trains, what it loaded (a
        ``LazyFederation``'s loads per client and time spent loading; nothing for an
        in-memory federation), its resident memory and CPU time so far."""
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "training": self.decision,
                "loaded": dict(getattr(self._data, "loaded", {})),
                "load_seconds": float(getattr(self._data, "load_seconds", 0.0)),
                "cached_bytes": int(getattr(self._data, "cached_bytes", 0)),
                "rss_bytes": _rss_bytes(), "cpu_seconds": time.process_time()}

    def fit(
        self, weights: torch.Tensor, tasks: Sequence[ClientTask] | _TaskPack,
        weighting: Weighting | None,
    ) -> list[TransportResult]:
        """Train ``tasks``; with ``weighting`` return one partial sum."""
        if isinstance(tasks, _TaskPack):
            tasks = tasks.unpack()
        failed: list[TransportResult] = []
        if self._per_round:
            tasks, failed = self._load_share(tasks)
        results = itertools.chain(
            failed, (_on_cpu(r) for r in self._local.fit(weights, tasks, weighting)))
        if weighting is None:
            return list(results)
        round_num = max(t.config.round for t in tasks)
        tally = RoundTally(weighting, weights.numel(), round_num, device="cpu")
        for result in results:
            tally.add(result)
        return [tally.to_partial()]

    def _load_share(self, tasks: Sequence[ClientTask],
                    ) -> tuple[list[ClientTask], list[TransportResult]]:
        """Load this round's share through the cache and point the batched transport at it;
        a client whose loading fails is a ``ClientFailure`` (as in sequential training)."""
        ok, failed = [], []
        for task in tasks:
            try:
                self._data.client(task.client_id)
                ok.append(task)
            except Exception as exc:  # the user's loader failed for this client
                failed.append(ClientFailure(task.client_id, f"{type(exc).__name__}: {exc}"))
        self._local.use_data(_Share(self._data, [t.client_id for t in ok]))
        return ok, failed

    def evaluate(
        self, weights: torch.Tensor, client_ids: Sequence[str], round_num: int,
    ) -> list[EvalResult]:
        """Federated evaluation of ``client_ids`` on their local test splits, in order."""
        return list(self._evaluator.evaluate(weights, client_ids, round_num))


class _Share:
    """Some clients of a ``LazyFederation``: what a batched worker trains in one round."""

    def __init__(self, data: LazyFederation, client_ids: list[str]) -> None:
        self._data, self.client_ids = data, client_ids

    def client(self, client_id: str) -> Any:
        return self._data.client(client_id)


def _rss_bytes() -> int:
    """This process's resident memory now (its peak where /proc is not there)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class WorkersLostError(FedmosaicError):
    """Every Ray worker is gone and none could be placed again: the run cannot go on."""


class RayTransport:
    """Trains each round's clients on a pool of Ray actors.

    Every actor builds its trainer once with ``trainer_factory`` (which must be picklable,
    e.g. a ``functools.partial`` of ``TorchTrainer``). The clients' data reaches the actors
    one of two ways:

    * ``federated_data``: a ``FederatedDataset`` held by the driver, put into the object
      store once and read by every actor (on one machine that is shared memory). A round's
      tasks are split across the actors balanced by client sample count.
    * ``source``: a client source (``fedmosaic.data.source``: the user's
      ``load_data(client_id)``, or one file per client) that every actor loads from, client
      by client, on its own node, keeping at most ``cache_bytes`` of clients in memory. The
      driver holds the client ids only; each client has a home actor (a stable hash of its
      id over the pool), so a client that trains again finds its data cached.

    Each actor trains its clients one after another (``inner="sequential"``) or, with
    ``inner="batched"``, as vmapped cohorts where that is faster (``BatchedTransport``
    decides per model and says why not; ``where()`` reports it; with a source the actor
    gathers only its share of each round), and,
    when the server passes a ``weighting``, sums their updates into one ``PartialAggregate``.
    A client whose training raises is a ``ClientFailure``. An actor that dies (or whose node
    is lost) has its clients trained again by the surviving actors within the round; a
    replacement is started and joins the pool once Ray places it, or is given up after
    ``start_timeout_s`` (the pool shrinks to what the cluster can hold). Every wait has a
    deadline: a round whose actors do not answer within ``round_timeout_s`` (an hour by
    default; None for no limit) fails those clients with the reason and replaces the
    actors; with no actor left the run stops with
    ``WorkersLostError`` (its last round is checkpointed; resume it on the cluster you have).

    Attaching: ``address`` (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``) or, without
    one, the ``RAY_ADDRESS`` environment variable (what ``ray job submit`` sets) joins that
    cluster; with neither a private local Ray is started, sized for the workers. A Ray
    already initialised in this process is reused. ``num_workers="auto"`` sizes the pool to
    the cluster's free resources (``cpus_per_worker``, ``gpus_per_worker``,
    ``memory_per_worker`` bytes per actor); a pool that cannot be placed at all is refused
    at once with the cluster's free resources. ``runtime_env`` (e.g. ``{"working_dir":
    "."}`` to bring the user's task module) is passed to Ray. ``ray_init_kwargs`` are passed
    to ``ray.init`` and override the defaults chosen here. ``close()`` (or leaving a
    ``with`` block) kills the actors and shuts Ray down if this transport started it.
    """

    def __init__(
        self,
        trainer_factory: Callable[[], Trainer],
        federated_data: FederatedDataset | None = None,
        *,
        source: ClientSource | None = None,
        num_workers: int | str = 2,
        address: str | None = None,
        cpus_per_worker: float = 1.0,
        gpus_per_worker: float = 0.0,
        memory_per_worker: int | None = None,
        runtime_env: dict[str, Any] | None = None,
        torch_threads: int = 1,
        inner: str = "sequential",
        cache_bytes: int = 256 * 2**20,
        start_timeout_s: float = 60.0,
        round_timeout_s: float | None = 3600.0,
        ray_init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        auto_size = num_workers == "auto"
        if not auto_size and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                              or num_workers < 1):
            raise ValueError(f"num_workers must be a positive integer or 'auto', got "
                             f"{num_workers!r}")
        if not cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {cpus_per_worker!r}")
        if not gpus_per_worker >= 0:
            raise ValueError(f"gpus_per_worker must be >= 0, got {gpus_per_worker!r}")
        if memory_per_worker is not None and not memory_per_worker > 0:
            raise ValueError(f"memory_per_worker must be > 0 bytes, got {memory_per_worker!r}")
        if isinstance(torch_threads, bool) or not isinstance(torch_threads, int) \
                or torch_threads < 1:
            raise ValueError(f"torch_threads must be a positive integer, got {torch_threads!r}")
        if inner not in ("sequential", "batched"):
            raise ValueError(f"inner must be 'sequential' or 'batched', got {inner!r}")
        if not start_timeout_s > 0 or (round_timeout_s is not None and not round_timeout_s > 0):
            raise ValueError("start_timeout_s and round_timeout_s must be > 0 seconds")
        ray = _import_ray()
        if (federated_data is None) == (source is None):
            raise ValueError("give either federated_data or source, not both or neither")
        if source is not None:
            source = check_source(source)
        self._ray = ray
        self.data = federated_data
        self.source = source
        self._ids = list(source.client_ids) if source is not None else \
            list(federated_data.client_ids)  # type: ignore[union-attr]
        self._sizes: dict[str, int] = dict(federated_data.sizes()) \
            if federated_data is not None else {}
        self._trainer_factory = trainer_factory
        self._torch_threads = torch_threads
        self.inner = inner
        self._cache_bytes = int(cache_bytes)
        self.start_timeout_s = float(start_timeout_s)
        self.round_timeout_s = round_timeout_s
        self._driver_trainer: Trainer | None = None
        self._test_size_cache: dict[str, int] | None = None
        self._actors: list[Any] = []
        self._starting: list[tuple[Any, Any, float]] = []  # (actor, ready ref, started at)
        self._data_ref: Any = None
        self._closed = False
        self._owns_ray = False
        address = address if address is not None else (os.environ.get("RAY_ADDRESS") or None)
        self.address = address
        resources = {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_worker,
                     **({"memory": memory_per_worker} if memory_per_worker else {})}
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
                # Leave the application's logging as it is: by default ray.init puts its own
                # handler on the root logger, bound to the sys.stderr of that moment.
                "configure_logging": False,
            }
            if address is None:
                # "local", not None: None would join a cluster left by ``ray start`` on this
                # machine instead of starting a private one.
                init_kwargs["address"] = "local"
                workers = 1 if auto_size else int(num_workers)
                init_kwargs["num_cpus"] = max(1, math.ceil(workers * cpus_per_worker))
                if gpus_per_worker:
                    init_kwargs["num_gpus"] = math.ceil(workers * gpus_per_worker)
                init_kwargs["include_dashboard"] = False
            else:
                init_kwargs["address"] = address
            if runtime_env:
                init_kwargs["runtime_env"] = runtime_env
            init_kwargs.update(ray_init_kwargs or {})
            try:
                ray.init(**init_kwargs)
            except Exception as exc:
                raise RuntimeError(f"Ray could not start or attach ({address or 'local'}): "
                                   f"{_first_line(exc)}") from exc
            self._owns_ray = True
        try:
            self.num_workers = self._pool_size(num_workers, resources)
            # Put once: every actor, including replacements, reads this one copy (a source
            # is small: the actors load the clients themselves).
            self._data_ref = ray.put(federated_data if federated_data is not None else source)
            options: dict[str, Any] = {**resources, "max_restarts": 0}
            if runtime_env and ray.is_initialized() and not self._owns_ray:
                options["runtime_env"] = runtime_env  # a Ray this transport did not start
            self._actor_class = ray.remote(_Worker).options(**options)
            self._actors = [self._spawn() for _ in range(self.num_workers)]
            self._await_start(self._actors)
        except BaseException:
            self.close()
            raise

    # -- start-up ----------------------------------------------------------------------------
    def _pool_size(self, num_workers: int | str, resources: dict[str, Any]) -> int:
        """``num_workers``, or for "auto" as many actors as the cluster's free resources
        hold; a clear refusal when not even one fits."""
        free = self._ray.available_resources()
        need = {"CPU": resources["num_cpus"], "GPU": resources["num_gpus"],
                "memory": resources.get("memory", 0)}
        fits = min((int(free.get(k, 0.0) // v) for k, v in need.items() if v), default=0)
        if fits < 1:
            have = ", ".join(f"{k} {free.get(k, 0.0):g}" for k, v in need.items() if v)
            want = ", ".join(f"{k} {v:g}" for k, v in need.items() if v)
            raise RuntimeError(f"no Ray worker can be placed: each needs {want}; the cluster "
                               f"has {have} free")
        if num_workers == "auto":
            log.info("RayTransport: %d workers, sized to the cluster's free resources", fits)
            return fits
        if int(num_workers) > fits:
            log.warning("RayTransport: %s workers asked for, the cluster's free resources hold "
                        "%d now; those Ray cannot place within %g s are given up", num_workers,
                        fits, self.start_timeout_s)
        return int(num_workers)

    def _await_start(self, actors: list[Any]) -> None:
        """Wait until every actor has built its trainer (at most ``start_timeout_s``), and
        fail with Ray's actual cause when one cannot start."""
        ray = self._ray
        refs = [a.ready.remote() for a in actors]
        ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=self.start_timeout_s)
        try:
            ray.get(ready)
        except ray.exceptions.RayError as exc:
            # Fail here, not with every client failing every round (e.g. a factory that
            # raises, or fedmosaic missing on the cluster's nodes).
            raise RuntimeError(f"Ray workers failed to start: {_cause(exc)}") from exc
        if waiting:
            placed = len(refs) - len(waiting)
            if placed == 0:
                raise RuntimeError(
                    f"no Ray worker started within {self.start_timeout_s:g} s (the cluster "
                    f"has {_free(ray)} free; each worker needs what cpus_per_worker, "
                    "gpus_per_worker and memory_per_worker say)")
            unplaced = set(waiting)
            late = [a for a, r in zip(actors, refs, strict=True) if r in unplaced]
            log.warning("RayTransport: %d of %d workers could not be placed within %g s; "
                        "going on with %d", len(late), len(refs), self.start_timeout_s, placed)
            for actor in late:
                self._kill(actor)
            self._actors = [a for a in self._actors if a not in late]

    # -- Transport protocol ------------------------------------------------------------------
    def available_clients(self) -> list[str]:
        return list(self._ids)

    def full_steps(self, client_id: str, config: FitConfig) -> int:
        if self.data is None:
            raise ValueError("straggler simulation needs each client's sample count, which a "
                             "client source does not give the driver; use a FederatedDataset")
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
        """Dispatch ``tasks`` to the actors and yield their results, in group order."""
        if self._closed:
            raise RuntimeError("RayTransport is closed")
        if not tasks:
            return
        weights_ref = self._ray.put(weights.detach().to("cpu"))  # once per round, shared
        round_num = max(t.config.round for t in tasks)

        def call(actor: Any, group: list[ClientTask]) -> Any:
            return actor.fit.remote(weights_ref, _TaskPack(group), weighting)

        def lost(group: list[ClientTask], reason: str) -> list[TransportResult]:
            return self._failures([t.client_id for t in group], round_num, reason)

        for results in self._run(self._groups(list(tasks), lambda t: t.client_id), call, lost):
            for result in results:
                self._log_failures(result)
                yield result

    def evaluate(
        self, weights: torch.Tensor, client_ids: Sequence[str], round_num: int,
    ) -> Iterator[EvalResult]:
        """Federated evaluation on the actors, where the data already is.

        The clients are split as in ``fit`` (by test-split size for an in-memory
        federation); each actor evaluates its clients one after another exactly as
        ``SequentialTransport`` does, and the reports are yielded in group order. A lost
        actor's clients are evaluated by the others, as in ``fit``.
        """
        if self._closed:
            raise RuntimeError("RayTransport is closed")
        if not client_ids:
            return
        weights_ref = self._ray.put(weights.detach().to("cpu"))

        def call(actor: Any, group: list[str]) -> Any:
            return actor.evaluate.remote(weights_ref, group, round_num)

        def lost(group: list[str], reason: str) -> list[EvalResult]:
            return list(self._failures(group, round_num, reason))

        sizes = self._test_sizes() if self.data is not None else None
        for results in self._run(self._groups(list(client_ids), str, sizes), call, lost):
            yield from results

    # -- dispatch ----------------------------------------------------------------------------
    def _groups(self, items: list[_T], key: Callable[[_T], str],
                sizes: dict[str, int] | None = None) -> list[list[_T]]:
        """One group per live actor: balanced by sample count for an in-memory federation;
        for a source, each client at its home actor (a stable hash of its id), so that its
        data is found in that actor's cache when it trains again."""
        self._admit_started()
        if not self._actors:
            self._await_any_replacement()
        n = len(self._actors)
        if self.data is not None:
            table = self._sizes if sizes is None else sizes
            return _balance(items, [table.get(key(i), 0) for i in items], n)
        groups: list[list[_T]] = [[] for _ in range(n)]
        for item in items:
            groups[zlib.crc32(key(item).encode()) % n].append(item)
        return groups

    def _run(self, groups: list[list[_T]], call: Callable[[Any, list[_T]], Any],
             lost: Callable[[list[_T], str], list[Any]]) -> Iterator[list[Any]]:
        """Run each group on its actor; a group whose actor is lost runs again on a
        surviving actor (once); yields each group's results in group order."""
        ray = self._ray
        deadline = None if self.round_timeout_s is None else \
            time.monotonic() + self.round_timeout_s
        out: dict[int, list[Any]] = {}
        pending: dict[Any, tuple[int, Any, list[_T], bool]] = {}
        actors = list(self._actors)
        for gi, group in enumerate(groups):
            if group:
                pending[call(actors[gi], group)] = (gi, actors[gi], group, False)
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            if not ready:  # the round's deadline passed
                for gi, actor, group, _ in pending.values():
                    reason = (f"Ray worker {self._index(actor)} did not answer within "
                              f"{self.round_timeout_s:g} s")
                    out[gi] = lost(group, reason)
                    self._lose(actor, reason)  # killed: its late answer is never read
                break
            ref = ready[0]
            gi, actor, group, retried = pending.pop(ref)
            try:
                out[gi] = ray.get(ref)
                continue
            except ray.exceptions.RayTaskError as exc:
                # Raised inside the actor's method: the actor itself is still usable.
                out[gi] = lost(group, f"Ray worker {self._index(actor)} failed: "
                                      f"{_first_line(exc)}")
                continue
            except ray.exceptions.RayError as exc:
                reason = f"Ray worker {self._index(actor)} lost: {_first_line(exc)}"
                self._lose(actor, reason)
            if retried:
                out[gi] = lost(group, reason)
                continue
            survivors = [a for a in self._actors if a is not actor]
            if not survivors:
                # The last actor is gone: wait (bounded) for a replacement to be placed, or
                # stop the run with WorkersLostError rather than fail round after round.
                self._await_any_replacement()
                survivors = list(self._actors)
            # Train the lost group again on the surviving actor with the least work left.
            busy = {id(a): 0 for a in survivors}
            for _, a, g, _ in pending.values():
                if id(a) in busy:
                    busy[id(a)] += len(g)
            other = min(survivors, key=lambda a: (busy[id(a)], self._actors.index(a)))
            log.warning("%s; its %d clients train again on worker %d", reason, len(group),
                        self._actors.index(other))
            pending[call(other, group)] = (gi, other, group, True)
        for gi in sorted(out):
            yield out[gi]

    def _failures(self, client_ids: list[str], round_num: int,
                  reason: str) -> list[ClientFailure]:
        out = []
        for cid in client_ids:
            log.warning("client %s failed in round %d: %s", cid, round_num, reason)
            out.append(ClientFailure(cid, reason))
        return out

    def _test_sizes(self) -> dict[str, int]:
        if self._test_size_cache is None:
            assert self.data is not None
            self._test_size_cache = {
                c.client_id: 0 if c.test is None else len(c.test) for c in self.data.clients}
        return self._test_size_cache

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
        """The current actor handles (a copy; losses and replacements change it)."""
        return list(self._actors)

    def where(self) -> list[dict[str, Any]]:
        """Each live actor's node, process and loads (``_Worker.where``)."""
        return self._ray.get([a.where.remote() for a in self._actors],
                             timeout=self.start_timeout_s)

    def describe(self) -> dict[str, Any]:
        """What a run records: the live workers, the nodes they are on, where the client
        data is loaded and, for batched workers, what they decided."""
        out: dict[str, Any] = {"workers": len(self._actors),
                               "client_data": "loaded on the workers" if self.source is not None
                               else "in the object store"}
        try:
            where = self.where()
        except Exception as exc:  # a worker lost just now: the record says so, the run goes on
            out["nodes"] = f"unknown ({_first_line(exc)})"
            return out
        out["nodes"] = len({w["node_id"] for w in where})
        if self.inner == "batched":
            out["batching"] = sorted({w["training"] for w in where})
        return out

    def _index(self, actor: Any) -> int:
        return self._actors.index(actor) if actor in self._actors else -1

    def _spawn(self) -> Any:
        return self._actor_class.remote(self._trainer_factory, self._data_ref,
                                        self._torch_threads, self._cache_bytes, self.inner)

    def _kill(self, actor: Any) -> None:
        try:
            self._ray.kill(actor, no_restart=True)
        except Exception as exc:  # already gone: nothing left to kill
            log.debug("killing Ray worker: %s", exc)

    def _lose(self, actor: Any, reason: str) -> None:
        """Drop a lost actor from the pool and start its replacement, which joins the pool
        once Ray has placed it (``_admit_started``)."""
        if actor not in self._actors:
            return
        self._actors.remove(actor)
        self._kill(actor)
        replacement = self._spawn()
        self._starting.append((replacement, replacement.ready.remote(), time.monotonic()))
        log.warning("%s; a replacement worker is starting", reason)

    def _admit_started(self) -> None:
        """Replacements that have started join the pool; one that failed, or that Ray could
        not place within ``start_timeout_s``, is given up (the pool shrinks)."""
        if not self._starting:
            return
        ray = self._ray
        still = []
        for actor, ref, since in self._starting:
            done, _ = ray.wait([ref], timeout=0)
            if done:
                try:
                    ray.get(done[0])
                    self._actors.append(actor)
                    log.warning("a replacement Ray worker joined: %d workers", len(self._actors))
                except ray.exceptions.RayError as exc:
                    log.warning("a replacement Ray worker failed to start: %s", _cause(exc))
            elif time.monotonic() - since > self.start_timeout_s:
                self._kill(actor)
                log.warning("a replacement Ray worker could not be placed within %g s (the "
                            "cluster has %s free); going on with %d workers",
                            self.start_timeout_s, _free(ray), len(self._actors))
            else:
                still.append((actor, ref, since))
        self._starting = still

    def _await_any_replacement(self) -> None:
        """With no live actor, wait (at most ``start_timeout_s``) for a replacement to start;
        raise ``WorkersLostError`` if none does."""
        ray = self._ray
        while self._starting and not self._actors:
            oldest = min(since for _, _, since in self._starting)
            left = self.start_timeout_s - (time.monotonic() - oldest)
            ray.wait([ref for _, ref, _ in self._starting], num_returns=1,
                     timeout=max(0.0, left))
            self._admit_started()
        if not self._actors:
            raise WorkersLostError(
                f"every Ray worker was lost and none could be started again within "
                f"{self.start_timeout_s:g} s (the cluster has {_free(ray)} free): the run "
                "stops here; its last completed round is checkpointed, so resume it once the "
                "cluster can hold a worker")

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Kill the actors; shut Ray down if this transport started it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for actor in self._actors + [a for a, _, _ in self._starting]:
            self._kill(actor)
        self._actors, self._starting = [], []
        # Dropping the reference lets a shared Ray instance free the data set's memory.
        self._data_ref = None
        ray = self._ray
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> RayTransport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _free(ray: Any) -> str:
    """The cluster's free CPU, GPU and memory, for messages."""
    try:
        free = ray.available_resources()
    except Exception:  # a lost connection: say so rather than fail the message
        return "unknown resources"
    parts = [f"CPU {free.get('CPU', 0.0):g}"]
    if free.get("GPU"):
        parts.append(f"GPU {free['GPU']:g}")
    if free.get("memory"):
        parts.append(f"memory {free['memory'] / 2**30:.1f} GiB")
    return ", ".join(parts)


# Causes that Ray reports only in its logs, with what to do about them: (words that name it,
# matched without case, advice).
_KNOWN_CAUSES = (
    (("authorization", "authentication"),
     "Ray's token authentication refused the worker (Ray 2.60 turns it on after an earlier "
     "local ray.init): start the cluster and the driver with the same RAY_AUTH_TOKEN, or "
     "restart the cluster"),
    (("modulenotfounderror",),
     "a module the workers need is not installed on the cluster's nodes: install it there, "
     "or pass runtime_env={'working_dir': ...} / {'pip': [...]}"),
)


def _known_cause(text: str) -> str | None:
    """The advice for the known cause (``_KNOWN_CAUSES``) that ``text`` names, if any."""
    low = text.lower()
    return next((advice for words, advice in _KNOWN_CAUSES
                 if any(w in low for w in words)), None)


def _cause(exc: BaseException) -> str:
    """Ray's error, with its cause where Ray hides it: an actor that died before its
    constructor finished says only that; the reason is in the message's body or in the
    session's logs, which are searched for known causes."""
    text = str(exc)
    line = _first_line(exc)
    advice = _known_cause(text)
    if advice is not None:
        return f"{line} ({advice})"
    body = [ln.strip() for ln in text.splitlines()[1:] if ln.strip()]
    detail = next((ln for ln in reversed(body) if "error" in ln.lower()), None)
    logged = _logged_cause()
    extra = f"; Ray's log says: {logged}" if logged else ""
    return f"{line}{f' ({detail})' if detail and detail not in line else ''}{extra}"


def _logged_cause() -> str | None:
    """The known cause (``_KNOWN_CAUSES``) in this Ray session's newest log files, if any."""
    try:
        import ray

        session = ray._private.worker._global_node.get_session_dir_path()
    except Exception:  # no local session (a ray:// client) or Ray internals moved
        return None
    logs = Path(session) / "logs"
    try:
        files = sorted(logs.glob("*.err")) + sorted(logs.glob("*.log"))
    except OSError:
        return None
    found = None
    for path in files[-200:]:
        try:
            tail = path.read_bytes()[-65536:].decode("utf-8", "replace")
        except OSError:
            continue
        found = _known_cause(tail) or found
    return found
