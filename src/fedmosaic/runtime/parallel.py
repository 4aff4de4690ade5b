"""ParallelTransport: a round's clients trained concurrently by worker processes on one machine.

When to use it
--------------
``SequentialTransport`` and ``BatchedTransport`` train every client in one process, so a
compute-bound model (a CNN on a CPU) uses one core however many the machine has.
``ParallelTransport`` starts ``num_workers`` worker processes (by default one per usable core,
``os.sched_getaffinity``), each with one torch thread, and splits every round's clients among
them, balanced by sample count (greedy longest-processing-time, ``balance_tasks``). Each worker
trains its share one client after another (``inner="sequential"``) or as vmapped cohorts
(``inner="batched"``, ``BatchedTransport``). It is ``RayTransport``'s job without Ray: no
object store, no cluster, start-up in about the time one process takes to import torch.

What travels where
------------------
* **Processes.** Workers are started with the ``forkserver`` start method: a clean server
  process that has imported torch and fedmosaic (and never run a torch operation, so no
  OpenMP thread pool exists in it) forks every worker. ``fork`` from the parent could
  deadlock once torch has started threads there; ``spawn`` would make every worker import
  torch again (twice the CPU at start-up). All workers are started at once, then awaited.
  As with every non-``fork`` start method, a script that builds the transport at top level
  must be guarded by ``if __name__ == "__main__":`` (workers import the main module), and
  a model class the workers cannot import by name (defined in a notebook or ``python -c``,
  or in a file loaded under a made-up module name) cannot be unpickled there:
  ``unsupported_reason`` says so before any process starts.
* **Trainer.** A ``Trainer`` instance is pickled once and unpickled by each worker; a factory
  (e.g. ``functools.partial(TorchTrainer, ...)``) is pickled and called in each worker.
* **Data.** Sent once, never per round. When every client's splits are ``ArrayDataset``s, all
  their arrays are copied once into one shared-memory block
  (``multiprocessing.shared_memory``) that every worker, and every replacement worker, maps
  read-only, with the strides each array had (torch chooses kernels by them); otherwise the
  federated data set is pickled once to each worker at start.
* **Global weights.** Written once per round (and per evaluation) by the parent into a shared
  buffer of ``D`` floats; each worker copies them from there. Only the small task descriptions
  (``ClientTask``: config, client stages, dispatch transform) are pickled per round.
* **Results.** With a ``weighting`` (a streaming aggregator) each worker validates and sums
  its clients into one ``PartialAggregate`` (``RoundTally``, as the Ray path), so one vector
  per worker comes back; without one (robust rules, central DP clipping, SecAgg+) every
  client's ``ClientUpdate`` comes back. Tensors travel as plain arrays through pipes.

Determinism
-----------
Individual updates (and evaluation reports) are yielded in the order of the tasks (client
ids), exactly as ``SequentialTransport`` yields them, and each client's training is the same
computation (same seed, same data layout, one thread), so runs without a ``weighting`` give
the model of a sequential run with one torch thread bit for bit. Partial sums are yielded in
worker order: two runs with the same seed and the same ``num_workers`` give the same model bit
for bit, and the model equals the sequential one up to float rounding (the weighted sum adds
the updates in another order).

Failures
--------
A client whose training raises is that client's ``ClientFailure`` (the worker goes on). A worker
that dies (killed, segfault, out of memory) turns each of its clients into a
``ClientFailure`` naming the worker and its exit code ("parallel worker 1 lost: exit code -9
(SIGKILL)"); a replacement is started at once, and the round never waits on a dead worker (the
parent waits on the workers' pipes and process sentinels together, never on one blocking
receive). A trainer or factory that cannot be built in a worker fails the constructor with a
``RuntimeError`` naming the reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.machinery
import io
import logging
import multiprocessing as mp
import os
import pickle
import signal
import sys
import time
import types
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing import connection, forkserver
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import torch

from fedmosaic.algorithms.strategy import ClientTask
from fedmosaic.core.errors import ConfigError
from fedmosaic.data.dataset import ArrayDataset, ClientData, FederatedDataset
from fedmosaic.runtime.ray_transport import _balance, balance_tasks
from fedmosaic.runtime.tally import ClientFailure, PartialAggregate, RoundTally, Weighting
from fedmosaic.runtime.transport import EvalResult, SequentialTransport, TransportResult
from fedmosaic.train.base import FitConfig, Trainer

log = logging.getLogger(__name__)

__all__ = ["ParallelTransport"]

_INNER = ("sequential", "batched")
# Modules the forkserver imports before it forks any worker: torch's import is most of a
# worker's start-up, paid once in the server instead of once per worker.
_PRELOAD = ["fedmosaic.runtime.parallel", "fedmosaic.train.torch_trainer"]
_ALIGN = 64  # byte alignment of each array in the shared data block
_STOP_GRACE_S = 2.0  # how long close() lets a worker exit on its own before killing it


# -- wire format ------------------------------------------------------------------------------
def _tensor_from_array(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array)


class _Pickler(pickle.Pickler):
    """Plain CPU tensors travel as numpy arrays: a tensor's own pickling goes through
    ``torch.save`` per storage (slow for many small deltas), and ``multiprocessing``'s pickler
    would move every tensor into a shared-memory file descriptor of its own."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is torch.Tensor and obj.device.type == "cpu" and not obj.requires_grad:
            try:
                return _tensor_from_array, (obj.numpy(),)
            except (TypeError, RuntimeError):  # no numpy dtype (bfloat16...): default path
                return NotImplemented
        return NotImplemented


