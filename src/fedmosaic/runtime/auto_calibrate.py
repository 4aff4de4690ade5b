"""Measure the constants of ``transport = "auto"``'s cost model on this machine.

Run: ``python -m fedmosaic.runtime.auto_calibrate [--repeat 5]`` (``--choices`` prints what
``auto`` chooses on the benchmark tasks instead). It times, with one torch thread per process
(as the transports run in the benchmarks):

* ``SEQ_STEP_SECONDS``: a local step of the digits-sized MLP (64-64-10, batch 32), whose
  compute is negligible: the per-step overhead of ``TorchTrainer``;
* ``MACS_PER_SECOND``: a step of the zoo's SmallCNN on 28x28 images (batch 32), less that
  overhead, against its forward multiply-accumulates times 3 (forward + backward);
* ``SEQ_FIT_SECONDS``: ``SequentialTransport`` over 200 one-step clients, less their steps;
* ``BATCHED_ROUND_SECONDS`` and ``BATCHED_CLIENT_STEP_SECONDS``: ``BatchedTransport`` over 10
  and 1,000 one-step MLP clients (a line through the two);
* ``PARALLEL_START_SECONDS``, ``PARALLEL_CLIENT_SECONDS`` and
  ``PARALLEL_BATCHED_CLIENT_SECONDS`` (two or more usable cores): ``ParallelTransport``'s
  start with one worker per core, and its round over 1,000 one-step MLP clients (workers
  training sequentially, then batched) against the cost model's ideal split of the
  sequential and batched rounds;
* the round seconds of each transport over those 1,000 clients, side by side.

Each figure is the minimum over ``--repeat`` runs (the least disturbed by other processes);
the output puts it next to the value built into ``fedmosaic.runtime.auto``. Nothing is
written: to use other constants, set them on the module (e.g. in a ``conftest`` or a script)
or pick the transport explicitly.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from fedmosaic.algorithms.strategy import ClientTask
from fedmosaic.data import ArrayDataset, ClientData, FederatedDataset
from fedmosaic.models import MLP, SmallCNN
from fedmosaic.runtime import auto
from fedmosaic.runtime.batched import BatchedTransport
from fedmosaic.runtime.transport import SequentialTransport
from fedmosaic.train.base import FitConfig
from fedmosaic.train.torch_trainer import TorchTrainer


def _data(n: int, shape: tuple[int, ...], seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    return ArrayDataset(rng.random((n, *shape), dtype=np.float32),
                        rng.integers(0, 10, n).astype(np.int64))


def _federation(clients: int, per_client: int) -> FederatedDataset:
    data = _data(clients * per_client, (64,))
    parts = [ClientData(f"c{i:04d}", data.subset(np.arange(i * per_client,
                                                           (i + 1) * per_client)))
             for i in range(clients)]
    return FederatedDataset(name="calibration", clients=parts, test=parts[0].train,
                            num_classes=10, feature_shape=(64,))


def _best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _round(transport: object, weights: torch.Tensor, fed: FederatedDataset) -> None:
    tasks = [ClientTask(c, FitConfig(round=1, seed=i)) for i, c in enumerate(fed.client_ids)]
    list(transport.fit(weights, tasks, None))  # type: ignore[attr-defined]


def calibrate(repeat: int = 5) -> dict[str, float]:
    """The measured constants (module docstring), by the names of ``fedmosaic.runtime.auto``."""
    torch.set_num_threads(1)
    out: dict[str, float] = {}
    steps = 10
    mlp = TorchTrainer(partial(MLP, 64, [64], 10), lr=0.05, batch_size=32)
    cnn = TorchTrainer(SmallCNN, lr=0.05, batch_size=32)
    for trainer, shape in ((mlp, (64,)), (cnn, (1, 28, 28))):
        data, w = _data(32 * steps, shape), trainer.initial_weights(0)
        trainer.fit(w, data, FitConfig(round=1, seed=0))  # warm-up
        out[f"step_{shape[0]}"] = _best(
            lambda t=trainer, d=data, w=w: t.fit(w, d, FitConfig(round=1, seed=1)),
            repeat) / steps
    out["SEQ_STEP_SECONDS"] = out.pop("step_64")
    macs = auto.macs_per_sample(cnn.model, torch.zeros(1, 1, 28, 28))
    out["MACS_PER_SECOND"] = 3 * macs * 32 / max(1e-9, out.pop("step_1")
                                                 - out["SEQ_STEP_SECONDS"])
    w = mlp.initial_weights(0)
    fed = _federation(200, 8)
    seq = _best(lambda: _round(SequentialTransport(mlp, fed), w, fed), repeat)
    out["SEQ_FIT_SECONDS"] = max(0.0, seq / 200 - out["SEQ_STEP_SECONDS"])
    small, large = _federation(10, 8), _federation(1000, 8)
    bat_small, bat_large = BatchedTransport(mlp, small), BatchedTransport(mlp, large)
    _round(bat_small, w, small)
    _round(bat_large, w, large)  # probes and traces: the set-up, not a round
    t10 = _best(lambda: _round(bat_small, w, small), repeat)
    t1000 = _best(lambda: _round(bat_large, w, large), repeat)
    out["BATCHED_CLIENT_STEP_SECONDS"] = max(0.0, (t1000 - t10) / 990)
    out["BATCHED_ROUND_SECONDS"] = max(0.0, t10 - 10 * out["BATCHED_CLIENT_STEP_SECONDS"])
    t_seq = _best(lambda: _round(SequentialTransport(mlp, large), w, large), repeat)
    rounds = {"sequential": t_seq, "batched": t1000}
    cores = auto.usable_cores()
    if cores >= 2:
        from fedmosaic.runtime.parallel import ParallelTransport

        factory = partial(TorchTrainer, partial(MLP, 64, [64], 10), lr=0.05, batch_size=32)
        for inner in ("sequential", "batched"):
            t0 = time.perf_counter()
            with ParallelTransport(factory, large, num_workers=cores, inner=inner) as par:
                start = time.perf_counter() - t0
                _round(par, w, large)
                rounds[f"parallel ({inner})"] = _best(lambda p=par: _round(p, w, large),
                                                      repeat)
            if inner == "sequential":
                out["PARALLEL_START_SECONDS"] = start
        ideal = t_seq / (cores * auto.PARALLEL_EFFICIENCY)
        out["PARALLEL_CLIENT_SECONDS"] = max(0.0, (rounds["parallel (sequential)"] - ideal
                                                   - auto.PARALLEL_ROUND_SECONDS) / 1000)
        ideal = (auto.BATCHED_ROUND_SECONDS + 1000 / cores * out["BATCHED_CLIENT_STEP_SECONDS"]
                 ) / auto.PARALLEL_EFFICIENCY
        out["PARALLEL_BATCHED_CLIENT_SECONDS"] = max(
            0.0, (rounds["parallel (batched)"] - ideal - auto.PARALLEL_ROUND_SECONDS) / 1000)
    for kind, seconds in rounds.items():
        out[f"round of 1,000 one-step MLP clients, {kind}"] = seconds
    return out


#: (data set, clients, clients per round, rounds) of the benchmark tasks (docs/benchmarks.md).
CHOICES = [("fashion_mnist", 100, 10, 3), ("fashion_mnist", 100, 100, 3),
           ("fashion_mnist", 1000, 100, 3), ("fashion_mnist", 1000, 1000, 2),
           ("fashion_mnist", 100, 10, 1), ("digits", 10, 10, 5), ("digits", 100, 100, 3),
           ("digits", 1000, 1000, 2), ("digits", 1000, 1000, 100)]


def choices() -> None:
    """Print ``auto``'s choice and estimates on the benchmark tasks (IID partitions): the
    Fashion-MNIST task with the zoo's SmallCNN, the digits task with the 64-64-10 MLP."""
    from fedmosaic.algorithms.strategy import FedAvg
    from fedmosaic.data import IID, load_digits, load_fashion_mnist, partition

    data = {"fashion_mnist": load_fashion_mnist(), "digits": load_digits(seed=0)}
    models = {"fashion_mnist": SmallCNN, "digits": partial(MLP, 64, [64], 10)}
    for name, n, k, rounds in CHOICES:
        train, test = data[name]
        fed = partition(train, IID(), n, 0, test=test)
        trainer = TorchTrainer(models[name], lr=0.05, epochs=1, batch_size=32)
        c = auto.choose_transport(trainer, fed, FedAvg(clients_per_round=k), rounds)
        est = ", ".join(f"{kind} {sec:.3g}" for kind, sec in c.estimates.items())
        print(f"{name} {n}/{k}/{rounds}: {c.kind}"
              + (f" ({c.workers} workers)" if c.kind.startswith("parallel") else "")
              + f"; estimated seconds: {est}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--choices", action="store_true",
                    help="print auto's choice on the benchmark tasks instead (no timing)")
    args = ap.parse_args()
    if args.choices:
        choices()
        return
    before = os.getloadavg()
    measured = calibrate(args.repeat)
    print(f"{'constant':<52} {'measured':>10} {'built in':>10}")
    for name, value in measured.items():
        built = getattr(auto, name, None)
        print(f"{name:<52} {value:>10.4g} {'' if built is None else f'{built:.4g}':>10}")
    print(f"{auto.usable_cores()} usable cores; load average before {before[0]:.2f}, "
          f"after {os.getloadavg()[0]:.2f} (other processes skew every figure)")


if __name__ == "__main__":
    main()
