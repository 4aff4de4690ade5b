"""FedBuff vs synchronous FedAvg vs FedAsync under a virtual clock (issue #11, first version).

Each task gets the same federation, model, local training, seed and clock (`[clock]
speed_sigma = 1`: lognormal per-client slowness, compute time proportional to the samples a
client trains on, `compute_median` seconds per sample for the median client), and three
schedules (`[strategy] schedule`):

- sync: synchronous FedAvg, `clients_per_round = 10`; each round waits for its slowest client;
- fedbuff: FedBuff (Nguyen et al. 2022), `buffer_size = 10`, `concurrency = 100`, staleness
  weight 1/sqrt(1 + s), the same server optimizer as sync (plain FedAvg, server lr 1);
- fedasync: FedAsync (Xie et al. 2019), `alpha` and polynomial staleness (a = 0.5) as in its
  paper, `concurrency = 100`.

Runs are capped in client updates (defaults per task and schedule in `CAPS`; `--caps
sync=N,fedbuff=N,fedasync=N` replaces them): sync and FedBuff take `cap / 10` server steps,
FedAsync `cap`. The asynchronous schedules make far more updates per simulated second (with
concurrency 100 every client is always training, and the fast ones report over and over).
The global model is evaluated on the central test set every 10 client updates (every step for
sync and FedBuff, every 10th for FedAsync). For each schedule the script reports the simulated time
and the number of client updates at the first evaluation reaching a target accuracy, for three
targets: the task's fixed target (`--target`, a level sync reaches early in its run), the
common target (the largest multiple of 0.01 at or below 0.95 x the lowest of the three best
accuracies: a level all three reach within their caps) and the FedBuff-sync target (the same
rule over sync and FedBuff only), and the speed-up of FedBuff over sync in simulated time at
each.

Run: .venv/bin/python benchmarks/async_schedules.py [--tasks synthetic,fmnist]
     [--caps sync=N,fedbuff=N,fedasync=N]
Writes benchmarks/results/async_schedules.json; docs/benchmarks.md is regenerated from it by
benchmarks/report.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import torch
from common import machine, save

from fedmosaic.build import build_data, build_strategy, build_trainer, simulate_experiment
from fedmosaic.config import load_experiment

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")

#: The experiment shared by the three schedules of a task, without [strategy].
TASKS: dict[str, str] = {
    # FedProx's synthetic(0.5, 0.5) with 100 devices and its multinomial logistic regression.
    "synthetic": """
        [data]
        dataset = "synthetic"
        alpha = 0.5
        beta = 0.5
        num_devices = 100

        [model]
        kind = "logreg"

        [train]
        lr = 0.05
        epochs = 1
        batch_size = 10
    """,
    # Fashion-MNIST, 100 clients with Dirichlet(0.5) label skew, an MLP (one hidden layer).
    "fmnist": """
        [data]
        dataset = "fashion_mnist"

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
    """,
}

SCHEDULES: dict[str, str] = {
    "sync": 'name = "fedavg"\nclients_per_round = 10',
    "fedbuff": 'name = "fedavg"\nschedule = "fedbuff"\nbuffer_size = 10\nconcurrency = 100',
    "fedasync": ('name = "fedavg"\nschedule = "fedasync"\nalpha = 0.6\nconcurrency = 100\n'
                 'staleness = "polynomial"\nstaleness_a = 0.5'),
}

CLOCK = """
    [clock]
    speed_sigma = 1.0
    compute_median = 0.005
