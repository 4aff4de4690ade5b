"""The peer task on Flower 1.42's Simulation Engine (Ray backend), for benchmarks/peer_compare.py.

Runs inside benchmarks/.venv-flower (see setup_flower_venv.sh), not the project's venv:

    benchmarks/.venv-flower/bin/python benchmarks/flower_peer.py \
        --clients 100 --per-round 10 --rounds 5 --seed 0 --out result.json

``--task fmnist-cnn`` runs the compute-bound task of issue #23 instead (Fashion-MNIST and the
18,378-parameter CNN, defined in benchmarks/compute_task.py, which the client actors import
from the same folder); its functions replace the ones below, everything else is the same.

The digits peer task (the same definition as benchmarks/peer_fedmosaic.py):
  * data: sklearn's digits, X/16 as float32, y int64; a stratified 80/20 split with
    random_state=0 gives 1,437 train / 360 test images;
  * IID partition: ``np.random.default_rng(seed).permutation(1437)`` cut into N parts with
    ``np.array_split``;
  * model: MLP 64 -> 64 (ReLU) -> 10, torch default init after ``torch.manual_seed(seed)``;
  * each selected client: 1 local epoch of plain SGD (lr 0.05, no momentum), batch size 32,
    shuffled, cross-entropy;
  * FedAvg weighted by the number of samples, K of N clients sampled per round uniformly
    without replacement, server-side accuracy on the 360 test images after each round.

The Flower side is written the way Flower 1.42 documents it: a ``ClientApp`` with a
``@train()`` handler, a ``ServerApp`` whose ``@main()`` runs the message-API
``flwr.serverapp.strategy.FedAvg`` with a centralised ``evaluate_fn``, all started with
``flwr.simulation.run_simulation`` on the Ray backend with 1 CPU per client actor.

Timing: ``FedAvg.start`` calls ``evaluate_fn`` before round 1 and after every round. The end
of the round-0 evaluation is ``first_round_start_unix``; round r lasts from the end of
evaluation r-1 to the end of evaluation r (training + aggregation + evaluation).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

# No network here: keep Flower's telemetry and Ray's usage stats from trying to phone home
# (read when flwr / ray are imported, hence before those imports).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import flwr
import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

LR = 0.05
BATCH_SIZE = 32
LOCAL_EPOCHS = 1
N_TRAIN = 1437


# --------------------------------------------------------------------------- the task


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


@lru_cache(maxsize=1)
def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): 1,437 / 360 digits, stratified, random_state=0."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    assert len(x_tr) == N_TRAIN and len(x_te) == 360
    return x_tr, y_tr, x_te, y_te


@lru_cache(maxsize=4)
def partitions(num_clients: int, seed: int) -> list[np.ndarray]:
    """The IID partition: a seeded permutation of the train indices cut into N parts."""
    perm = np.random.default_rng(seed).permutation(N_TRAIN)
    return np.array_split(perm, num_clients)


def train_local(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> float:
    """One epoch of plain SGD over (x, y) in shuffled batches; returns the mean loss."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    total, n = 0.0, len(y)
    for _ in range(LOCAL_EPOCHS):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
    return total / max(n * LOCAL_EPOCHS, 1)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((pred == y).mean())


class DigitsTask:
    """The digits peer task (the functions above), under the interface of compute_task."""

    N_TRAIN = N_TRAIN
    BATCH_SIZE = BATCH_SIZE
    make_model = staticmethod(make_model)
    load_split = staticmethod(load_split)
    partitions = staticmethod(partitions)
    train_local = staticmethod(train_local)
    accuracy = staticmethod(accuracy)


def task_module(name: str) -> Any:
    """``digits`` (issue #3) or ``fmnist-cnn`` (issue #23, benchmarks/compute_task.py)."""
    if name == "digits":
        return DigitsTask
    if name == "fmnist-cnn":
        import compute_task  # benchmarks/ is on the actors' PYTHONPATH, as this module is

        return compute_task
    raise ValueError(f"unknown task {name!r}; choose digits or fmnist-cnn")


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """A distinct, reproducible shuffle seed per (run seed, round, client)."""
    return int(np.random.SeedSequence([seed, server_round, partition_id]).generate_state(1)[0])


