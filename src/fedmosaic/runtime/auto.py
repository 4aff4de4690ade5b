"""``transport = "auto"``: pick the fastest sound transport for a run (issue #23).

The four candidates are ``sequential`` (one process, client after client), ``batched``
(one process, the cohort vmapped: ``BatchedTransport``), ``parallel`` (one worker process per
core, each training its share of the cohort client after client: ``ParallelTransport``) and
``parallel-batched`` (the same workers, each training its share batched). ``choose_transport``
reads the facts -- the model (a flatten/Linear/ReLU chain, a convolution, anything else), its
multiply-accumulates per sample, the device, the usable cores (``os.sched_getaffinity``), the
cohort, the clients' step counts and the number of rounds -- first rules out what cannot run
the experiment (each with its reason), then estimates the run's seconds on each remaining
candidate with the cost model below and takes the cheapest. The choice is deterministic (no
timing is involved) and comes with a ``reason`` that the run records (``RunResult.transport``,
``guarantees.json``) and logs.

**Rules** (no estimate needed):

* a device other than the CPU: ``batched`` where ``BatchedTransport`` can reproduce the
  trainer, else ``sequential`` (worker processes would share one device);
* one usable core: no parallel candidate;
* on a CPU, batching only for a flatten/Linear/ReLU chain: a convolution is slower vmapped
  (``runtime/batched.py``), and other models have no measured rule (``BatchedTransport``'s
  timed probe decides for them when asked for explicitly);
* no parallel candidate where the workers cannot run the experiment: a trainer that cannot be
  pickled (``ParallelTransport.unsupported_reason``), a trainer with per-client privacy
  accounting (DP-SGD: it lives in this process), an asynchronous schedule (its fits are small
  groups of one base version, trained when their first result is due), a strategy whose
  client stages, dispatch transform or aggregator cannot be pickled to the workers
  (``ParallelTransport.unsupported_strategy_reason``; fingerprint watermarks, whose key stays
  in the server process), and what the caller names in ``constraints``;
* no batched candidate with per-client dispatch transforms (fingerprint watermarks: the
  batched transport cannot send each client its own model; sequential and parallel can) or
  under FedAsync (one update per server step: nothing to batch).

**Cost model** (seconds of one run; ``K`` clients per round, ``s`` mean local steps of a
client, ``N`` samples trained per round including epochs, ``m`` forward multiply-accumulates
per sample, ``w`` workers)::

    compute          = 3 m N / MACS_PER_SECOND              (forward + backward, one core)
    sequential round = compute + K (SEQ_FIT_SECONDS + s SEQ_STEP_SECONDS)
    batched round    = compute + BATCHED_ROUND_SECONDS + K s BATCHED_CLIENT_STEP_SECONDS
    parallel round   = sequential round / (w PARALLEL_EFFICIENCY) + PARALLEL_ROUND_SECONDS
                       + K PARALLEL_CLIENT_SECONDS
    parallel-batched = batched round (K / w) / PARALLEL_EFFICIENCY + PARALLEL_ROUND_SECONDS
                       + K PARALLEL_BATCHED_CLIENT_SECONDS
    run              = rounds x round + set-up (BATCHED_SETUP_SECONDS, PARALLEL_START_SECONDS)

The cheapest run wins; estimates within ``TIE`` (25%) of the cheapest are a tie, won by the
lowest per-round time: the constants move by up to 2x with the machine's load, the one-off
set-up (worker start) is the least certain term, and runs are often extended by a resume.

The constants were measured on the 2-core AMD EPYC development machine (commands and figures
in docs/configuration.md, "How auto chooses"); in-process transports are costed at one core,
as they run with one torch thread per process in the benchmarks. They are estimates: on
another machine the choice may be a worse one, never a wrong model (every transport computes
the same model up to float rounding), and ``[runtime] transport`` (or ``fm.simulate(...,
transport=...)``) overrides it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from fedmosaic.train.base import FitConfig

log = logging.getLogger(__name__)

KINDS = ("sequential", "batched", "parallel", "parallel-batched")

# -- calibration (2-core AMD EPYC, one torch thread per process) -------------------------------
# `python -m fedmosaic.runtime.auto_calibrate` measures each of these (the minimum of 5 runs);
# the values are its figures at load average 2.0-4.3 (other jobs on the shared machine, three
# runs), rounded, and checked against the runs of the benchmark tasks (docs/configuration.md).
#: Forward multiply-accumulates per second of one core, backward counted as twice the forward
#: (zoo SmallCNN, 1.12 M forward MACs a sample, batch 32; 1.16e10-1.66e10 measured).
MACS_PER_SECOND = 1.5e10
#: Per client fit of ``SequentialTransport`` (weights in, RNG fork, update out; 0.35-0.62 ms)
#: and per local step (optimizer step, autograd bookkeeping; digits-sized MLP, 0.27-0.46 ms).
SEQ_FIT_SECONDS = 4e-4
SEQ_STEP_SECONDS = 3e-4
#: ``BatchedTransport`` on a linear chain: per round (0.2-0.57 ms) and per client step (index
#: plans, the batched products, the reduction; 0.070-0.083 ms), from rounds of 10 and 1,000
#: one-step MLP clients.
BATCHED_ROUND_SECONDS = 3e-4
BATCHED_CLIENT_STEP_SECONDS = 8e-5
#: The batched transport's set-up: trace, data on the device, correctness probe (construction
#: 6-13 ms and a first fit 5-6 ms slower than the next, digits MLP, 10 clients).
BATCHED_SETUP_SECONDS = 0.02
#: Worker processes: start (forkserver with torch imported, data into shared memory, one
#: trainer per worker; 1.9-2.3 s for two workers, 2.6-3.4 s at load average 10), per-round
#: cost (weights out, partial sums back) and the fraction of a core each worker delivers.
PARALLEL_START_SECONDS = 2.0
PARALLEL_ROUND_SECONDS = 0.01
PARALLEL_EFFICIENCY = 0.9
#: Per client, wall time, on top of its training (task out, update validated and summed in
#: the worker, results back): 1,000 one-step MLP clients, workers training sequentially
#: 1.16-1.55 s a round against 0.69-0.74 s sequential (0.74-1.16 ms a client over the ideal
#: split), workers training batched 0.122-0.142 s against 0.071-0.084 s batched (0.07-0.08 ms).
PARALLEL_CLIENT_SECONDS = 1e-3
PARALLEL_BATCHED_CLIENT_SECONDS = 1e-4
#: Estimates closer than this (relative) are a tie, decided by the lower per-round time: the
#: constants above move by up to 2x with the machine's load (worker start 1.9-3.4 s, a step's
#: overhead 0.27-0.7 ms), so closer estimates cannot be told apart.
TIE = 0.25


@dataclass(frozen=True)
class Workload:
    """What a run asks of its transport, per round and in all."""

    clients_per_round: int
    steps_per_client: float  # mean local steps of a client
    samples_per_round: float  # samples trained per round, epochs included
    rounds: int
    macs_per_sample: float  # forward multiply-accumulates of one sample


@dataclass(frozen=True)
class TransportChoice:
    """The transport ``auto`` picked (``kind``, one of ``KINDS``), the number of worker
    processes for the parallel kinds, why, and the estimated seconds of each candidate."""

    kind: str
    reason: str
    workers: int = 1
    estimates: Mapping[str, float] = field(default_factory=dict)
    ruled_out: Mapping[str, str] = field(default_factory=dict)
    chosen_by: str = "auto"  # or "caller": asked for by name

    def record(self) -> dict[str, Any]:
        """For the run's results (``guarantees.json``) and logs."""
        out: dict[str, Any] = {"transport": self.kind, "chosen_by": self.chosen_by,
                               "reason": self.reason}
        if self.kind.startswith("parallel"):
            out["workers"] = self.workers
        if self.estimates:
            out["estimated_seconds"] = {k: round(v, 3) for k, v in self.estimates.items()}
        if self.ruled_out:
            out["ruled_out"] = dict(self.ruled_out)
        return out


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def setup_seconds(kind: str) -> float:
    """The one-off cost of a transport kind (the cost model's set-up term)."""
    return {"sequential": 0.0, "batched": BATCHED_SETUP_SECONDS,
            "parallel": PARALLEL_START_SECONDS,
            "parallel-batched": PARALLEL_START_SECONDS + BATCHED_SETUP_SECONDS}[kind]


