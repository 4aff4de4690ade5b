"""FedAvg on Fashion-MNIST: 100 clients, Dirichlet(0.5) label skew, 10 clients per round,
a small CNN (fedmosaic.models.SmallCNN), 1 local epoch of SGD (lr 0.05, batch 32).

Run: .venv/bin/python benchmarks/fmnist_fedavg.py [--rounds 50] [--seed 0]
Writes benchmarks/results/fmnist_fedavg.json and prints a Markdown table of accuracy per round.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import machine, peak_rss_mb, save

import fedmosaic as fm
from fedmosaic.data import Dirichlet, load_fashion_mnist, partition
from fedmosaic.models import SmallCNN


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    train, test = load_fashion_mnist()
    fed = partition(train, Dirichlet(alpha=0.5), 100, args.seed, test=test, name="fashion_mnist")
    trainer = fm.TorchTrainer(SmallCNN, lr=0.05, epochs=1, batch_size=32)
    strategy = fm.FedAvg(clients_per_round=10)
    t_setup = time.perf_counter() - t_start

    def show(rec: dict) -> None:
        print(f"round {rec['round']:>3}  acc {rec['test_accuracy']:.4f}  "
              f"loss {rec['test_loss']:.4f}  {rec['wall_time']:.2f}s", flush=True)

    t0 = time.perf_counter()
    res = fm.simulate(trainer, fed, strategy, args.rounds, seed=args.seed, callbacks=[show])
    total = time.perf_counter() - t0
    times = sorted(r["wall_time"] for r in res.history)
    payload = {
        "task": "FedAvg, Fashion-MNIST, 100 clients Dirichlet(0.5), 10/round, SmallCNN, "
                "1 local epoch SGD lr 0.05 batch 32, sequential transport",
        "command": f"python benchmarks/fmnist_fedavg.py --rounds {args.rounds} "
                   f"--seed {args.seed} --threads {args.threads}",
        "machine": machine(),
        "parameters": trainer.spec.numel,
        "setup_seconds": t_setup,
        "total_seconds": total,
        "median_round_seconds": times[len(times) // 2],
        "peak_rss_mb": peak_rss_mb(),
        "final_accuracy": res.final["test_accuracy"],
        "history": [{k: r[k] for k in ("round", "test_accuracy", "test_loss", "train_loss",
                                       "wall_time", "bytes_up")} for r in res.history],
    }
    path = save("fmnist_fedavg", payload)
    print("\n| round | test accuracy | test loss | round time (s) |\n|---|---|---|---|")
    for r in res.history:
        print(f"| {r['round']} | {r['test_accuracy']:.4f} | {r['test_loss']:.4f} | "
              f"{r['wall_time']:.2f} |")
    median = payload["median_round_seconds"]
    print(f"\n{args.rounds} rounds in {total:.1f}s (median round {median:.2f}s, "
          f"setup {t_setup:.1f}s, peak RSS {payload['peak_rss_mb']:.0f} MB); results in {path}")


if __name__ == "__main__":
    main()
