"""Distributed DP on integers: the distributed Skellam mechanism vs DP-FedAvg's distributed
Gaussian shares, both under SecAgg+, at the same target epsilon (docs/privacy.md).

Set-up: digits (sklearn, 8x8), N clients (IID), multinomial logistic regression (650
parameters), Poisson sampling with rate q, client-level clip, delta 1e-5, the given number of
rounds; each strategy's noise is calibrated so that the whole run costs the target epsilon
against observers of the released model (amplified by subsampling). Two regimes, both with
about 20 clients per round: N = 100, q = 0.2 and N = 400, q = 0.05. Every run goes through
``SecAggPlusTransport`` (the real SecAgg+ protocol in process, seeded masks, seeded client
noise: simulation only), and the test accuracy is averaged over the last 5 rounds.

Rows: DP-FedAvg distributed (Gaussian shares, float quantizer, 32-bit ring, tight
subsampled-Gaussian RDP from dp-accounting), Skellam with a 32-bit ring, and Skellam with a
16-bit ring (where the modular-clipping bound forces a coarser scale ``gamma``).

Run: .venv/bin/python benchmarks/skellam.py [--rounds 40 --epsilon 5]
Writes benchmarks/results/skellam.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import machine, save

import fedmosaic as fm
from fedmosaic.data import IID, load_digits, partition
from fedmosaic.models import build_model
from fedmosaic.privacy import DPFedAvg
from fedmosaic.privacy.distributed_skellam import DistributedSkellam
from fedmosaic.privacy.secagg.transport import SecAggPlusTransport


def run(name: str, strategy: Any, fed: Any, rounds: int, seed: int) -> dict[str, Any]:
    trainer = fm.TorchTrainer(lambda: build_model("logreg", (64,), 10), lr=0.5,
                              batch_size=16)
    transport = SecAggPlusTransport(fm.SequentialTransport(trainer, fed), clip=1.0, seed=seed)
    t0 = time.perf_counter()
    res = fm.simulate(trainer, fed, strategy, rounds, seed=seed, transport=transport)
    acc = res.metric("test_accuracy")
    dp = res.guarantees["differential_privacy"]
    row = {"run": name, "seconds": time.perf_counter() - t0,
           "final_accuracy": float(np.mean(acc[-5:])), "accuracy": acc,
           "epsilon": dp["epsilon"], "epsilon_against_server": dp.get("epsilon_against_server"),
           "noise_std_on_mean": res.history[-1].get("dp_noise_std_on_mean"),
           "guarantees": res.guarantees}
    print(f"{name}: accuracy (mean of last 5 rounds) {row['final_accuracy']:.4f}, epsilon "
          f"{row['epsilon']:.3f}, noise std on the mean {row['noise_std_on_mean']:.4g}, "
          f"{row['seconds']:.0f} s", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--regimes", default="100:0.2,400:0.05",
                    help="comma-separated clients:rate pairs")
    ap.add_argument("--epsilon", type=float, default=5.0)
    ap.add_argument("--clip", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, test = load_digits()
    regimes = []
    for spec in args.regimes.split(","):
        clients, rate = spec.split(":")
        regimes.append(regime(train, test, int(clients), float(rate), args))
    payload = {"command": f"python benchmarks/skellam.py --rounds {args.rounds} --epsilon "
                          f"{args.epsilon} --clip {args.clip} --regimes {args.regimes} "
                          f"--seed {args.seed}",
               "machine": machine(), "rounds": args.rounds, "target_epsilon": args.epsilon,
               "clip": args.clip, "regimes": regimes}
    print(f"results in {save('skellam', payload)}")


def regime(train: Any, test: Any, clients: int, rate: float,
           args: argparse.Namespace) -> dict[str, Any]:
    print(f"N = {clients}, q = {rate}", flush=True)
    fed = partition(train, IID(), clients, args.seed, test=test)
    expected = rate * clients
    # The fewest shares a released sum may hold: half the expected cohort.
    m = max(2, int(expected // 2))
    # The largest cohort the modular-clipping bound covers; P(Binomial(N, q) > this) is
    # negligible here (a larger round would be refused, not wrapped).
    max_clients = int(min(clients, expected * 2 + 10))
    common = dict(clip=args.clip, delta=1e-5, target_epsilon=args.epsilon, rounds=args.rounds,
                  sampling="poisson", rate=rate, min_contributors=m, lr=None)
    runs = {
        "DP-FedAvg distributed Gaussian (32-bit quantizer)": lambda: DPFedAvg(
            distributed=True, **common),
        "distributed Skellam, 32-bit ring": lambda: DistributedSkellam(
            bits=32, max_clients=max_clients, **common),
        "distributed Skellam, 16-bit ring": lambda: DistributedSkellam(
            bits=16, max_clients=max_clients, **common),
    }
    rows = [run(name, make(), fed, args.rounds, args.seed) for name, make in runs.items()]
    for row in rows[1:]:
        sk = row["guarantees"]["differential_privacy"]["skellam"]
        row["gamma"], row["bits"] = sk["gamma"], sk["bits"]
        row["l2_sensitivity_over_gamma_clip"] = sk["l2_sensitivity"] / (sk["gamma"] * args.clip)
    return {"clients": clients, "rate": rate, "min_contributors": m,
            "max_clients": max_clients, "rows": rows}


if __name__ == "__main__":
    main()