def estimate_seconds(kind: str, load: Workload, workers: int = 1) -> float:
    """The cost model of the module docstring: estimated seconds of the whole run."""
    k, s = load.clients_per_round, load.steps_per_client
    compute = 3.0 * load.macs_per_sample * load.samples_per_round / MACS_PER_SECOND

    def sequential(clients: float, work: float) -> float:
        return work + clients * (SEQ_FIT_SECONDS + s * SEQ_STEP_SECONDS)

    def batched(clients: float, work: float) -> float:
        return work + BATCHED_ROUND_SECONDS + clients * s * BATCHED_CLIENT_STEP_SECONDS

    w = max(1, min(workers, k))
    if kind == "sequential":
        per = sequential(k, compute)
    elif kind == "batched":
        per = batched(k, compute)
    elif kind == "parallel":
        per = (sequential(k, compute) / (w * PARALLEL_EFFICIENCY) + PARALLEL_ROUND_SECONDS
               + k * PARALLEL_CLIENT_SECONDS)
    elif kind == "parallel-batched":
        per = (batched(k / w, compute / w) / PARALLEL_EFFICIENCY + PARALLEL_ROUND_SECONDS
               + k * PARALLEL_BATCHED_CLIENT_SECONDS)
    else:
        raise ValueError(f"unknown transport kind {kind!r}: one of {KINDS}")
    return load.rounds * per + setup_seconds(kind)


