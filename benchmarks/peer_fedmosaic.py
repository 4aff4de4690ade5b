"""The peer tasks run with fedmosaic; one configuration per process so that start-up time and
peak memory can be measured from outside.

Tasks: ``digits`` (issue #3, defined in docs/benchmarks.md and benchmarks/digits_task.py) and
``fmnist-cnn`` (the compute-bound task of issue #23, benchmarks/compute_task.py: Fashion-MNIST
60,000 / 10,000 via ``fedmosaic.data.load_fashion_mnist``, IID, the 18,378-parameter CNN).

Run: .venv/bin/python benchmarks/peer_fedmosaic.py --task fmnist-cnn --clients 100 \
         --per-round 100 --rounds 3 --transport default --out /tmp/result.json
(benchmarks/peer_compare.py runs it for every configuration, next to Flower and pfl.)

``--transport default`` passes no transport to ``fm.simulate`` (fedmosaic's own choice);
``auto`` asks for the automatic choice by name; the others build that transport.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fedmosaic as fm
from fedmosaic.data import (
    ArrayDataset,
    ClientData,
    FederatedDataset,
    load_digits,
    load_fashion_mnist,
)
from fedmosaic.models import MLP
from fedmosaic.runtime.batched import BatchedTransport

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compute_task

TRANSPORTS = ("sequential", "batched", "parallel", "auto", "default")


def digits_mlp() -> torch.nn.Module:
    """The digits peer task's MLP 64-64-10 (a module-level function: picklable)."""
    return MLP(64, [64], 10)


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


def fmnist_federation(clients: int, seed: int) -> FederatedDataset:
    """Fashion-MNIST cut into ``clients`` IID parts by compute_task.partitions (the peers'
    partition: the same permutation, so every framework trains the same client data)."""
    train, test = load_fashion_mnist()
    parts = compute_task.partitions(clients, seed)
    width = len(str(clients - 1))
    return FederatedDataset(
        name="fmnist-cnn-peer",
        clients=[ClientData(f"client_{i:0{width}d}", train.subset(p)) for i, p in enumerate(parts)],
        test=test, num_classes=10, feature_shape=(1, 28, 28),
    )


def build_transport(kind: str, trainer: fm.TorchTrainer, fed: FederatedDataset) -> Any:
    """The transport to pass to ``fm.simulate``: None for fedmosaic's default."""
    if kind == "default":
        return None
    if kind == "sequential":
        return fm.SequentialTransport(trainer, fed)
    if kind == "batched":
        return BatchedTransport(trainer, fed)
    if kind == "parallel":
        from fedmosaic.runtime.parallel import ParallelTransport

        return ParallelTransport(trainer, fed)
    if kind == "auto":
        return "auto"
    raise ValueError(f"unknown transport {kind!r}; choose from {TRANSPORTS}")


def transport_record(transport: Any, result: Any) -> dict[str, Any]:
    """What the run says about its transport: its class, and the choice and reason it records
    (attributes such as ``decision`` or ``fallback_reason``, or the run's guarantees)."""
    out: dict[str, Any] = {}
    if transport is not None and not isinstance(transport, str):
        out["class"] = type(transport).__name__
        for attr in ("decision", "fallback_reason", "choice", "reason", "num_workers", "inner",
                     "torch_threads", "start_seconds"):
            value = getattr(transport, attr, None)
            if value is not None and not callable(value):
                out[attr] = value if isinstance(value, (int, float, str, bool)) else str(value)
    for key, value in (getattr(result, "guarantees", None) or {}).items():
        if "transport" in key or "parallel" in key:
            out[f"guarantees.{key}"] = value if isinstance(value, (int, float, str, bool)) \
                else json.loads(json.dumps(value, default=str))
    run_transport = getattr(result, "transport", None)  # RunResult.transport: kind and why
    if isinstance(run_transport, dict):
        for key, value in run_transport.items():
            plain = isinstance(value, (int, float, str, bool))
            out[f"run.{key}"] = value if plain else json.loads(json.dumps(value, default=str))
    history = getattr(result, "history", None) or []
    for key, value in (history[0] if history else {}).items():
        if "transport" in key:
            plain = isinstance(value, (int, float, str, bool))
            out[f"record.{key}"] = value if plain else str(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--task", choices=("digits", "fmnist-cnn"), default="digits")
    ap.add_argument("--clients", type=int, required=True)
    ap.add_argument("--per-round", type=int, required=True)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--transport", choices=TRANSPORTS, default="batched")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.task == "digits":
        train, test = load_digits(seed=0)
        fed = peer_partition(train, test, args.clients, args.seed)
        model_fn: Any = digits_mlp
    else:
        fed = fmnist_federation(args.clients, args.seed)
        model_fn = compute_task.TaskCNN  # a class: picklable by reference for worker processes
    # The task's evaluation batch for the CNN, stated so that it equals the peers' whatever
    # fedmosaic's default.
    eval_batch = {"eval_batch_size": compute_task.EVAL_BATCH} if args.task == "fmnist-cnn" else {}
    trainer = fm.TorchTrainer(model_fn, lr=0.05, epochs=1, batch_size=32, device=args.device,
                              **eval_batch)
    transport = build_transport(args.transport, trainer, fed)
    strategy = fm.FedAvg(clients_per_round=args.per_round)
    # Each round's end, stamped by a round callback: with no transport given, fm.simulate
    # builds its choice (worker processes included) before round 1, which is start-up.
    round_ends: list[float] = []
    try:
        result = fm.simulate(trainer, fed, strategy, args.rounds, seed=args.seed,
                             transport=transport,
                             callbacks=[lambda record: round_ends.append(time.time())])
    finally:
        close = getattr(transport, "close", None)
        if callable(close):
            close()  # worker processes of the parallel transport
    payload = {
        "framework": "fedmosaic",
        "version": fm.__version__,
        "task": args.task,
        "transport": args.transport,
        "transport_record": transport_record(transport, result),
        "torch_threads": torch.get_num_threads(),
        "device": args.device,
        "clients": args.clients,
        "per_round": args.per_round,
        "rounds": args.rounds,
        "first_round_start_unix": round_ends[0] - result.metric("wall_time")[0],
        "last_round_end_unix": round_ends[-1],
        "round_seconds": result.metric("wall_time"),
        "accuracy": result.metric("test_accuracy"),
        "final_accuracy": result.final["test_accuracy"],
    }
    with open(args.out, "w") as fh:
        json.dump(payload, fh, indent=1)


if __name__ == "__main__":
    main()
