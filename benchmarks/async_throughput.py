"""Simulator throughput of the asynchronous schedules, with and without lazy batching
(issue #11: "the simulator processes at least 2,000 client updates per second of real time
for the digits MLP on this 2-core machine").

The digits MLP (one hidden layer of 64), 100 clients with Dirichlet(0.5) label skew, local
SGD (lr 0.05, one epoch, batch 32), `[clock] speed_sigma = 1` (lognormal per-client
slowness). Three schedules: FedBuff (`buffer_size = 10`, `concurrency = 100`), FedAsync
(`alpha = 0.6`, polynomial staleness a = 0.5, `concurrency = 100`) and synchronous FedAvg
(10 clients per round, waiting for the slowest), each on `SequentialTransport` (one model,
client after client) and `BatchedTransport` (a cohort trained as one batched computation: one
`torch.bmm` per layer for this MLP), each asynchronous one with
lazy batching off (`lazy=False`: a dispatch trains at once, so each refill after an arrival
trains alone) and on (the default: pending tasks of one base version train together when
the first of them is about to arrive). Synchronous FedAvg has no lazy path (its cohort
already trains in one call); it is measured once per transport.

The figure is client updates delivered per second of real time over the whole
`Server.run` (dispatch, training, aggregation, records, and one central evaluation at the
end), median of `--repeat` runs (lazy off and on alternating), one torch thread. Each
configuration also checks that lazy and eager give the same final model (`torch.equal`;
the largest absolute difference is recorded).

Run: .venv/bin/python benchmarks/async_throughput.py [--updates 2000] [--repeat 3]
Writes benchmarks/results/async_throughput.json; docs/benchmarks.md is regenerated from it by
benchmarks/report.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import torch
from common import machine, save

from fedmosaic.build import build_data, build_strategy, build_trainer
from fedmosaic.config import load_experiment
from fedmosaic.runtime import SequentialTransport
from fedmosaic.runtime.batched import BatchedTransport
from fedmosaic.runtime.server import Server

TASK = """
    [data]
    dataset = "digits"

    [partition]
    method = "dirichlet"
    clients = 100
    alpha = 0.5

    [model]
    kind = "mlp"
    hidden = [64]

    [train]
    lr = 0.05
    epochs = 1
    batch_size = 32

    [clock]
    speed_sigma = 1.0
"""

SCHEDULES: dict[str, tuple[str, int]] = {  # [strategy] table, client updates per server step
    "fedbuff": ('name = "fedavg"\nschedule = "fedbuff"\nbuffer_size = 10\nconcurrency = 100',
                10),
    "fedasync": ('name = "fedavg"\nschedule = "fedasync"\nalpha = 0.6\nconcurrency = 100\n'
                 'staleness = "polynomial"\nstaleness_a = 0.5', 1),
    "sync": ('name = "fedavg"\nclients_per_round = 10', 10),
}


def experiment_toml(schedule: str, updates: int, seed: int) -> str:
    table, per_step = SCHEDULES[schedule]
    steps = updates // per_step
    return (textwrap.dedent(f"""\
        name = "throughput-{schedule}"
        seed = {seed}
        rounds = {steps}
        eval_every = {steps}
    """) + textwrap.dedent(TASK) + "\n[strategy]\n" + table + "\n")


def run_one(schedule: str, transport: str, lazy: bool | None, updates: int, seed: int,
            tmp: Path) -> dict[str, Any]:
    path = tmp / f"{schedule}.toml"
    path.write_text(experiment_toml(schedule, updates, seed))
    exp = load_experiment(path)
    fed = build_data(exp)
    trainer = build_trainer(exp, fed)
    strategy = build_strategy(exp, fed)
    sched = strategy.schedule  # type: ignore[attr-defined]
    if lazy is not None:
        sched.lazy = lazy
    tp = (BatchedTransport(trainer, fed) if transport == "batched"
          else SequentialTransport(trainer, fed))
    server = Server(trainer=trainer, strategy=strategy, transport=tp, rounds=exp[""]["rounds"],
                    seed=seed, test_data=fed.test, eval_every=exp[""]["eval_every"],
                    schedule=sched)
    t0 = time.perf_counter()
    state = server.run()
    seconds = time.perf_counter() - t0
    total = sum(int(r["updates"]) for r in state.history)
    return {"seconds": seconds, "updates": total, "updates_per_s": total / seconds,
            "fits": getattr(sched, "fits", None), "sim_time": state.history[-1]["sim_time"],
            "test_accuracy": state.history[-1]["test_accuracy"], "weights": state.weights}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--updates", type=int, default=2000, help="client updates per run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()[0]  # other jobs on the machine when the measurement started
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for schedule in SCHEDULES:
            for transport in ("sequential", "batched"):
                modes: list[bool | None] = [None] if schedule == "sync" else [False, True]
                finals: dict[bool | None, torch.Tensor] = {}
                # Off and on alternate, so that load from other jobs drifting over the
                # measurement affects both alike.
                by_mode: dict[bool | None, list[dict[str, Any]]] = {m: [] for m in modes}
                for _ in range(args.repeat):
                    for lazy in modes:
                        by_mode[lazy].append(run_one(schedule, transport, lazy, args.updates,
                                                     args.seed, tmp))
                for lazy in modes:
                    runs = by_mode[lazy]
                    finals[lazy] = runs[0]["weights"]
                    rate = statistics.median(r["updates_per_s"] for r in runs)
                    row = {"schedule": schedule, "transport": transport,
                           "lazy": {None: "n/a", False: "off", True: "on"}[lazy],
                           "updates": runs[0]["updates"], "updates_per_s": rate,
                           "updates_per_s_all": [r["updates_per_s"] for r in runs],
                           "seconds_median": statistics.median(r["seconds"] for r in runs),
                           "fit_calls": runs[0]["fits"], "sim_time": runs[0]["sim_time"],
                           "test_accuracy": runs[0]["test_accuracy"]}
                    rows.append(row)
                    print(f"{schedule:9s} {transport:10s} lazy={row['lazy']:3s} "
                          f"{rate:8.0f} updates/s (fit calls {row['fit_calls']})", flush=True)
                if len(finals) == 2:
                    diff = float((finals[True] - finals[False]).abs().max())
                    rows[-1]["max_abs_diff_vs_eager"] = diff
                    rows[-1]["equal_to_eager"] = bool(torch.equal(finals[True], finals[False]))
    example = experiment_toml("fedbuff", args.updates, args.seed)
    save("async_throughput", {
        "command": "python benchmarks/async_throughput.py " + " ".join(sys.argv[1:]),
        "machine": {**machine(), "date": dt.datetime.now(dt.timezone.utc).isoformat(),
                    "load_average_1min": load,
                    # and when it ended: the 2 cores are shared, the figures move with the load
                    "load_average_1min_end": os.getloadavg()[0]},
        "updates": args.updates, "repeat": args.repeat, "seed": args.seed,
        "fedbuff_toml": example, "rows": rows,
    })


if __name__ == "__main__":
    main()