def decide(
    load: Workload, *, device: str = "cpu", cores: int = 1, model: str = "other",
    batched_blocker: str | None = None, parallel_blocker: str | None = None,
    max_workers: int | None = None,
) -> TransportChoice:
    """The choice from the facts alone (``choose_transport`` gathers them).

    ``model``: "chain" (flatten/Linear/ReLU), "conv" (has a convolution) or "other";
    ``batched_blocker`` / ``parallel_blocker``: why that family cannot run this experiment,
    or None; ``max_workers`` caps the worker processes (default: one per usable core)."""
    ruled: dict[str, str] = {}
    dev = torch.device(device)
    if dev.type != "cpu":
        if batched_blocker is None:
            return TransportChoice("batched", f"on {device}: the whole cohort per kernel")
        return TransportChoice("sequential", f"on {device}, and batching cannot reproduce this "
                               f"trainer ({batched_blocker})",
                               ruled_out={"batched": batched_blocker})
    if batched_blocker is not None:
        ruled["batched"] = batched_blocker
    elif model == "conv":
        ruled["batched"] = "vmapped convolutions are slower than sequential training on CPU"
    elif model != "chain":
        ruled["batched"] = ("no measured rule for batching this model on CPU (only "
                            "flatten/Linear/ReLU chains)")
    workers = min(cores, max_workers or cores, load.clients_per_round)
    if parallel_blocker is not None:
        ruled["parallel"] = parallel_blocker
    elif cores < 2:
        ruled["parallel"] = "one usable core"
    elif max_workers is not None and max_workers < 2:
        ruled["parallel"] = "at most one worker (workers = 1)"
    elif load.clients_per_round < 2:
        ruled["parallel"] = "one client per round"
    candidates = ["sequential"]
    if "batched" not in ruled:
        candidates.append("batched")
    if "parallel" not in ruled:
        candidates.append("parallel")
        if "batched" not in ruled:
            candidates.append("parallel-batched")
    est = {k: estimate_seconds(k, load, workers) for k in candidates}
    # Estimates within TIE of the best are a tie (the model is not more precise than that);
    # a tie goes to the lowest per-round time: set-up is paid once, is the least certain
    # term, and runs are often extended (resume with more rounds).
    low = min(est.values())
    tied = [k for k in candidates if est[k] <= low * (1 + TIE)]
    best = min(tied, key=lambda k: ((est[k] - setup_seconds(k)) / load.rounds,
                                    candidates.index(k)))
    shown = ", ".join(f"{k} {v:.3g}" for k, v in est.items())
    how = "fastest by estimate" if est[best] == low else (
        f"within {TIE:.0%} of the fastest estimate (a tie), the lowest per-round time")
    why = (f"{how} ({load.clients_per_round} clients x "
           f"{load.steps_per_client:.3g} steps per round, {load.rounds} rounds, "
           f"{load.macs_per_sample:.3g} MACs per sample, {cores} usable cores; "
           f"estimated seconds: {shown})")
    if ruled:
        why += "; ruled out: " + "; ".join(f"{k}: {v}" for k, v in ruled.items())
    return TransportChoice(best, why, workers if best.startswith("parallel") else 1, est, ruled)