# --------------------------------------------------------------------------- ClientApp

client_app = ClientApp()


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    """Load this node's partition, train the received model for one epoch, send it back."""
    config = msg.content["config"]
    seed = int(config["seed"])
    task = task_module(str(config.get("task", "digits")))
    server_round = int(config["server-round"])
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])

    x_tr, y_tr, _, _ = task.load_split()
    idx = task.partitions(num_partitions, seed)[partition_id]
    x = torch.from_numpy(x_tr[idx])
    y = torch.from_numpy(y_tr[idx])

    model = task.make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss = task.train_local(model, x, y, client_seed(seed, server_round, partition_id))

    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"train_loss": loss, "num-examples": len(idx)}),
        }
    )
    return Message(content=content, reply_to=msg)


@client_app.query()
def client_ready(msg: Message, context: Context) -> Message:
    """Readiness probe sent before round 1 (see ``wait_for_backend``).

    Besides loading the data, it pays torch's one-off per-process costs: the first
    ``torch.optim`` optimizer imports ``torch._dynamo`` (about 2 s here) and the first
    backward pass sets up autograd. Neither is Flower's doing nor per-round work.
    """
    task = task_module(str(msg.content["config"].get("task", "digits")))
    x_tr, y_tr, _, _ = task.load_split()
    batch = task.BATCH_SIZE
    task.train_local(
        task.make_model(), torch.from_numpy(x_tr[:batch]), torch.from_numpy(y_tr[:batch]), 0
    )
    info = {"pid": os.getpid(), "torch-threads": torch.get_num_threads()}
    return Message(content=RecordDict({"metrics": MetricRecord(info)}), reply_to=msg)


# --------------------------------------------------------------------------- ServerApp

# Set by main() before the simulation starts; the ServerApp runs in a thread of this process.
RUN: dict[str, Any] = {}
EVAL_END: list[float] = []
ACCURACY: list[float] = []

