"""Measure the constants of ``transport = "auto"``'s cost model on this machine.

Run: ``python -m fedmosaic.runtime.auto_calibrate [--repeat 5]``. It times, with one torch
thread per process (as the transports run in the benchmarks):

* ``SEQ_STEP_SECONDS``: a local step of the digits-sized MLP (64-64-10, batch 32), whose
  compute is negligible: the per-step overhead of ``TorchTrainer``;
* ``MACS_PER_SECOND``: a step of the zoo's SmallCNN on 28x28 images (batch 32), less that
  overhead, against its forward multiply-accumulates times 3 (forward + backward);
* ``SEQ_FIT_SECONDS``: ``SequentialTransport`` over 200 one-step clients, less their steps;
* ``BATCHED_ROUND_SECONDS`` and ``BATCHED_CLIENT_STEP_SECONDS``: ``BatchedTransport`` over 10
  and 1,000 one-step MLP clients (a line through the two);
* ``PARALLEL_START_SECONDS`` and ``PARALLEL_CLIENT_SECONDS`` (two or more usable cores):
  ``ParallelTransport``'s start with one worker per core, and its round over 1,000 one-step
  MLP clients against the sequential one.

Each figure is the minimum over ``--repeat`` runs (the least disturbed by other processes);
the output puts it next to the value built into ``fedmosaic.runtime.auto``. Nothing is
written: to use other constants, set them on the module (e.g. in a ``conftest`` or a script)
or pick the transport explicitly.
"""

from __future__ import annotations

import argparse
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
    cores = auto.usable_cores()
    if cores >= 2:
        from fedmosaic.runtime.parallel import ParallelTransport

        factory = partial(TorchTrainer, partial(MLP, 64, [64], 10), lr=0.05, batch_size=32)
        t0 = time.perf_counter()
        with ParallelTransport(factory, large, num_workers=cores) as par:
            out["PARALLEL_START_SECONDS"] = time.perf_counter() - t0
            _round(par, w, large)
            t_par = _best(lambda: _round(par, w, large), repeat)
        t_seq = _best(lambda: _round(SequentialTransport(mlp, large), w, large), repeat)
        ideal = t_seq / (cores * auto.PARALLEL_EFFICIENCY)
        out["PARALLEL_CLIENT_SECONDS"] = max(0.0, (t_par - ideal
                                                   - auto.PARALLEL_ROUND_SECONDS) / 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    measured = calibrate(args.repeat)
    print(f"{'constant':<30} {'measured':>12} {'built in':>12}")
    for name, value in measured.items():
        print(f"{name:<30} {value:>12.4g} {getattr(auto, name):>12.4g}")


if __name__ == "__main__":
    main()
