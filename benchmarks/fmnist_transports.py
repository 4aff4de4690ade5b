"""Fashion-MNIST, SmallCNN, 100 clients (Dirichlet 0.5): sequential vs batched transport at
10 and 100 clients per round. Same seed, so both transports train the same clients on the same
batches; the script also reports how far apart the two final models are.

Run: .venv/bin/python benchmarks/fmnist_transports.py [--rounds 3] [--device cpu]
Writes benchmarks/results/fmnist_transports.json.
"""

from __future__ import annotations

import argparse
import statistics
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
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-round", default="10,100")
    # Each transport at its best thread count: one client at a time gains nothing from a
    # second intra-op thread (it loses badly when the other core is busy), a whole cohort does.
    ap.add_argument("--threads-sequential", type=int, default=1)
    ap.add_argument("--threads-batched", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--memory-budget-mb", type=float, default=256.0)
    args = ap.parse_args()
    train, test = load_fashion_mnist()
    fed = partition(train, Dirichlet(alpha=0.5), 100, 0, test=test, name="fashion_mnist")
    rows = []
    for k in (int(v) for v in args.per_round.split(",")):
        finals = {}
        for kind in ("sequential", "batched"):
            threads = args.threads_sequential if kind == "sequential" else args.threads_batched
            torch.set_num_threads(threads)
            trainer = fm.TorchTrainer(SmallCNN, lr=0.05, epochs=1, batch_size=32,
                                      device=args.device)
            transport = (fm.BatchedTransport(trainer, fed,
                                             memory_budget_mb=args.memory_budget_mb)
                         if kind == "batched" else fm.SequentialTransport(trainer, fed))
            t0 = time.perf_counter()
            res = fm.simulate(trainer, fed, fm.FedAvg(clients_per_round=k), args.rounds, seed=0,
                              transport=transport)
            total = time.perf_counter() - t0
            finals[kind] = res.weights
            row = {"per_round": k, "transport": kind, "threads": threads,
                   "total_seconds": total,
                   "median_round_seconds": statistics.median(res.metric("wall_time")),
                   "round_seconds": res.metric("wall_time"),
                   "final_accuracy": res.final["test_accuracy"]}
            rows.append(row)
            print(f"K={k:>3} {kind:<10} median round {row['median_round_seconds']:.2f}s "
                  f"acc {row['final_accuracy']:.4f}", flush=True)
        diff = float((finals["sequential"] - finals["batched"]).abs().max())
        rows[-1]["max_abs_diff_vs_sequential"] = diff
        seq, bat = rows[-2]["median_round_seconds"], rows[-1]["median_round_seconds"]
        print(f"K={k:>3} speed-up {seq / bat:.2f}x, max |w_seq - w_batched| = {diff:.2e}")
    payload = {
        "command": f"python benchmarks/fmnist_transports.py --rounds {args.rounds} "
                   f"--per-round {args.per_round} --threads-sequential "
                   f"{args.threads_sequential} --threads-batched {args.threads_batched} "
                   f"--device {args.device}",
        "machine": machine(), "peak_rss_mb": peak_rss_mb(), "rows": rows,
    }
    print(f"results in {save('fmnist_transports', payload)}")


if __name__ == "__main__":
    main()