# -- facts from the run's objects ---------------------------------------------------------------
def _torch_trainer(trainer: Any) -> Any:
    """The ``TorchTrainer`` inside ``trainer`` (through ``TrainerWrapper``s), or None."""
    from fedmosaic.train.base import TrainerWrapper
    from fedmosaic.train.torch_trainer import TorchTrainer

    while isinstance(trainer, TrainerWrapper):
        trainer = trainer.inner
    return trainer if isinstance(trainer, TorchTrainer) else None


def macs_per_sample(model: nn.Module, sample: torch.Tensor) -> float:
    """Forward multiply-accumulates of one sample in the convolutions and linear layers (the
    rest is elementwise and small), counted from the layers' output shapes."""
    total = [0.0]

    def hook(module: nn.Module, _inputs: Any, out: Any) -> None:
        if not isinstance(out, torch.Tensor):
            return
        if isinstance(module, nn.modules.conv._ConvNd):
            per = module.in_channels // module.groups * math.prod(module.kernel_size)
            total[0] += out.numel() * per
        elif isinstance(module, nn.Linear):
            total[0] += out.numel() * module.in_features

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    was_training = model.training
    try:
        model.eval()  # a batch of one: BatchNorm must not use batch statistics
        with torch.no_grad():
            model(sample)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return total[0]


def _model_facts(trainer: Any, federated_data: Any) -> tuple[str, float, str]:
    """(model kind, MACs per sample, device) of the trainer."""
    from fedmosaic.runtime.batched import cpu_slow_module
    from fedmosaic.runtime.chain import linear_chain

    tt = _torch_trainer(trainer)
    numel = float(trainer.spec.numel)
    if tt is None:
        return "other", numel, str(getattr(trainer, "device", "cpu"))
    device = str(tt.device)
    kind = "other"
    if cpu_slow_module(tt.model) is not None:
        kind = "conv"
    elif linear_chain(tt.model, tt.spec) is not None:
        kind = "chain"
    macs = numel
    try:
        first = federated_data.client(federated_data.client_ids[0]).train
        x = torch.as_tensor(first.x[:1]).to(tt.device)
        macs = macs_per_sample(tt.model, x) or numel
    except Exception as exc:  # an odd model or data set: the parameter count stands in
        log.debug("auto transport: MACs not counted (%s); using the parameter count", exc)
    return kind, macs, device


