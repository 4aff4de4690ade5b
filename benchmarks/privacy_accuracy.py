"""Accuracy cost of privacy on the digits peer task (docs/benchmarks.md): plain FedAvg vs
client-level DP-FedAvg (and, when available, SecAgg+), about 100 clients per round.

Set-up: the peer task's data and model, N = 1,000 clients (1-2 samples each), 150 rounds.
Plain: 100 clients per round. DP: Poisson sampling with q = 0.1 (100 expected clients),
clip 0.2, noise multiplier 1.0, delta 1e-5, RDP accountant; epsilon is reported per round.

Run: .venv/bin/python benchmarks/privacy_accuracy.py [--rounds 150]
Writes benchmarks/results/privacy_accuracy.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import machine, save
from peer_fedmosaic import peer_partition

import fedmosaic as fm
from fedmosaic.data import load_digits
from fedmosaic.models import MLP
from fedmosaic.privacy import DPFedAvg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, test = load_digits()
    fed = peer_partition(train, test, args.clients, args.seed)
    runs = {
        "plain FedAvg (100 per round)": lambda: fm.FedAvg(clients_per_round=100),
        "DP-FedAvg (q=0.1, clip 0.2, z=1.0)": lambda: DPFedAvg(
            clip=0.2, delta=1e-5, noise_multiplier=1.0, sampling="poisson", rate=0.1),
    }
    rows = []
    for name, strategy in runs.items():
        trainer = fm.TorchTrainer(lambda: MLP(64, [64], 10), lr=0.05, batch_size=32)
        t0 = time.perf_counter()
        res = fm.simulate(trainer, fed, strategy(), args.rounds, seed=args.seed,
                          transport=fm.BatchedTransport(trainer, fed))
        row = {"run": name, "seconds": time.perf_counter() - t0,
               "final_accuracy": res.final["test_accuracy"],
               "accuracy": res.metric("test_accuracy"),
               "epsilon": res.metric("dp_epsilon"), "guarantees": res.guarantees}
        rows.append(row)
        eps = f", epsilon {row['epsilon'][-1]:.2f} at delta 1e-5" if row["epsilon"] else ""
        print(f"{name}: accuracy {row['final_accuracy']:.4f}{eps}", flush=True)
    payload = {"command": f"python benchmarks/privacy_accuracy.py --rounds {args.rounds} "
                          f"--clients {args.clients} --seed {args.seed}",
               "machine": machine(), "rounds": args.rounds, "clients": args.clients,
               "rows": rows}
    print(f"results in {save('privacy_accuracy', payload)}")


if __name__ == "__main__":
    main()
