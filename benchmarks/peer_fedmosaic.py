"""The peer task (defined in docs/benchmarks.md) run with fedmosaic; one configuration per
process so that start-up time and peak memory can be measured from outside.

Run: .venv/bin/python benchmarks/peer_fedmosaic.py --clients 100 --per-round 100 --rounds 3 \
         --transport batched --out /tmp/result.json
(benchmarks/peer_compare.py runs it for every configuration, next to Flower.)
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

import fedmosaic as fm
from fedmosaic.data import ArrayDataset, ClientData, FederatedDataset, load_digits
from fedmosaic.models import MLP
from fedmosaic.runtime.batched import BatchedTransport


def peer_partition(train: ArrayDataset, test: ArrayDataset, clients: int,
                   seed: int) -> FederatedDataset:
    """IID: a seeded permutation cut with np.array_split into ``clients`` parts.

    With more clients than the 1,437 training samples, the permutation is tiled
    (ceil(N / 1437) copies, each a fresh permutation) so that every client holds at least
    one real sample; only the fedmosaic-only 10,000-client configurations need this.
    """
    rng = np.random.default_rng(seed)
    copies = math.ceil(clients / len(train))
    perm = np.concatenate([rng.permutation(len(train)) for _ in range(copies)])
    parts = np.array_split(perm, clients)
    width = len(str(clients - 1))
    return FederatedDataset(
        name="digits-peer",
        clients=[ClientData(f"client_{i:0{width}d}", train.subset(p)) for i, p in enumerate(parts)],
        test=test, num_classes=10, feature_shape=(64,),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, required=True)
    ap.add_argument("--per-round", type=int, required=True)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--transport", choices=("sequential", "batched"), default="batched")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    train, test = load_digits(seed=0)
    fed = peer_partition(train, test, args.clients, args.seed)
    trainer = fm.TorchTrainer(lambda: MLP(64, [64], 10), lr=0.05, epochs=1, batch_size=32,
                              device=args.device)
    transport = (BatchedTransport(trainer, fed) if args.transport == "batched"
                 else fm.SequentialTransport(trainer, fed))
    strategy = fm.FedAvg(clients_per_round=args.per_round)
    first_round_start = time.time()
    result = fm.simulate(trainer, fed, strategy, args.rounds, seed=args.seed,
                         transport=transport)
    payload = {
        "framework": "fedmosaic",
        "version": fm.__version__,
        "transport": args.transport,
        "device": args.device,
        "clients": args.clients,
        "per_round": args.per_round,
        "rounds": args.rounds,
        "first_round_start_unix": first_round_start,
        "round_seconds": result.metric("wall_time"),
        "accuracy": result.metric("test_accuracy"),
        "final_accuracy": result.final["test_accuracy"],
    }
    with open(args.out, "w") as fh:
        json.dump(payload, fh, indent=1)


if __name__ == "__main__":
    main()