def workload(trainer: Any, federated_data: Any, strategy: Any, rounds: int,
             schedule: Any = None) -> Workload:
    """Clients per round, mean steps and samples, from the strategy and the clients' sizes.
    Asynchronous schedules: a FedBuff buffer (or one client for FedAsync) per server step."""
    sizes = [len(federated_data.client(c).train) for c in federated_data.client_ids]
    sampler = getattr(strategy, "sampler", None)
    k = sampler.sample_size(len(sizes)) if sampler is not None else len(sizes)
    if schedule is not None and getattr(schedule, "name", "sync") != "sync":
        k = int(getattr(schedule, "buffer_size", 1))
    epochs = getattr(strategy, "local_epochs", None)
    cfg = FitConfig(round=0, epochs=epochs, batch_size=getattr(strategy, "batch_size", None))
    try:
        steps = sum(trainer.full_steps(n, cfg) for n in sizes) / max(1, len(sizes))
    except Exception:  # a trainer that cannot say: one pass of batch 32
        steps = sum(math.ceil(n / 32) for n in sizes) / max(1, len(sizes))
    tt = _torch_trainer(trainer)
    ep = epochs or (tt.epochs if tt is not None else 1)
    mean = sum(sizes) / max(1, len(sizes))
    macs = _model_facts(trainer, federated_data)[1]
    return Workload(clients_per_round=max(1, k), steps_per_client=steps,
                    samples_per_round=max(1, k) * mean * ep, rounds=max(1, rounds),
                    macs_per_sample=macs)


def parallel_refusal(trainer: Any, shipped: Any = None) -> str | None:
    """Why worker processes cannot train with this trainer, or None: a trainer that cannot be
    shipped (``ParallelTransport.unsupported_reason``) or one that keeps per-client privacy
    accounting in this process (DP-SGD). ``shipped``: what the workers receive, if not the
    trainer itself (a picklable factory). An explicit ``transport = "parallel"`` is refused
    with this reason."""
    if hasattr(trainer, "accounting_state"):
        return ("the trainer keeps per-client privacy accounting (DP-SGD) in this process; "
                "worker processes would each keep a copy and the run's epsilon would be wrong")
    try:
        from fedmosaic.runtime.parallel import ParallelTransport
    except ImportError as exc:  # pragma: no cover - part of the package
        return f"the parallel transport is not available ({exc})"
    return ParallelTransport.unsupported_reason(trainer if shipped is None else shipped)


def parallel_blocker(trainer: Any, schedule: Any = None,
                     constraints: Mapping[str, str] | None = None,
                     shipped: Any = None, strategy: Any = None) -> str | None:
    """Why ``auto`` does not consider worker processes for this run, or None: what
    ``parallel_refusal`` refuses, an asynchronous schedule (its fits are small groups of one
    base version, trained when their first result is due: each would pay the workers' round
    trip; an explicit "parallel" still runs it), a strategy whose client stages, dispatch
    transform or aggregator cannot be pickled to the workers
    (``ParallelTransport.unsupported_strategy_reason``: e.g. fingerprint watermarks, whose key
    never leaves the server process) and the caller's ``constraints``."""
    for reason in (constraints or {}).values():
        return reason
    if schedule is not None and getattr(schedule, "name", "sync") != "sync":
        return (f"the {schedule.name} schedule trains small groups of one base version when "
                "their first result is due; worker processes would pay a round trip per group")
    if strategy is not None:
        from fedmosaic.runtime.parallel import ParallelTransport

        why = ParallelTransport.unsupported_strategy_reason(strategy)
        if why is not None:
            return why
    return parallel_refusal(trainer, shipped)