def _dumps(obj: object) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=5).dump(obj)
    return buf.getvalue()


_loads = pickle.loads


# -- shared memory ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _ArraySlot:
    """Where one array lives in a shared block, with the strides it had in the parent."""

    offset: int
    shape: tuple[int, ...]
    dtype: str
    strides: tuple[int, ...] | None = None


@dataclass
class _DataLayout:
    """The federated data set as arrays in one shared block: what a worker needs to map it."""

    shm_name: str
    name: str
    num_classes: int
    feature_shape: tuple[int, ...]
    clients: list[tuple[str, tuple[_ArraySlot, _ArraySlot],
                        tuple[_ArraySlot, _ArraySlot] | None]] = field(default_factory=list)
    test: tuple[_ArraySlot, _ArraySlot] | None = None  # the central test set, if any


def _shareable(data: object) -> bool:
    """Whether every client split is a plain ``ArrayDataset`` (arrays can be shared as is)."""
    if not isinstance(data, FederatedDataset):
        return False
    return all(type(c.train) is ArrayDataset and (c.test is None or type(c.test) is ArrayDataset)
               for c in data.clients)


def _share_data(data: FederatedDataset) -> tuple[SharedMemory, _DataLayout]:
    """Copy every client's arrays once into one shared-memory block."""
    arrays: list[np.ndarray] = []
    for c in data.clients:
        arrays += [c.train.x, c.train.y]
        if c.test is not None:
            arrays += [c.test.x, c.test.y]
    # The central test set too: the workers evaluate shares of it (``predict_test``).
    central = data.test if type(data.test) is ArrayDataset else None
    if central is not None:
        arrays += [central.x, central.y]
    # A dense array keeps its exact strides: they differ from the canonical ones on size-1
    # axes (numpy's choice after a reshape), and torch reads them, e.g. an (n, 1, 28, 28)
    # image array whose channel stride is one element is taken as channels-last, for which
    # the convolutions on a CPU are about 30% faster. Workers then compute on the same layout
    # as the parent (same kernels, same bits, same speed).
    arrays = [a if a.flags.c_contiguous or a.flags.f_contiguous else np.ascontiguousarray(a)
              for a in arrays]
    slots, size = [], 0
    for a in arrays:
        slots.append(_ArraySlot(size, tuple(a.shape), a.dtype.str, tuple(a.strides)))
        size += -(-a.nbytes // _ALIGN) * _ALIGN
    shm = _create_shm(size)
    try:
        for a, s in zip(arrays, slots):
            np.ndarray(a.shape, a.dtype, buffer=shm.buf, offset=s.offset,
                       strides=s.strides)[...] = a
    except BaseException:
        _release_shm(shm)
        raise
    layout = _DataLayout(shm.name, data.name, data.num_classes, tuple(data.feature_shape))
    it = iter(slots)
    for c in data.clients:
        train = (next(it), next(it))
        test = (next(it), next(it)) if c.test is not None else None
        layout.clients.append((c.client_id, train, test))
    if central is not None:
        layout.test = (next(it), next(it))
    return shm, layout


def _create_shm(nbytes: int) -> SharedMemory:
    """A new shared-memory block; refuses one that would not fit in the shared-memory file
    system (on Linux a block larger than /dev/shm's free space is created, and the first
    write beyond it kills the process with SIGBUS)."""
    nbytes = max(1, nbytes)
    if os.path.isdir("/dev/shm"):
        st = os.statvfs("/dev/shm")
        free = st.f_bavail * st.f_frsize
        if nbytes > free:
            raise OSError(f"shared memory needs {nbytes / 2**20:.0f} MiB but /dev/shm has "
                          f"{free / 2**20:.0f} MiB free")
    return SharedMemory(create=True, size=nbytes)


def _release_shm(shm: SharedMemory) -> None:
    with contextlib.suppress(BufferError):  # a view still exported: it goes with the process
        shm.close()
    with contextlib.suppress(FileNotFoundError):
        shm.unlink()


def _attach(name: str) -> SharedMemory:
    return SharedMemory(name=name)


def _view(shm: SharedMemory, slot: _ArraySlot) -> np.ndarray:
    a = np.ndarray(slot.shape, np.dtype(slot.dtype), buffer=shm.buf, offset=slot.offset,
                   strides=slot.strides)
    a.flags.writeable = False  # shared by every worker: no trainer may change it
    return a


def _mapped_data(shm: SharedMemory, layout: _DataLayout) -> FederatedDataset:
    """The federated data set over the shared block (no copy). No global test set: only the
    parent evaluates centrally."""
    clients = []
    for cid, (tx, ty), test in layout.clients:
        clients.append(ClientData(
            cid, ArrayDataset(_view(shm, tx), _view(shm, ty)),
            None if test is None else ArrayDataset(_view(shm, test[0]), _view(shm, test[1]))))
    return FederatedDataset(name=layout.name, clients=clients, test=None,
                            num_classes=layout.num_classes, feature_shape=layout.feature_shape)


@dataclass(frozen=True)
class _WeightsRef:
    """The round's global weights in the parent's shared buffer."""

    shm_name: str
    shape: tuple[int, ...]
    dtype: str


# -- the worker process -----------------------------------------------------------------------
@dataclass
class _Init:
    """What a worker receives once, at start."""

    index: int
    trainer: bytes  # a pickled Trainer, or a pickled factory
    is_factory: bool
    inner: str
    torch_threads: int
    data: _DataLayout | bytes  # shared layout, or the pickled federated data set


class _WorkerState:
    """One worker's trainer, data and inner transport, reused for every round."""

    def __init__(self, init: _Init) -> None:
        obj = pickle.loads(init.trainer)
        trainer: Trainer = obj() if init.is_factory else obj
        self.trainer = trainer
        self._data_shm: SharedMemory | None = None
        self.test: ArrayDataset | None = None
        if isinstance(init.data, _DataLayout):
            self._data_shm = _attach(init.data.shm_name)
            data: Any = _mapped_data(self._data_shm, init.data)
            if init.data.test is not None:
                tx, ty = init.data.test
                self.test = ArrayDataset(_view(self._data_shm, tx), _view(self._data_shm, ty))
        else:
            data = pickle.loads(init.data)
            self.test = getattr(data, "test", None)
        self.inner: Any
        if init.inner == "batched":
            from fedmosaic.runtime.batched import BatchedTransport

            self.inner = BatchedTransport(trainer, data)  # type: ignore[arg-type]
        else:
            self.inner = SequentialTransport(trainer, data)
        self._weights: tuple[str, SharedMemory] | None = None

    def fallback_reason(self) -> str | None:
        return getattr(self.inner, "fallback_reason", None)

    def weights(self, ref: _WeightsRef | torch.Tensor) -> torch.Tensor:
        if isinstance(ref, torch.Tensor):
            return ref
        if self._weights is None or self._weights[0] != ref.shm_name:
            if self._weights is not None:
                self._weights[1].close()
            self._weights = (ref.shm_name, _attach(ref.shm_name))
        shm = self._weights[1]
        view = np.ndarray(ref.shape, np.dtype(ref.dtype), buffer=shm.buf)
        # A copy: the trainer may keep or modify what it gets, the buffer is next round's.
        return torch.from_numpy(view.copy())

    def fit(self, ref: _WeightsRef | torch.Tensor, tasks: list[ClientTask],
            weighting: Weighting | None) -> list[TransportResult]:
        weights = self.weights(ref)
        results = self.inner.fit(weights, tasks, weighting)
        if weighting is None:
            return list(results)
        tally = RoundTally(weighting, weights.numel(), max(t.config.round for t in tasks),
                           device="cpu")
        for result in results:
            tally.add(result)
        return [tally.to_partial()]

    def evaluate(self, ref: _WeightsRef | torch.Tensor, client_ids: list[str],
                 round_num: int) -> list[EvalResult]:
        return list(self.inner.evaluate(self.weights(ref), client_ids, round_num))

    def predict(self, ref: _WeightsRef | torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The model's outputs for samples ``start:stop`` of the central test set."""
        predict = getattr(self.trainer, "predict", None)
        if self.test is None or predict is None:
            raise RuntimeError("no central test set or no trainer.predict in this worker")
        part = ArrayDataset(self.test.x[start:stop], self.test.y[start:stop])
        return predict(self.weights(ref), part)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


_KEEP_ALIVE: list[_WorkerState] = []

# glibc's mallopt parameters, and the values its dynamic thresholds reach in a long-running
# process (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, and twice that for trimming).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD, _TRIM_THRESHOLD = 32 * 2**20, 64 * 2**20


def _tune_allocator() -> None:
    """Keep freed activation memory in the worker's heap, as a long-running process does.

    A fresh process starts with glibc's 128 KiB mmap threshold: every activation buffer above
    it (a CNN's are around 1 MiB) is mapped and unmapped at each step, and the heap top is
    trimmed back to the system after each free; the new pages fault in again, zeroed, at the
    next step. Measured on the issue's CNN: about 20,000 page faults per client fit and 40-50%
    more CPU than the same training in the parent, whose thresholds have long risen. Fixing
    them at the values glibc itself reaches removes the difference. Elsewhere (no glibc):
    nothing to do.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)


def _worker_main(conn: connection.Connection) -> None:
    """A worker's life: build the trainer and data, then answer calls until told to stop or
    the parent goes away (end of file on the pipe)."""
    # Ctrl-C reaches the whole process group: the parent handles it and stops the workers;
    # a KeyboardInterrupt traceback from every worker would only bury its message.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        init: _Init = _loads(conn.recv_bytes())
        _tune_allocator()
        # Several workers share the cores: one thread each unless asked otherwise.
        torch.set_num_threads(init.torch_threads)
        # The parent logs every client failure and the batched fallback once; the same
        # lines from every worker's stderr would only repeat them.
        logging.getLogger("fedmosaic").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        warnings.filterwarnings("ignore", message="BatchedTransport: training sequentially")
        state = _WorkerState(init)
    except BaseException as exc:  # reported to the parent, which fails its constructor
        with contextlib.suppress(Exception):  # the parent gone, the pipe broken: no one to tell
            conn.send_bytes(_dumps(("error", _reason(exc))))
        return
    # Kept until the process exits: its arrays are views of shared memory, which cannot be
    # closed while they exist (collecting them at exit would print BufferErrors).
    _KEEP_ALIVE.append(state)
    conn.send_bytes(_dumps(("ready", os.getpid(), state.fallback_reason())))
    while True:
        try:
            msg = _loads(conn.recv_bytes())
        except (EOFError, OSError):  # the parent closed the pipe or died
            return
        kind, call_id, args = msg
        if kind == "stop":
            return
        try:
            call = {"fit": state.fit, "evaluate": state.evaluate, "predict": state.predict}
            out = call[kind](*args)
            reply = _dumps(("ok", call_id, out, state.fallback_reason()))
        except Exception as exc:  # the whole call failed (not one client): say why
            reply = _dumps(("failed", call_id, _reason(exc), state.fallback_reason()))
        try:
            conn.send_bytes(reply)
        except (EOFError, OSError):
            return


# -- the parent side --------------------------------------------------------------------------
def _exit_text(code: int | None) -> str:
    if code is None:
        return "exit code unknown"
    if code < 0:
        try:
            return f"exit code {code} ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return f"exit code {code}"


@dataclass
class _Worker:
    process: Any  # multiprocessing.Process of the forkserver context
    conn: connection.Connection
    ready: bool = False


@dataclass
class _Pool:
    """Everything that must be freed when the transport goes, reachable without the
    transport itself (the finalizer may not hold a reference to it)."""

    workers: list[_Worker | None] = field(default_factory=list)
    segments: list[SharedMemory] = field(default_factory=list)


def _shutdown(pool: _Pool) -> None:
    """Stop every worker (ask, then terminate, then kill) and free the shared memory."""
    alive = [w for w in pool.workers if w is not None]
    pool.workers = [None] * len(pool.workers)
    for w in alive:
        with contextlib.suppress(OSError, ValueError):
            w.conn.send_bytes(_dumps(("stop", 0, ())))
    deadline = time.monotonic() + _STOP_GRACE_S
    for w in alive:
        w.process.join(max(0.0, deadline - time.monotonic()))
    for w in alive:
        if w.process.is_alive():
            w.process.kill()
        w.process.join(5.0)
        w.conn.close()
    for shm in pool.segments:
        _release_shm(shm)
    pool.segments.clear()


def _importable_elsewhere(module: str) -> bool:
    """Whether a fresh worker process can import ``module`` by name (as unpickling does)."""
    if module == "__main__":
        # Workers import the main module from its file or module name, if it has one.
        main = sys.modules.get("__main__")
        return main is not None and (getattr(main, "__spec__", None) is not None
                                     or os.path.isfile(getattr(main, "__file__", None) or ""))
    top = module.partition(".")[0]
    if top in sys.builtin_module_names:
        return True
    # Not importlib.util.find_spec: it answers from sys.modules, where a module loaded from a
    # file under a made-up name (fedmosaic.task's odd file names) is found too.
    return importlib.machinery.PathFinder.find_spec(top, sys.path) is not None


@contextlib.contextmanager
def _main_hidden_if_unrunnable() -> Iterator[None]:
    """Hide a main module's ``__file__`` that names no file while a worker starts.

    ``python - < script.py`` (or code run by ``exec``) leaves ``__main__.__file__`` as
    "<stdin>" or the like: multiprocessing would make every worker run that path as its main
    module, and every worker would fail. Without ``__file__`` it leaves ``__main__`` alone,
    as for an interactive session (whose classes ``unsupported_reason`` refuses).
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or getattr(main, "__spec__", None) is not None \
            or os.path.isfile(path):
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


class _ImportCheck(pickle.Pickler):
    """Pickles as usual and notes the first class or function whose module a worker
    process could not import."""

    found: tuple[str, str] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._seen: dict[str, bool] = {}

    def reducer_override(self, obj: Any) -> Any:
        if self.found is None and isinstance(obj, (type, types.FunctionType)):
            module = getattr(obj, "__module__", None)
            if isinstance(module, str):
                ok = self._seen.get(module)
                if ok is None:
                    ok = self._seen[module] = _importable_elsewhere(module)
                if not ok:
                    self.found = (getattr(obj, "__qualname__", repr(obj)), module)
        return NotImplemented


def _pickle_checked(obj: object) -> tuple[bytes, tuple[str, str] | None]:
    """``obj`` pickled (a trainer, a factory, a client stage), and (name, module) of a class
    or function it needs that worker processes could not import, if any."""
    buf = io.BytesIO()
    check = _ImportCheck(buf, protocol=5)
    check.dump(obj)
    return buf.getvalue(), check.found


class ParallelTransport:
    """Trains each round's clients concurrently on ``num_workers`` local worker processes.

    ``trainer`` is a ``Trainer`` (pickled once to every worker) or a factory that builds one
    (pickled, then called in every worker). ``num_workers`` defaults to the cores this process
    may run on; ``torch_threads`` is each worker's torch thread count; ``inner`` is how a
    worker trains its share: ``"sequential"`` (client after client) or ``"batched"``
    (``BatchedTransport``, which falls back to sequential where it cannot batch; the reason
    is in ``batched_fallback``). ``start_timeout`` bounds the start of the workers.

    The module docstring says what travels where, what is deterministic and how failures are
    reported. ``close()`` (or leaving a ``with`` block) stops the workers and frees the shared
    memory; a transport that is garbage-collected or still open at interpreter exit is closed
    too, and workers exit by themselves when the parent dies.
    """

    supports_dispatch = True

    def __init__(
        self,
        trainer: Trainer | Callable[[], Trainer],
        federated_data: FederatedDataset,
        *,
        num_workers: int | None = None,
        torch_threads: int = 1,
        inner: str = "sequential",
        start_timeout: float = 60.0,
    ) -> None:
        if num_workers is None:
            num_workers = max(1, len(os.sched_getaffinity(0))) if hasattr(
                os, "sched_getaffinity") else max(1, os.cpu_count() or 1)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be a positive integer, got {num_workers!r}")
        if isinstance(torch_threads, bool) or not isinstance(torch_threads, int) \
                or torch_threads < 1:
            raise ValueError(f"torch_threads must be a positive integer, got {torch_threads!r}")
        if inner not in _INNER:
            raise ValueError(f"inner must be one of {_INNER}, got {inner!r}")
        if isinstance(start_timeout, bool) or not isinstance(start_timeout, (int, float)) \
                or not start_timeout > 0:
            raise ValueError(f"start_timeout must be a number of seconds > 0, "
                             f"got {start_timeout!r}")
        if not hasattr(federated_data, "client_ids") or not hasattr(federated_data, "client"):
            raise ValueError(f"federated_data must be a FederatedDataset, "
                             f"got {type(federated_data).__name__}")
        is_factory = self._is_factory(trainer)
        reason, payload = self._check(trainer)
        if reason is not None:
            raise ValueError(f"ParallelTransport cannot use this trainer: {reason}")
        self.data = federated_data
        self.num_workers: int = num_workers
        self.inner = inner
        self.torch_threads = torch_threads
        self.start_timeout = float(start_timeout)
        self._trainer = trainer
        self._driver_trainer: Trainer | None = None if is_factory else trainer  # type: ignore
        self._sizes = {c: len(federated_data.client(c).train) for c in federated_data.client_ids}
        self._test_size_cache: dict[str, int] | None = None
        self._weights_shm: SharedMemory | None = None
        self._call_id = 0
        self._busy: set[int] = set()  # workers with an unanswered call (a generator left open)
        self._closed = False
        self.batched_fallback: str | None = None
        self._test_shared = False
        self._ctx = mp.get_context("forkserver")
        self._pool = _Pool(workers=[None] * num_workers)
        self._finalizer = weakref.finalize(self, _shutdown, self._pool)
        started = time.monotonic()
        try:
            # The server imports torch once; every worker is then a cheap fork of it. Started
            # first, so that its imports overlap the copy of the data into shared memory.
            self._ctx.set_forkserver_preload(_PRELOAD)
            forkserver.ensure_running()
            if _shareable(federated_data):
                shm, layout = _share_data(federated_data)
                self._test_shared = layout.test is not None
                self._pool.segments.append(shm)
                data_payload: _DataLayout | bytes = layout
            else:
                data_payload = pickle.dumps(federated_data, protocol=5)
            assert payload is not None
            self._init = _Init(0, payload, is_factory, inner, torch_threads, data_payload)
            # All started before any is sent its (possibly large) trainer or awaited.
            for idx in range(num_workers):
                self._pool.workers[idx] = self._spawn(idx)
            for idx in range(num_workers):
                self._send_init(idx)
            self._await_ready(range(num_workers), deadline=started + self.start_timeout)
        except BaseException:
            self.close()
            raise
        self.start_seconds = time.monotonic() - started
        log.info("ParallelTransport: %d workers started in %.2f s", num_workers,
                 self.start_seconds)

    # -- trainer checks ---------------------------------------------------------------------
    @staticmethod
    def _is_factory(trainer: object) -> bool:
        if isinstance(trainer, type):
            return True  # a Trainer class: it builds one
        if isinstance(trainer, Trainer):
            return False
        if callable(trainer):
            return True
        raise TypeError(f"trainer must be a Trainer or a callable returning one, "
                        f"got {type(trainer).__name__}")

    @staticmethod
    def unsupported_reason(trainer: Trainer | Callable[[], Trainer]) -> str | None:
        """Why ``trainer`` (a Trainer or a factory) cannot be shipped to worker processes, or
        None: it must pickle (a model built by a lambda or a local function does not), and
        what it refers to must be importable by the workers."""
        return ParallelTransport._check(trainer)[0]

    @staticmethod
    def _check(trainer: object) -> tuple[str | None, bytes | None]:
        """(why the trainer cannot be shipped or None, its pickle when it can)."""
        try:
            ParallelTransport._is_factory(trainer)
        except TypeError as exc:
            return str(exc), None
        what = "trainer factory" if ParallelTransport._is_factory(trainer) else "trainer"
        kind = trainer.func if isinstance(trainer, functools.partial) else trainer
        kind = kind if isinstance(kind, type) else type(kind)
        if hasattr(kind, "accounting_state"):
            # DP-SGD keeps one privacy accountant per client in the trainer object: each
            # worker would hold part of a client's history and under-report its epsilon.
            return (f"{kind.__name__} keeps per-client privacy accounting in the trainer "
                    "object, which worker processes would split; use SequentialTransport"), None
        try:
            payload, name = _pickle_checked(trainer)
        except Exception as exc:
            return (f"the {what} cannot be pickled for the worker processes ({_reason(exc)}); "
                    "build the model from a class or a functools.partial, not a lambda or a "
                    "local function"), None
        if name is not None:
            where = ("an interactive __main__" if name[1] == "__main__" else
                     f"module '{name[1]}', loaded from a file that is not on sys.path,")
            return (f"the {what} refers to '{name[0]}', defined in {where} that worker "
                    "processes cannot import; define it in an importable module"), None
        return None, payload

    @staticmethod
    def unsupported_strategy_reason(strategy: Any) -> str | None:
        """Why the strategy's client-side parts cannot travel to the workers, or None: its
        client stages, dispatch transform and (streaming) aggregator are pickled with every
        round's tasks, so a lambda there would fail every client of every round."""
        aggregator = getattr(strategy, "aggregator", None)
        parts = [("client_stages", tuple(getattr(strategy, "client_stages", ()) or ())),
                 ("dispatch_transform", getattr(strategy, "dispatch_transform", None)),
                 ("aggregator", aggregator if getattr(aggregator, "streaming", False) else None)]
        for key, part in parts:
            if part is None or part == ():
                continue
            try:
                _, name = _pickle_checked(part)
            except Exception as exc:
                return (f"the strategy's {key} cannot be pickled for the worker processes "
                        f"({_reason(exc)}): use a class or a module-level function, not a "
                        "lambda, or SequentialTransport")
            if name is not None:
                return (f"the strategy's {key} needs '{name[0]}' from '{name[1]}', which the "
                        "worker processes cannot import; or use SequentialTransport")
        return None

    def check_strategy(self, strategy: Any) -> None:
        """``Server`` calls this when the run is configured: ``ConfigError`` with
        ``unsupported_strategy_reason``'s reason, if there is one."""
        reason = self.unsupported_strategy_reason(strategy)
        if reason is not None:
            raise ConfigError("transport", "parallel", f"a strategy whose client-side parts "
                              f"can reach the workers; {reason}")

    # -- Transport protocol -----------------------------------------------------------------
    def available_clients(self) -> list[str]:
        return list(self.data.client_ids)

    def full_steps(self, client_id: str, config: FitConfig) -> int:
        n = len(self.data.client(client_id).train)
        if self._driver_trainer is None:
            # Only straggler simulation asks this: one trainer in the parent answers it.
            self._driver_trainer = self._trainer()  # type: ignore[operator]
        return self._driver_trainer.full_steps(n, config)

    def fit(
        self, weights: torch.Tensor, tasks: Sequence[ClientTask],
        weighting: Weighting | None = None,
    ) -> Iterator[TransportResult]:
        """Train ``tasks`` on the workers. With ``weighting`` one ``PartialAggregate`` per
        worker, in worker order; without, one result per task, in task order."""
        self._check_open()
        if not tasks:
            return
        if weighting is not None and getattr(weighting, "keep_updates", False):
            weighting = None  # the aggregator needs every update, not their sum
        ref = self._share_weights(weights)
        groups = balance_tasks(tasks, self._sizes, self.num_workers)
        calls = {i: ("fit", (ref, g, weighting), [t.client_id for t in g])
                 for i, g in enumerate(groups) if g}
        round_num = max(t.config.round for t in tasks)
        if weighting is not None:
            for _, out in self._run(calls, round_num):
                for result in out:
                    self._log_failures(result, round_num)
                    yield result
            return
        yield from self._in_order([t.client_id for t in tasks], self._run(calls, round_num),
                                  round_num)

    def evaluate(
        self, weights: torch.Tensor, client_ids: Sequence[str], round_num: int,
    ) -> Iterator[EvalResult]:
        """Federated evaluation on the workers, balanced by test-split size; reports in the
        order of ``client_ids`` (as ``SequentialTransport``)."""
        self._check_open()
        if not client_ids:
            return
        ref = self._share_weights(weights)
        ids = list(client_ids)
        sizes = self._test_sizes()
        groups = _balance(ids, [sizes.get(c, 0) for c in ids], self.num_workers)
        calls = {i: ("evaluate", (ref, g, round_num), g) for i, g in enumerate(groups) if g}
        yield from self._in_order(ids, self._run(calls, round_num), None)

    def predict_test(self, weights: torch.Tensor) -> torch.Tensor | None:
        """The model's outputs on the central test set (``federated_data.test``), each worker
        predicting a contiguous share of it on its own thread, in whole evaluation batches
        (the batches a single process would run). The workers are idle between synchronous
        rounds, and one process with two threads runs a small CNN's evaluation far less than
        twice as fast. None when there is no shared test set or a worker fails (the caller
        then evaluates in its own process)."""
        self._check_open()
        test = getattr(self.data, "test", None)
        if test is None or not self._test_shared:
            return None
        n = len(test)
        bs = int(getattr(self._driver(), "eval_batch_size", 512) or 512)
        batches = -(-n // bs)
        cuts = [round(i * batches / self.num_workers) for i in range(self.num_workers + 1)]
        ref = self._share_weights(weights)
        calls = {i: ("predict", (ref, cuts[i] * bs, min(n, cuts[i + 1] * bs)), [])
                 for i in range(self.num_workers) if cuts[i + 1] > cuts[i]}
        outs = dict(self._run(calls, 0))
        if not all(isinstance(outs.get(i), torch.Tensor) for i in calls):
            log.warning("ParallelTransport: a worker could not predict its share of the test "
                        "set; evaluating in the server process instead")
            return None
        return torch.cat([outs[i] for i in sorted(calls)])

    def _driver(self) -> Trainer:
        """A trainer in this process (built from the factory once, if one was given)."""
        if self._driver_trainer is None:
            self._driver_trainer = self._trainer()  # type: ignore[operator]
        return self._driver_trainer

    # -- dispatch -----------------------------------------------------------------------------
    def _in_order(self, ids: list[str], outcomes: Iterator[tuple[int, list[Any]]],
                  round_num: int | None) -> Iterator[Any]:
        """Results re-ordered to ``ids``: each is yielded as soon as every earlier one is.
        (``round_num`` None: evaluation reports, whose failures the caller logs.)"""
        pending: dict[str, list[Any]] = {}
        pos = 0
        for _, out in outcomes:
            for result in out:
                if round_num is not None:
                    self._log_failures(result, round_num)
                elif isinstance(result, ClientFailure) and result.reason != "no local test split":
                    log.warning("client %s failed to evaluate: %s", result.client_id,
                                result.reason)
                cid = getattr(result, "client_id", None)
                if cid is None:  # not one client's result: nothing to order it by
                    yield result
                    continue
                pending.setdefault(cid, []).append(result)
            while pos < len(ids) and pending.get(ids[pos]):
                yield pending[ids[pos]].pop(0)
                pos += 1
        for cid in ids[pos:]:  # (a worker that answered without one: yield what there is)
            if pending.get(cid):
                yield pending[cid].pop(0)
        for rest in pending.values():
            yield from rest

    def _run(self, calls: dict[int, tuple[str, tuple[Any, ...], list[str]]],
             round_num: int) -> Iterator[tuple[int, list[Any]]]:
        """Send each worker its call, then yield ``(worker, results)`` in worker order while
        reading every answer as soon as it arrives; a lost worker's clients become failures."""
        self._cancel_stale()
        self._call_id += 1
        call_id = self._call_id
        done: dict[int, list[Any]] = {}
        waiting: set[int] = set()
        for idx, (kind, args, ids) in calls.items():
            worker = self._worker(idx)
            try:
                worker.conn.send_bytes(_dumps((kind, call_id, args)))
            except (OSError, ValueError) as exc:  # died while idle: say how, if it has exited
                why = _reason(exc) if worker.process.is_alive() else self._died(idx)
                done[idx] = self._lost(idx, ids, round_num, why)
                continue
            except Exception as exc:  # the call does not pickle (a task's stage or transform)
                done[idx] = self._failed(idx, ids, round_num, _reason(exc))
                continue
            waiting.add(idx)
        # The live set: if the consumer stops iterating early, the workers still in it hold
        # this call's weights, and the next call replaces them (_cancel_stale) before the
        # buffer is written again.
        self._busy = waiting
        for idx in sorted(calls):
            while idx not in done:
                if call_id != self._call_id:
                    # A later call started while this one was suspended and replaced the
                    # workers it waits for: they will never answer it.
                    for i in waiting:
                        done[i] = self._failed(i, calls[i][2], round_num,
                                               "its call was superseded by a later one")
                    waiting.clear()
                    break
                self._collect(waiting, done, calls, call_id, round_num)
            yield idx, done.pop(idx)

    def _wait_handles(self, waiting: set[int]) -> dict[Any, int]:
        """Each waiting worker's pipe and process sentinel -> its index: a worker that answers
        and one that dies both wake ``connection.wait``."""
        handles: dict[Any, int] = {}
        for idx in waiting:
            w = self._pool.workers[idx]
            assert w is not None
            handles[w.conn] = idx
            handles[w.process.sentinel] = idx
        return handles

    def _collect(self, waiting: set[int], done: dict[int, list[Any]],
                 calls: dict[int, tuple[str, tuple[Any, ...], list[str]]], call_id: int,
                 round_num: int) -> None:
        """Block until at least one waiting worker answers or dies; record what happened."""
        handles = self._wait_handles(waiting)
        for handle in connection.wait(list(handles)):
            idx = handles[handle]
            if idx not in waiting:
                continue
            w = self._pool.workers[idx]
            assert w is not None
            ids = calls[idx][2]
            if not w.conn.poll():
                # The sentinel fired with nothing left to read: the process is gone.
                waiting.discard(idx)
                done[idx] = self._lost(idx, ids, round_num, self._died(idx))
                continue
            try:
                msg = _loads(w.conn.recv_bytes())
            except (EOFError, OSError):
                waiting.discard(idx)
                done[idx] = self._lost(idx, ids, round_num, self._died(idx))
                continue
            if msg[0] == "ready":  # a replacement announcing itself before its first call
                w.ready = True
                self._note_fallback(msg[2])
                continue
            if msg[0] == "error":  # a replacement that could not start
                waiting.discard(idx)
                done[idx] = self._lost(idx, ids, round_num, f"failed to start: {msg[1]}")
                continue
            if msg[1] != call_id:
                continue  # an answer to an abandoned call
            waiting.discard(idx)
            self._note_fallback(msg[3])
            if msg[0] == "ok":
                done[idx] = msg[2]
            else:
                done[idx] = self._failed(idx, ids, round_num, msg[2])

    def _failed(self, idx: int, ids: list[str], round_num: int, why: str) -> list[ClientFailure]:
        """Failures for the clients of a call that failed as a whole in a live worker."""
        reason = f"parallel worker {idx} failed: {why}"
        return [ClientFailure(cid, reason) for cid in ids]

    def _lost(self, idx: int, ids: list[str], round_num: int, why: str) -> list[ClientFailure]:
        """Failures for a dead worker's clients; its replacement starts now, so it warms up
        while the other workers finish the round."""
        reason = f"parallel worker {idx} lost: {why}"
        log.warning("round %d: %s; %d clients failed with it", round_num, reason, len(ids))
        self._replace(idx)
        return [ClientFailure(cid, reason) for cid in ids]

    def _died(self, idx: int) -> str:
        w = self._pool.workers[idx]
        assert w is not None
        w.process.join(1.0)  # the pipe closes a moment before the process is reaped
        return _exit_text(w.process.exitcode)

    @staticmethod
    def _log_failures(result: Any, round_num: int) -> None:
        # Workers do not log (their stderr would repeat every line once per worker).
        failures = (result.failures if isinstance(result, PartialAggregate) else
                    [result] if isinstance(result, ClientFailure) else [])
        for f in failures:
            log.warning("client %s failed in round %d: %s", f.client_id, round_num, f.reason)

    def _note_fallback(self, reason: str | None) -> None:
        if reason is not None and reason != self.batched_fallback:
            self.batched_fallback = reason
            log.warning("ParallelTransport workers train sequentially because %s", reason)

    # -- weights ------------------------------------------------------------------------------
    def _share_weights(self, weights: torch.Tensor) -> _WeightsRef | torch.Tensor:
        """Write the weights once into the shared buffer every worker reads."""
        w = weights.detach().to("cpu").contiguous()
        try:
            array = w.numpy()
        except (TypeError, RuntimeError):  # no numpy dtype: ship the tensor itself
            return w
        self._cancel_stale()
        shm = self._weights_shm
        if shm is None or shm.size < array.nbytes:
            shm = _create_shm(array.nbytes)
            self._pool.segments.append(shm)
            if self._weights_shm is not None:
                # Workers attach the new block by name on their next call.
                self._pool.segments.remove(self._weights_shm)
                _release_shm(self._weights_shm)
            self._weights_shm = shm
        np.ndarray(array.shape, array.dtype, buffer=shm.buf)[...] = array
        return _WeightsRef(shm.name, tuple(array.shape), array.dtype.str)

    # -- workers ------------------------------------------------------------------------------
    @property
    def pids(self) -> list[int]:
        """The worker processes' ids (replacements change them)."""
        return [w.process.pid for w in self._pool.workers if w is not None]

    def _spawn(self, idx: int) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=_worker_main, args=(child,),
                                    name=f"fedmosaic-parallel-{idx}", daemon=True)
        with _main_hidden_if_unrunnable():
            process.start()
        child.close()  # the worker holds the other end: its death is end of file here
        return _Worker(process, parent)

    def _send_init(self, idx: int) -> None:
        """Send a started worker what it builds itself from (trainer, data, settings)."""
        w = self._pool.workers[idx]
        assert w is not None
        init = _Init(idx, self._init.trainer, self._init.is_factory, self._init.inner,
                     self._init.torch_threads, self._init.data)
        with contextlib.suppress(OSError):  # died before reading it: seen when next awaited
            w.conn.send_bytes(_dumps(init))

    def _await_ready(self, indices: Sequence[int] | range, deadline: float) -> None:
        """Wait for the workers' start-up reports; raise if any fails or the time runs out."""
        waiting = set(indices)
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(
                    f"parallel workers did not start within {self.start_timeout:g} s "
                    f"({len(waiting)} of {self.num_workers} not ready)")
            handles = self._wait_handles(waiting)
            for handle in connection.wait(list(handles), timeout=left):
                idx = handles[handle]
                if idx not in waiting:
                    continue
                w = self._pool.workers[idx]
                assert w is not None
                try:
                    if not w.conn.poll():
                        raise EOFError
                    msg = _loads(w.conn.recv_bytes())
                except (EOFError, OSError):
                    raise RuntimeError(
                        f"parallel worker {idx} failed to start: it exited ({self._died(idx)}) "
                        "before reporting; its error is on stderr (a script must build the "
                        "transport under 'if __name__ == \"__main__\":', since workers import "
                        "the main module)") from None
                if msg[0] == "error":
                    raise RuntimeError(f"parallel workers failed to start: {msg[1]}")
                w.ready = True
                self._note_fallback(msg[2])
                waiting.discard(idx)

    def _worker(self, idx: int) -> _Worker:
        w = self._pool.workers[idx]
        if w is None:
            w = self._pool.workers[idx] = self._spawn(idx)
            self._send_init(idx)
        return w

    def _replace(self, idx: int) -> None:
        w = self._pool.workers[idx]
        if w is not None:
            if w.process.is_alive():
                w.process.kill()
            w.process.join(5.0)
            w.conn.close()
        self._pool.workers[idx] = self._spawn(idx)
        self._send_init(idx)
        log.warning("parallel worker %d was replaced", idx)

    def _cancel_stale(self) -> None:
        """Replace workers still busy with an abandoned call: they would read the weights
        buffer while it is rewritten, and answer a call nobody waits for."""
        for idx in sorted(self._busy):
            self._replace(idx)
        self._busy = set()  # (the abandoned call keeps its own set: it sees it is stale)

    def _test_sizes(self) -> dict[str, int]:
        if self._test_size_cache is None:
            self._test_size_cache = {
                cid: 0 if (t := self.data.client(cid).test) is None else len(t)
                for cid in self.data.client_ids}
        return self._test_size_cache

    # -- lifetime -----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("ParallelTransport is closed")

    def close(self) -> None:
        """Stop the workers and free the shared memory. Idempotent."""
        self._closed = True
        self._weights_shm = None
        self._finalizer()

    def __repr__(self) -> str:
        state = ", closed" if self._closed else ""
        return (f"ParallelTransport(num_workers={self.num_workers}, inner={self.inner!r}, "
                f"torch_threads={self.torch_threads}{state})")

    def __enter__(self) -> ParallelTransport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
