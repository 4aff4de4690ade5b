"""A framework-free reference for the peer tasks: plain PyTorch, one model, the selected clients
trained one after another, FedAvg by hand. It also times its forward and backward passes
alone, the single-thread compute floor that no framework on one core can beat.

Run with any venv that has numpy and torch (the driver uses the project's):

    .venv/bin/python benchmarks/reference_peer.py --task fmnist-cnn \
        --clients 100 --per-round 10 --rounds 3 --seed 0 --out result.json

Per round: sample K of N clients uniformly without replacement
(``np.random.default_rng([seed, round]).choice``), load the global weights into the one model,
train each client (benchmarks/compute_task.py ``train_local``: 1 epoch of SGD, lr 0.05, batch
32), add its weights times its sample count to a running sum, set the global weights to the sum
over the total count, and evaluate on the test set. ``round_seconds`` times all of that;
``floor_seconds`` sums the forward + backward passes of the round's local steps alone (no
optimizer step, no batch slicing, no evaluation, no aggregation); ``eval_seconds`` is the
round's evaluation of the global model on the test set (every runner's round includes one).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compute_task
import digits_task

TASKS = {"digits": digits_task, "fmnist-cnn": compute_task}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=sorted(TASKS), default="fmnist-cnn")
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--per-round", type=int, required=True)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: single-thread)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    task = TASKS[args.task]
    if not 1 <= args.per_round <= args.clients <= task.N_TRAIN:
        p.error(f"need 1 <= --per-round <= --clients <= {task.N_TRAIN}")
    torch.set_num_threads(args.threads)

    x_tr, y_tr, x_te, y_te = task.load_split()
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    parts = task.partitions(args.clients, args.seed)
    client_x = [xt[idx] for idx in parts]
    client_y = [yt[idx] for idx in parts]

    torch.manual_seed(args.seed)
    model = task.make_model()
    # torch's one-off per-process costs (first optimizer, first backward), as the peers' runners
    compute_task.train_local(model, client_x[0][:32], client_y[0][:32], 0)
    torch.manual_seed(args.seed)
    model = task.make_model()
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    rounds, floors, evals, acc, losses = [], [], [], [], []
    first_round_start = time.time()
    for r in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        timer = [0.0]
        chosen = np.random.default_rng([args.seed, r]).choice(
            args.clients, size=args.per_round, replace=False
        )
        total = {k: torch.zeros_like(v) for k, v in global_state.items()}
        count, loss_sum = 0, 0.0
        for c in sorted(chosen.tolist()):
            model.load_state_dict(global_state)
            seed = compute_task.client_seed(args.seed, r, c)
            n = len(client_y[c])
            loss_sum += n * compute_task.train_local(model, client_x[c], client_y[c], seed, timer)
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    total[k].add_(v, alpha=float(n))
            count += n
        global_state = {k: v / count for k, v in total.items()}
        model.load_state_dict(global_state)
        t_eval = time.perf_counter()
        acc.append(compute_task.accuracy(model, x_te, y_te))
        evals.append(time.perf_counter() - t_eval)
        losses.append(loss_sum / count)
        rounds.append(time.perf_counter() - t0)
        floors.append(timer[0])
        print(f"[reference] round {r}: {rounds[-1]:.3f} s (fwd+bwd {floors[-1]:.3f} s), "
              f"accuracy {acc[-1]:.4f}", file=sys.stderr, flush=True)

    payload = {
        "framework": "reference",
        "version": f"torch {torch.__version__}",
        "task": args.task,
        "clients": args.clients,
        "per_round": args.per_round,
        "rounds": args.rounds,
        "seed": args.seed,
        "torch_threads": torch.get_num_threads(),
        "first_round_start_unix": first_round_start,
        "round_seconds": rounds,
        "floor_seconds": floors,
        "eval_seconds": evals,
        "train_loss": losses,
        "accuracy": acc,
        "final_accuracy": acc[-1],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