def choose_transport(
    trainer: Any, federated_data: Any, strategy: Any, rounds: int, *,
    schedule: Any = None, cores: int | None = None, max_workers: int | None = None,
    constraints: Mapping[str, str] | None = None, trainer_factory: Any = None,
) -> TransportChoice:
    """``auto``'s choice for this run (module docstring). ``constraints`` names what rules
    out worker processes besides what the objects show (e.g. {"secure_aggregation": why});
    ``trainer_factory`` is what workers would build their trainer from (default: the trainer
    itself is shipped), checked for pickling."""
    from fedmosaic.runtime.batched import unbatchable_reason

    schedule = schedule if schedule is not None else getattr(strategy, "schedule", None)
    kind, _macs, device = _model_facts(trainer, federated_data)
    batched_blocker = unbatchable_reason(trainer)
    if batched_blocker is None and getattr(strategy, "dispatch_transform", None) is not None:
        batched_blocker = ("per-client dispatch transforms (fingerprint watermarks) need the "
                           "sequential transport")
    if batched_blocker is None and schedule is not None and \
            getattr(schedule, "name", "sync") == "fedasync":
        batched_blocker = "FedAsync steps on every update: nothing to batch"
    load = workload(trainer, federated_data, strategy, rounds, schedule)
    return decide(load, device=device, cores=usable_cores() if cores is None else cores,
                  model=kind, batched_blocker=batched_blocker,
                  parallel_blocker=parallel_blocker(trainer, schedule, constraints,
                                                    trainer_factory, strategy),
                  max_workers=max_workers)


def named_choice(kind: str) -> TransportChoice:
    """A transport asked for by name (``fm.simulate(..., transport="parallel")``)."""
    if kind not in KINDS:
        raise ValueError(f"transport must be a Transport, None, 'auto' or one of {KINDS}, "
                         f"got {kind!r}")
    workers = usable_cores() if kind.startswith("parallel") else 1
    return TransportChoice(kind, "given by name", workers, chosen_by="caller")


def build_chosen(choice: TransportChoice, trainer: Any, federated_data: Any, *,
                 trainer_factory: Any = None) -> Any:
    """The transport of ``choice``, carrying it as ``auto_choice`` (recorded by ``simulate``).
    ``trainer_factory``: a picklable zero-argument factory for worker processes (default: the
    trainer itself is shipped)."""
    from fedmosaic.runtime.batched import BatchedTransport
    from fedmosaic.runtime.transport import SequentialTransport

    transport: Any = None
    if choice.kind.startswith("parallel"):
        from fedmosaic.runtime.parallel import ParallelTransport

        try:
            transport = ParallelTransport(
                trainer_factory if trainer_factory is not None else trainer, federated_data,
                num_workers=choice.workers,
                inner="batched" if choice.kind == "parallel-batched" else "sequential")
        except (RuntimeError, OSError, ValueError) as exc:
            if choice.chosen_by != "auto":
                raise
            # Workers that cannot start (no shared memory, a factory that fails in a fresh
            # process...) must not fail a run that one process can do: the in-process kind.
            kind = "batched" if choice.kind == "parallel-batched" else "sequential"
            why = f"parallel workers failed to start ({type(exc).__name__}: {exc})"[:300]
            log.warning("transport auto: %s; training with the %s transport", why, kind)
            choice = replace(choice, kind=kind, workers=1,
                             reason=f"{why}; {kind} instead. Chosen first: {choice.reason}")
    if transport is None:
        transport = (BatchedTransport(trainer, federated_data) if choice.kind == "batched"
                     else SequentialTransport(trainer, federated_data))
    transport.auto_choice = choice
    log.info("transport auto: %s%s: %s", choice.kind,
             f" ({choice.workers} workers)" if choice.kind.startswith("parallel") else "",
             choice.reason)
    return transport


def close_transport(transport: Any) -> None:
    """Close a transport and every transport it wraps (``inner``): a parallel transport inside
    secure aggregation or an attack simulation must stop its workers too."""
    seen: set[int] = set()
    while transport is not None and not isinstance(transport, str) and id(transport) not in seen:
        seen.add(id(transport))
        close = getattr(transport, "close", None)
        if callable(close):
            close()
        transport = getattr(transport, "inner", None)


