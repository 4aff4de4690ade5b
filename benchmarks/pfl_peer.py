"""The peer tasks on pfl-research 0.6 (Apple's ``pfl``), for benchmarks/peer_compare.py.

Runs inside benchmarks/.venv-pfl (see setup_pfl_venv.sh), not the project's venv:

    benchmarks/.venv-pfl/bin/python benchmarks/pfl_peer.py --task fmnist-cnn \
        --clients 100 --per-round 10 --rounds 3 --seed 0 --out result.json
    # pfl's documented multi-process simulation (one process per core, torch.distributed):
    benchmarks/.venv-pfl/bin/torchrun --standalone --nnodes=1 --nproc_per_node=2 \
        benchmarks/pfl_peer.py --task fmnist-cnn --clients 100 --per-round 10 --rounds 3 ...

The tasks are defined in benchmarks/digits_task.py (``digits``, the issue #3 peer task) and
benchmarks/compute_task.py (``fmnist-cnn``, the compute-bound task of issue #23).

The pfl side is written the way pfl documents it (its ``benchmarks/image_classification``
PyTorch script and its tutorials): a ``FederatedDataset.from_slices`` of the users' tensors
with a ``MinimizeReuseUserSampler`` (users sampled without reuse until all have been used;
the order is a seeded permutation), a ``PyTorchModel`` around a module with ``loss`` and
``metrics``, ``torch.optim.SGD`` as the local optimizer (``NNTrainHyperParams``: 1 epoch,
lr 0.05, batch 32) and as the central optimizer with lr 1.0 (the averaged model difference
applied as it is: plain FedAvg), ``WeightByDatapoints`` (FedAvg weighted by samples), a
``SimulatedBackend`` and ``FederatedAveraging.run``. Central evaluation on the test set is
pfl's ``CentralEvaluationCallback``; the per-user evaluation of the training users that pfl
adds on evaluation iterations is switched off (see ``FederatedAveragingNoUserEvaluation``:
no other runner does that work); pfl evaluates the initial model instead of the model
after iteration 0, so the subclass below evaluates after every iteration (and not before the
first): each round pays for one evaluation, as in every other runner. pfl's ``Dataset.iter``
yields a user's batches in order (no shuffling).

Under ``torchrun`` (pfl's way to use several cores), each process trains its share of the
cohort and pfl sums the statistics with ``torch.distributed`` (gloo on CPU); the central
evaluation is sharded too. Rank 0 writes the result.

Timing: ``on_train_begin`` stamps ``first_round_start_unix``;
round r lasts from the end of round r-1 to the end of its evaluation (training, aggregation,
evaluation). Before that, one SGD step on a batch pays torch's one-off per-process costs (the
first optimizer imports ``torch._dynamo``), as the Flower runner's readiness probe does.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import itertools

import compute_task
import digits_task

TASKS = {"digits": digits_task, "fmnist-cnn": compute_task}


class PflModule(nn.Module):
    """The task's network with the ``loss`` and ``metrics`` methods ``PyTorchModel`` requires."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:
        self.eval() if eval else self.train()
        return nn.functional.cross_entropy(self(x), y)

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = True) -> dict[str, Any]:
        from pfl.metrics import Weighted

        self.eval() if eval else self.train()
        logits = self(x)
        n = len(y)
        loss = float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct = float((logits.argmax(dim=1) == y).sum())
        return {"loss": Weighted(loss, n), "accuracy": Weighted(correct, n)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=sorted(TASKS), default="digits")
    p.add_argument("--clients", type=int, required=True, help="N, clients in the federation")
    p.add_argument("--per-round", type=int, required=True, help="K, clients trained per round")
    p.add_argument("--rounds", type=int, required=True, help="R, federated rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--out", type=Path, required=True, help="where to write the result JSON")
    args = p.parse_args(argv)
    if not 1 <= args.per_round <= args.clients:
        p.error("need 1 <= --per-round <= --clients")
    if args.clients > TASKS[args.task].N_TRAIN:
        p.error(f"--clients above {TASKS[args.task].N_TRAIN} would leave clients without data")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # pfl's own benchmarks seed both generators; its samplers and dataset seeds use numpy's.
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.callback.central_evaluation import CentralEvaluationCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import MinimizeReuseUserSampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.internal.ops.selector import get_framework_module
    from pfl.metrics import Metrics, get_overall_value
    from pfl.model.pytorch import PyTorchModel

    ops = get_framework_module()
    rank = ops.distributed.global_rank
    world = ops.distributed.world_size

    task = TASKS[args.task]
    x_tr, y_tr, x_te, y_te = task.load_split()
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    parts = task.partitions(args.clients, args.seed)
    users = {uid: [xt[idx], yt[idx]] for uid, idx in enumerate(parts)}
    order = np.random.default_rng(args.seed).permutation(args.clients).tolist()
    train_data = FederatedDataset.from_slices(users, MinimizeReuseUserSampler(order))
    central_data = Dataset(raw_data=[torch.from_numpy(x_te), torch.from_numpy(y_te)])

    net = PflModule(task.make_model())
    # Pay torch's one-off per-process costs (first optimizer, first backward) before timing.
    warm = torch.optim.SGD(net.parameters(), lr=0.0)
    net.loss(xt[: task.BATCH_SIZE], yt[: task.BATCH_SIZE]).backward()
    warm.step()
    warm.zero_grad()
    params = [p for p in net.parameters() if p.requires_grad]
    model = PyTorchModel(
        model=net,
        local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.SGD(params, lr=1.0),
    )
    backend = SimulatedBackend(
        training_data=train_data, val_data=None, postprocessors=[WeightByDatapoints()]
    )

    stamps: list[float] = []
    accuracy: list[float] = []

    class EveryIterationEvaluation(CentralEvaluationCallback):
        """pfl's central evaluation after every iteration, iteration 0 included.

        By default pfl evaluates the initial model in ``on_train_begin`` and reports that in
        iteration 0's metrics instead of evaluating after iteration 0; here the initial
        evaluation is dropped so that every round pays for exactly one evaluation.
        """

        def on_train_begin(self, *, model):
            return Metrics()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            return self._eval(model)

    class RoundTimer(TrainingProcessCallback):
        """Stamps the start of training and the end of every round's evaluation."""

        def on_train_begin(self, *, model):
            stamps.append(time.time())
            return super().on_train_begin(model=model)

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            stamps.append(time.time())
            for name, value in aggregate_metrics:
                if str(name) == "Central val | accuracy":
                    accuracy.append(float(get_overall_value(value)))
            return super().after_central_iteration(
                aggregate_metrics, model, central_iteration=central_iteration
            )

    class FederatedAveragingNoUserEvaluation(FederatedAveraging):
        """pfl's FedAvg without evaluating each training user's data before and after its
        local training: pfl does that on every iteration where ``do_evaluation`` is set
        (iteration % evaluation_frequency == 0, so always on iteration 0), two extra forward
        passes over every client's data that no other runner makes. The central evaluation
        is the callback's, not this flag's."""

        def get_next_central_contexts(self, *args, **kwargs):
            contexts, model, metrics = super().get_next_central_contexts(*args, **kwargs)
            if contexts is not None:
                contexts = tuple(dataclasses.replace(c, do_evaluation=False) for c in contexts)
            return contexts, model, metrics

    algorithm = FederatedAveragingNoUserEvaluation()
    algorithm.run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=args.rounds,
            evaluation_frequency=1,
            train_cohort_size=args.per_round,
            val_cohort_size=0,
        ),
        backend=backend,
        model=model,
        model_train_params=NNTrainHyperParams(
            local_learning_rate=task.LR, local_num_epochs=1, local_batch_size=task.BATCH_SIZE
        ),
        model_eval_params=NNEvalHyperParams(local_batch_size=task.EVAL_BATCH),
        callbacks=[
            EveryIterationEvaluation(central_data, model_eval_params=NNEvalHyperParams(
                local_batch_size=task.EVAL_BATCH)),
            RoundTimer(),
        ],
    )
    if len(stamps) != args.rounds + 1 or len(accuracy) != args.rounds:
        print(f"[pfl_peer] {len(stamps) - 1} of {args.rounds} rounds timed", file=sys.stderr)
        return 1
    rounds = [b - a for a, b in itertools.pairwise(stamps)]
    if rank == 0:
        payload = {
            "framework": "pfl",
            "version": importlib.metadata.version("pfl"),
            "task": args.task,
            "clients": args.clients,
            "per_round": args.per_round,
            "rounds": args.rounds,
            "seed": args.seed,
            "processes": world,
            "torch_threads": torch.get_num_threads(),
            "first_round_start_unix": stamps[0],
            "round_seconds": rounds,
            "accuracy": accuracy,
            "final_accuracy": accuracy[-1],
            "torch": torch.__version__,
            "pid": os.getpid(),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=1))
        print(
            f"[pfl_peer] {args.task} N={args.clients} K={args.per_round} R={args.rounds} "
            f"x{world} processes: rounds {[round(s, 3) for s in rounds]} s, "
            f"final accuracy {accuracy[-1]:.4f}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