"""


#: The fixed target accuracy per task (a level synchronous FedAvg reaches early on).
TARGETS = {"synthetic": 0.5, "fmnist": 0.7}

#: Default caps in client updates per task and schedule. They keep every run within about two
#: and a half minutes on the 2-core machine (Fashion-MNIST's MLP trains about 70 client updates
#: per real second, the synthetic task's logistic regression about 300); FedBuff on the
#: synthetic task gets the most, as it is still improving at 15,000.
CAPS = {"synthetic": {"sync": 1000, "fedbuff": 60000, "fedasync": 15000},
        "fmnist": {"sync": 500, "fedbuff": 3000, "fedasync": 3000}}


def experiment_toml(task: str, schedule: str, updates: int, seed: int) -> str:
    per_step = 1 if schedule == "fedasync" else 10
    steps = updates // per_step
    head = textwrap.dedent(f"""\
        name = "{task}-{schedule}"
        seed = {seed}
        rounds = {steps}
        eval_every = {10 // per_step}
    """)
    return (head + textwrap.dedent(TASKS[task]) + "\n[strategy]\n" + SCHEDULES[schedule] + "\n"
            + textwrap.dedent(CLOCK))


def run_one(task: str, schedule: str, updates: int, seed: int, tmp: Path) -> dict[str, Any]:
    path = tmp / f"{task}-{schedule}.toml"
    path.write_text(experiment_toml(task, schedule, updates, seed))
    exp = load_experiment(path)
    torch.set_num_threads(1)
    fed = build_data(exp)
    trainer = build_trainer(exp, fed)
    strategy = build_strategy(exp, fed)
    t0 = time.perf_counter()  # includes building the sequential transport (microseconds)
    result = simulate_experiment(exp, fed, trainer, strategy)
    seconds = time.perf_counter() - t0
    total = 0
    curve = []
    for rec in result.history:
        total += int(rec["updates"])
        if "test_accuracy" in rec:
            curve.append({"step": rec["round"], "updates": total, "sim_time": rec["sim_time"],
                          "test_accuracy": rec["test_accuracy"]})
    stale = [r["staleness_mean"] for r in result.history if "staleness_mean" in r]
    return {"toml": path.read_text(), "clients": len(fed.clients), "steps": len(result.history),
            "updates": total, "sim_time": result.history[-1]["sim_time"],
            "real_seconds": seconds, "updates_per_real_second": total / seconds,
            "best_accuracy": max(c["test_accuracy"] for c in curve),
            "final_accuracy": curve[-1]["test_accuracy"],
            "mean_staleness": sum(stale) / len(stale) if stale else 0.0,
            "max_staleness": max((r["staleness_max"] for r in result.history
                                  if "staleness_max" in r), default=0),
            "curve": curve}


def thin(curve: list[dict[str, Any]], points: int = 200) -> list[dict[str, Any]]:
    """At most about ``points`` evaluations, evenly spaced, the last kept (for the stored
    results; the times to target are computed from every evaluation)."""
    every = max(1, math.ceil(len(curve) / points))
    kept = curve[::every]
    return kept if kept[-1] is curve[-1] else [*kept, curve[-1]]


def reach(curve: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first evaluation at or above ``target`` (None if never)."""
    return next((c for c in curve if c["test_accuracy"] >= target), None)


def common_target(runs: dict[str, dict[str, Any]], names: tuple[str, ...] = tuple(SCHEDULES)
                  ) -> float:
    """A level every named run reaches, not only at a lucky peak."""
    return math.floor(0.95 * min(runs[n]["best_accuracy"] for n in names) * 100) / 100


def summarise(runs: dict[str, dict[str, Any]], target: float) -> dict[str, Any]:
    hits = {name: reach(r["curve"], target) for name, r in runs.items()}
    out: dict[str, Any] = {"target_accuracy": target, "to_target": hits}
    sync, buff, asyn = hits.get("sync"), hits.get("fedbuff"), hits.get("fedasync")
    if sync and buff:
        out["speedup_fedbuff_vs_sync_sim_time"] = sync["sim_time"] / buff["sim_time"]
        out["update_ratio_fedbuff_vs_sync"] = buff["updates"] / sync["updates"]
    if asyn and buff:
        out["speedup_fedbuff_vs_fedasync_sim_time"] = asyn["sim_time"] / buff["sim_time"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="synthetic,fmnist")
    parser.add_argument("--caps", default="",
                        help="client updates per run, e.g. sync=1000,fedbuff=20000 (multiples "
                        "of 10; default per task, " + str(CAPS) + ")")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=None,
                        help="fixed target accuracy (default: per task, " + str(TARGETS) + ")")
    args = parser.parse_args()
    given: dict[str, int] = {}
    for item in filter(None, args.caps.split(",")):
        name, _, value = item.partition("=")
        if name not in SCHEDULES or not value.isdigit() or int(value) % 10 or not int(value):
            parser.error(f"--caps: {item!r} is not SCHEDULE=N with SCHEDULE one of "
                         f"{', '.join(SCHEDULES)} and N a positive multiple of 10")
        given[name] = int(value)
    load1 = os.getloadavg()[0]
    tasks: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            if task == "fmnist" and not FMNIST_ROOT.is_dir():
                skipped[task] = f"{FMNIST_ROOT} not found"
                print(f"skipping {task}: {skipped[task]}", flush=True)
                continue
            runs = {}
            for schedule in SCHEDULES:
                caps = {**CAPS[task], **given}
                r = run_one(task, schedule, caps[schedule], args.seed, Path(tmp))
                print(f"{task} {schedule}: {r['steps']} steps, {r['updates']} updates, "
                      f"sim {r['sim_time']:.0f}s, best acc {r['best_accuracy']:.4f}, "
                      f"real {r['real_seconds']:.1f}s "
                      f"({r['updates_per_real_second']:.0f} updates/s)", flush=True)
                runs[schedule] = r
            fixed = args.target if args.target is not None else TARGETS[task]
            tasks[task] = {"runs": runs, "caps": caps, "fixed": summarise(runs, fixed),
                           "common": summarise(runs, common_target(runs)),
                           "fedbuff_sync": summarise(runs, common_target(runs,
                                                                         ("sync", "fedbuff")))}
            for r in runs.values():
                r["curve"] = thin(r["curve"])
            print(task, {k: v for k, v in tasks[task].items() if k != "runs"}, flush=True)
    info = machine()
    info["date"] = dt.datetime.now(dt.timezone.utc).isoformat()
    info["load_average_1min"] = load1
    command = "python benchmarks/async_schedules.py " + " ".join(sys.argv[1:])
    path = save("async_schedules", {"command": command.strip(), "machine": info,
                                    "seed": args.seed,
                                    "tasks": tasks, "skipped": skipped})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