def transport_kind(transport: Any) -> str:
    """The ``[runtime] transport`` name of a transport object (its class name if none)."""
    names = {"SequentialTransport": "sequential", "BatchedTransport": "batched",
             "RayTransport": "ray", "ParallelTransport": "parallel"}
    kind = names.get(type(transport).__name__, type(transport).__name__)
    if kind == "parallel" and getattr(transport, "inner", None) == "batched":
        kind = "parallel-batched"
    return kind


def describe_transport(transport: Any) -> dict[str, Any]:
    """What a run records about its transport: ``auto``'s choice and reason, or the transport
    given explicitly; the wrappers around it (secure aggregation, a simulated attack); a
    batched transport adds its own decision (batched, or why it trains sequentially)."""
    inner, wrappers = transport, []
    # Wrappers (SecAggPlusTransport, AdversarialTransport) hold the transport that trains as
    # ``inner``; ParallelTransport's ``inner`` is the name of its workers' transport.
    while getattr(inner, "inner", None) is not None and not isinstance(inner.inner, str):
        wrappers.append(type(inner).__name__)
        inner = inner.inner
    choice = getattr(inner, "auto_choice", None)
    out = choice.record() if choice is not None else {"transport": transport_kind(inner),
                                                      "chosen_by": "caller"}
    if wrappers:
        out["wrapped_by"] = wrappers
    decision = getattr(inner, "decision", None)
    if type(inner).__name__ == "BatchedTransport" and decision:
        out["batching"] = decision
    if type(inner).__name__ == "RayTransport":
        out.update(inner.describe())
    fallback = getattr(inner, "batched_fallback", None)  # ParallelTransport's batched workers
    if type(inner).__name__ == "ParallelTransport" and isinstance(fallback, str):
        out["batching"] = f"sequential: {fallback}"
    return out


def _idle_workers(transport: Any, schedule: Any = None) -> Any:
    """The ``ParallelTransport`` that trains under ``transport`` (through wrappers), whose
    workers sit idle while a synchronous round is evaluated; None for anything else,
    including asynchronous schedules, whose workers may still be training then."""
    if schedule is not None and type(schedule).__name__ != "SyncSchedule":
        return None
    inner = transport
    while getattr(inner, "inner", None) is not None and not isinstance(inner.inner, str):
        inner = inner.inner
    return inner if type(inner).__name__ == "ParallelTransport" else None


def central_evaluator(transport: Any, trainer: Any, test_data: Any,
                      schedule: Any = None) -> Any:
    """How ``fm.simulate``'s server evaluates centrally beside ``transport``: with a
    ``ParallelTransport`` that holds this very test set and a plain ``TorchTrainer`` (the
    workers build the same model), in synchronous rounds, its idle workers each predict a
    share of the test set and the server computes the metrics from their outputs
    (``predict_test`` and ``TorchTrainer.evaluate_outputs``; the same metrics up to float
    rounding). The evaluator returns None when a share cannot be predicted, and the server
    then evaluates by itself (``Server(eval_threads=...)``). None (the server's own
    evaluation) for everything else."""
    from fedmosaic.train.torch_trainer import TorchTrainer

    workers = _idle_workers(transport, schedule)
    if workers is None or type(trainer) is not TorchTrainer or test_data is None \
            or getattr(workers.data, "test", None) is not test_data:
        return None

    def evaluate(weights: torch.Tensor, data: Any) -> dict[str, float] | None:
        out = workers.predict_test(weights) if data is test_data else None
        return None if out is None else trainer.evaluate_outputs(out, data)

    return evaluate


def central_eval_threads(transport: Any, schedule: Any = None) -> int | None:
    """torch threads for the server's own central evaluation beside ``transport``: the
    threads of a ``ParallelTransport``'s workers (capped at the usable cores), idle while a
    synchronous round is evaluated; None (the process's own setting) for everything else."""
    workers = _idle_workers(transport, schedule)
    if workers is None:
        return None
    held = int(workers.num_workers) * int(getattr(workers, "torch_threads", 1))
    threads = min(held, usable_cores())
    return threads if threads > torch.get_num_threads() else None
