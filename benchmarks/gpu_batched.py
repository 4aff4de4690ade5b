"""Batched vs sequential transport on a GPU: the digits peer-task MLP at 10,000 clients per
round and the Fashion-MNIST SmallCNN at 500 clients per round (issue #3's GPU figures).

Prepared to run as one short call on a machine with CUDA; on CPU (``--device cpu``, smaller
``--digits-clients``/``--fmnist-clients``) it checks itself. Fashion-MNIST is read from
``--fmnist-root`` (copy /usr/share/datasets/fashion-mnist there when the GPU machine lacks the
Debian package).

Run: python benchmarks/gpu_batched.py --device cuda --fmnist-root .fmnist
Writes benchmarks/results/gpu_batched.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import machine, save
from peer_fedmosaic import peer_partition

import fedmosaic as fm
from fedmosaic.data import Dirichlet, load_digits, load_fashion_mnist, partition
from fedmosaic.models import MLP, SmallCNN


def timed_run(trainer_fn, fed, per_round: int, rounds: int, batched: bool, device: str,
              budget_mb: float) -> dict:
    trainer = trainer_fn(device)
    transport = (fm.BatchedTransport(trainer, fed, memory_budget_mb=budget_mb) if batched
                 else fm.SequentialTransport(trainer, fed))
    t0 = time.perf_counter()
    res = fm.simulate(trainer, fed, fm.FedAvg(clients_per_round=per_round), rounds, seed=0,
                      transport=transport)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    times = res.metric("wall_time")
    return {"transport": "batched" if batched else "sequential", "rounds": rounds,
            "total_seconds": time.perf_counter() - t0,
            "median_round_seconds": statistics.median(times[1:] or times),
            "round_seconds": times, "final_accuracy": res.final["test_accuracy"],
            "weights": res.weights}


def compare(name: str, trainer_fn, fed, per_round: int, rounds: int, seq_rounds: int,
            device: str, budget_mb: float) -> dict:
    bat = timed_run(trainer_fn, fed, per_round, rounds, True, device, budget_mb)
    seq = timed_run(trainer_fn, fed, per_round, seq_rounds, False, device, budget_mb)
    out = {"task": name, "per_round": per_round, "batched": bat, "sequential": seq,
           "speedup": seq["median_round_seconds"] / bat["median_round_seconds"],
           }
    if seq_rounds == rounds:
        out["max_abs_diff"] = float((bat["weights"] - seq["weights"]).abs().max())
    for r in (bat, seq):
        r.pop("weights")
    print(f"{name}: K={per_round} batched {bat['median_round_seconds']:.3f}s/round, "
          f"sequential {seq['median_round_seconds']:.3f}s/round, "
          f"speed-up {out['speedup']:.1f}x", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--digits-clients", type=int, default=10_000)
    ap.add_argument("--fmnist-clients", type=int, default=500)
    ap.add_argument("--fmnist-root", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sequential-rounds", type=int, default=2)
    ap.add_argument("--memory-budget-mb", type=float, default=8192.0)
    args = ap.parse_args()
    results = []

    train, test = load_digits()
    digits = peer_partition(train, test, args.digits_clients, 0)
    results.append(compare(
        "digits MLP 64-64-10", lambda d: fm.TorchTrainer(lambda: MLP(64, [64], 10), lr=0.05,
                                                         batch_size=32, device=d),
        digits, args.digits_clients, args.rounds, args.sequential_rounds, args.device,
        args.memory_budget_mb))

    ftrain, ftest = load_fashion_mnist(args.fmnist_root)
    fmnist = partition(ftrain, Dirichlet(alpha=0.5), args.fmnist_clients, 0, test=ftest)
    results.append(compare(
        "Fashion-MNIST SmallCNN", lambda d: fm.TorchTrainer(SmallCNN, lr=0.05, batch_size=32,
                                                            device=d),
        fmnist, args.fmnist_clients, args.rounds, args.sequential_rounds, args.device,
        args.memory_budget_mb))
    payload = {"command": " ".join(["python", *sys.argv]), "machine": machine(),
               "results": results}
    print(f"results in {save('gpu_batched', payload)}")


if __name__ == "__main__":
    main()