server_app = ServerApp()


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Accuracy of the global model on the 360 test images; stamps the end of each round."""
    task = task_module(RUN["task"])
    _, _, x_te, y_te = task.load_split()
    model = task.make_model()
    model.load_state_dict(arrays.to_torch_state_dict())
    acc = task.accuracy(model, x_te, y_te)
    EVAL_END.append(time.time())
    ACCURACY.append(acc)
    print(f"[flower_peer] round {server_round}: accuracy {acc:.4f}", file=sys.stderr, flush=True)
    return MetricRecord({"accuracy": acc})


def wait_for_backend(grid: Grid, n_probes: int) -> None:
    """Block until the Simulation Engine runs ClientApps, so round 1 does not pay for it.

    ``run_simulation`` starts the ServerApp thread first and only then initialises Ray and
    the actor pool; without this barrier the whole engine start-up (Ray head node, actor
    processes, their imports, torch's first optimizer) would be billed to round 1. A query
    message per actor makes every actor process start, import this module and warm torch
    before the strategy begins; that time is start-up, as for any framework.
    """
    t0 = time.time()
    while len(node_ids := sorted(grid.get_node_ids())) < RUN["clients"]:
        time.sleep(0.05)  # the SuperNodes are registered just after this thread starts
    actors: dict[int, int] = {}  # actor pid -> its torch threads
    for attempt in range(5):  # until every actor has answered one (usually at once)
        probes = [
            Message(
                RecordDict({"config": ConfigRecord({"task": RUN["task"]})}),
                dst_node_id=nid,
                message_type="query",
            )
            for nid in node_ids[attempt * n_probes : (attempt + 1) * n_probes] or node_ids[:1]
        ]
        replies = list(grid.send_and_receive(probes, timeout=600))
        if len(replies) != len(probes) or any(r.has_error() for r in replies):
            raise RuntimeError(f"backend readiness probe failed: {replies}")
        for r in replies:
            actors[int(r.content["metrics"]["pid"])] = int(r.content["metrics"]["torch-threads"])
        if len(actors) >= n_probes:
            break
    RUN["warmup_seconds"] = time.time() - t0
    RUN["actor_torch_threads"] = sorted(actors.values())
    print(
        f"[flower_peer] backend ready after {RUN['warmup_seconds']:.2f} s; "
        f"actor pid -> torch threads: {actors}",
        file=sys.stderr,
        flush=True,
    )


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    n, k, rounds, seed = RUN["clients"], RUN["per_round"], RUN["rounds"], RUN["seed"]
    if RUN["warmup"]:
        wait_for_backend(grid, min(n, RUN["cpus"]))
    # FedAvg samples with random.sample over the grid's node IDs. Flower draws those IDs from
    # os.urandom, so with K < N *which* partitions are picked still differs run to run.
    random.seed(seed)
    torch.manual_seed(seed)
    model = task_module(RUN["task"]).make_model()
    strategy = FedAvg(
        fraction_train=k / n,
        fraction_evaluate=0.0,  # no client-side evaluation: the server evaluates
        min_train_nodes=k,  # with int(n * k / n) == k this makes exactly K per round
        min_available_nodes=n,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=rounds,
        train_config=ConfigRecord({"seed": seed, "task": RUN["task"]}),
        evaluate_fn=central_evaluate,
    )
    RUN["train_loss"] = [
        float(result.train_metrics_clientapp[r]["train_loss"])
        for r in sorted(result.train_metrics_clientapp)
    ]


# --------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=("digits", "fmnist-cnn"), default="digits")
    p.add_argument("--clients", type=int, required=True, help="N, clients in the federation")
    p.add_argument("--per-round", type=int, required=True, help="K, clients trained per round")
    p.add_argument("--rounds", type=int, required=True, help="R, federated rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="where to write the result JSON")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs Ray may use")
    p.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="start round 1 at once, so that it includes the engine's start-up",
    )
    args = p.parse_args(argv)
    if not 1 <= args.per_round <= args.clients:
        p.error("need 1 <= --per-round <= --clients")
    n_train = task_module(args.task).N_TRAIN
    if args.clients > n_train:
        p.error(f"--clients above {n_train} would leave clients without data")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    RUN.update(
        task=args.task,
        clients=args.clients,
        per_round=args.per_round,
        rounds=args.rounds,
        seed=args.seed,
        cpus=args.cpus,
        warmup=args.warmup,
    )
    task_module(args.task).load_split()  # warm the cache for the server's evaluate_fn

    backend_config = {
        "init_args": {"num_cpus": args.cpus, "num_gpus": 0, "include_dashboard": False},
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    }
    t0 = time.time()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=args.clients,
        backend_name="ray",
        backend_config=backend_config,
    )
    t_end = time.time()

    if len(EVAL_END) != args.rounds + 1:
        print(
            f"[flower_peer] simulation ended after {len(EVAL_END) - 1} of {args.rounds} rounds",
            file=sys.stderr,
        )
        return 1
    rounds = [b - a for a, b in itertools.pairwise(EVAL_END)]
    payload = {
        "framework": "flower",
        "version": flwr.__version__,
        "task": args.task,
        "clients": args.clients,
        "per_round": args.per_round,
        "rounds": args.rounds,
        "seed": args.seed,
        "first_round_start_unix": EVAL_END[0],
        "round_seconds": rounds,
        "accuracy": ACCURACY[1:],
        "final_accuracy": ACCURACY[-1],
        # extras, for the record
        "initial_accuracy": ACCURACY[0],
        "train_loss": RUN.get("train_loss", []),
        "warmup": args.warmup,
        "warmup_seconds": RUN.get("warmup_seconds"),
        "actor_torch_threads": RUN.get("actor_torch_threads"),
        "run_simulation_start_unix": t0,
        "last_round_end_unix": EVAL_END[-1],
        "run_simulation_end_unix": t_end,
        "backend": "ray",
        "backend_config": backend_config,
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1))
    print(
        f"[flower_peer] N={args.clients} K={args.per_round} R={args.rounds}: "
        f"rounds {[round(s, 3) for s in rounds]} s, final accuracy {ACCURACY[-1]:.4f}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    # Run from the importable module rather than from __main__, as a Flower App's code is:
    # Ray's cloudpickle then ships the ClientApp's functions by reference (the actors import
    # this module once, via the PYTHONPATH Flower forwards, and keep its data cache) instead
    # of by value on every message.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import flower_peer

    raise SystemExit(flower_peer.main())
