"""Scale of the Ray transport (issue #21): 10,000 and 100,000 clients, 1,000 per round.

Configurations, each in a fresh process (so that memory figures are its own):

* ``sequential`` / ``batched``: one process holds the whole federation (every client
  generated into a ``FederatedDataset``) and trains with ``SequentialTransport`` /
  ``BatchedTransport`` on all cores (2 torch threads here);
* ``ray`` / ``ray-batched``: a two-node local Ray cluster (``ray.cluster_utils.Cluster``: a
  head without CPUs and two nodes of one CPU each), one worker per node; the workers load
  each client from a source (``benchmarks/scale_task.py:load_data``, generated from the id:
  no files) where it trains, training one client after another or as batched cohorts;
* ``ray-memory``: the same cluster fed the whole ``FederatedDataset`` through the object
  store (what every Ray run did before issue #21), for contrast.

Recorded per configuration and population: build time (data and transport, up to the first
round; then the machine is left to go quiet, since Ray's agents work for some seconds after
a node starts), the first round and the median of the later rounds, the driver's resident memory
(now and peak), each worker's, the object store's use, the clients loaded per worker and the
time spent loading, and the final weights' distance from ``sequential``'s (the same seed:
float rounding only). The Ray runs execute in a network namespace that has only loopback
(like tests/runtime/test_ray_cluster.py), so every node is on 127.0.0.1.

Run: .venv/bin/python benchmarks/ray_scale.py   (as root; about 5 minutes on 2 cores)
     [--populations 10000 100000] [--cohort 1000] [--rounds 8] [--configs ...]
Writes benchmarks/results/ray_scale.json; benchmarks/report.py puts it in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CONFIGS = ("sequential", "batched", "ray", "ray-batched", "ray-memory")


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _trainer_factory() -> Any:
    import fedmosaic as fm
    from fedmosaic.models import MLP

    return functools.partial(fm.TorchTrainer, functools.partial(MLP, 60, [32], 10), lr=0.05,
                             epochs=1, batch_size=32)


def _object_store_mib() -> float | None:
    from ray._private.internal_api import memory_summary

    found = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
    return float(found.group(1)) if found else None


def one(config: str, population: int, cohort: int, rounds: int, weights_out: Path) -> dict:
    """One configuration at one population, in this process."""
    import scale_task
    import torch
    from common import peak_rss_mb

    import fedmosaic as fm
    from fedmosaic.data import ClientData, FederatedDataset

    ids = scale_task.client_ids(population)
    test = scale_task.load_test()
    make_trainer = _trainer_factory()
    strategy = fm.FedAvg(clients_per_round=cohort)
    out: dict[str, Any] = {"config": config, "population": population, "cohort": cohort,
                           "rounds": rounds}
    t0 = time.perf_counter()
    cluster = transport = None
    try:
        if config in ("sequential", "batched"):
            torch.set_num_threads(2)
            fed = FederatedDataset("scale", [ClientData(c, scale_task.load_data(c), None)
                                             for c in ids], test, 10, (60,))
            trainer = make_trainer()
            transport = fm.SequentialTransport(trainer, fed) if config == "sequential" else \
                fm.BatchedTransport(trainer, fed)
            data: Any = fed
        else:
            import ray
            from ray.cluster_utils import Cluster

            from fedmosaic.data.source import LazyFederation, LoaderSource
            from fedmosaic.runtime.ray_transport import RayTransport

            torch.set_num_threads(1)
            cluster = Cluster(initialize_head=True,
                              head_node_args={"num_cpus": 0, "include_dashboard": False})
            for _ in range(2):
                cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, logging_level=logging.WARNING,
                     log_to_driver=False, configure_logging=False)
            t0 = time.perf_counter()  # the cluster's start is not the transport's
            inner = "batched" if config == "ray-batched" else "sequential"
            if config == "ray-memory":
                data = FederatedDataset("scale", [ClientData(c, scale_task.load_data(c), None)
                                                  for c in ids], test, 10, (60,))
                transport = RayTransport(make_trainer, data, num_workers=2)
            else:
                source = LoaderSource("scale_task:load_data", tuple(ids), base_dir=str(HERE))
                transport = RayTransport(make_trainer, source=source, num_workers=2,
                                         inner=inner)
                data = LazyFederation(source, test=test)
            trainer = make_trainer()
        out["build_s"] = time.perf_counter() - t0
        out["idle_wait_s"] = _wait_idle()
        cpu0 = time.process_time()
        before = transport.where() if config.startswith("ray") else []
        result = fm.simulate(trainer, data, strategy, rounds=rounds, seed=0,
                             transport=transport, eval_every=rounds)
        out["driver_cpu_s"] = time.process_time() - cpu0
        walls = [r["wall_time"] for r in result.history]
        out["first_round_s"] = walls[0]
        out["median_round_s"] = statistics.median(walls[1:])
        out["round_s"] = walls
        out["updates"] = [r["updates"] for r in result.history]
        out["test_accuracy"] = result.history[-1].get("test_accuracy")
        out["driver_rss_mb"] = _rss_mb()
        out["driver_peak_rss_mb"] = peak_rss_mb()
        if config.startswith("ray"):
            where = transport.where()
            out["nodes"] = len({w["node_id"] for w in where})
            out["worker_rss_mb"] = [w["rss_bytes"] / 2**20 for w in where]
            out["worker_loads"] = [sum(w["loaded"].values()) for w in where]
            out["worker_load_s"] = [w["load_seconds"] for w in where]
            out["worker_cpu_s"] = [w["cpu_seconds"] - b["cpu_seconds"]
                                   for w, b in zip(where, before, strict=True)]
            out["worker_cached_mb"] = [w["cached_bytes"] / 2**20 for w in where]
            out["training"] = sorted({w["training"] for w in where})
            out["object_store_mib"] = _object_store_mib()
            if config != "ray-memory":
                out["driver_loaded"] = len(data.loaded)
        elif config == "batched":
            out["training"] = [transport.decision]
        torch.save(result.weights, weights_out)
    finally:
        if transport is not None and hasattr(transport, "close"):
            transport.close()
        if cluster is not None:
            import ray

            ray.shutdown()
            cluster.shutdown()
    return out


def _cpu_busy(interval: float = 0.5) -> float:
    """The machine's busy CPU fraction over ``interval`` seconds (/proc/stat)."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    t0, i0 = sample()
    time.sleep(interval)
    t1, i1 = sample()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def _wait_idle(limit_s: float = 60.0) -> float:
    """Wait until the machine is quiet (Ray's agents start up for some seconds after a node
    starts and would be timed with the first rounds); the seconds waited."""
    t0 = time.perf_counter()
    quiet = 0
    while quiet < 3 and time.perf_counter() - t0 < limit_s:
        quiet = quiet + 1 if _cpu_busy() < 0.1 else 0
    return time.perf_counter() - t0


def _in_namespace(argv: list[str]) -> int:
    """Run this script again inside a loopback-only network namespace (root only)."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        sys.exit("ray_scale.py needs root, unshare and ip: Ray's nodes must stay on loopback")
    cmd = " ".join([sys.executable, str(Path(__file__).resolve()), "--inside", *argv])
    return subprocess.call(["unshare", "--net", "sh", "-c", f"ip link set lo up && exec {cmd}"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--populations", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--cohort", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # CONFIG POPULATION WEIGHTS
    args = ap.parse_args()
    if args.one:
        config, population, weights = args.one
        print(json.dumps(one(config, int(population), args.cohort, args.rounds, Path(weights))))
        return
    if not args.inside:
        sys.exit(_in_namespace(sys.argv[1:]))
    import torch
    from common import machine, save

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for population in args.populations:
            for config in args.configs:
                weights = Path(tmp) / f"{config}-{population}.pt"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--one", config,
                       str(population), str(weights), "--cohort", str(args.cohort),
                       "--rounds", str(args.rounds)]
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
                if proc.returncode != 0:
                    print(f"{config} at {population}: failed\n{proc.stderr[-3000:]}")
                    rows.append({"config": config, "population": population,
                                 "error": proc.stderr.strip().splitlines()[-1:]})
                    continue
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                base = Path(tmp) / f"sequential-{population}.pt"
                if base.exists() and config != "sequential":
                    diff = (torch.load(weights) - torch.load(base)).abs().max()
                    row["max_weight_diff_vs_sequential"] = float(diff)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "round_s"}), flush=True)
    meta = machine()
    meta["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    import ray

    meta["ray"] = ray.__version__
    save("ray_scale", {"machine": meta, "command": "python benchmarks/ray_scale.py " +
                       " ".join(a for a in sys.argv[1:] if a != "--inside"), "rows": rows})


def markdown(d: dict[str, Any]) -> str:
    """The docs/benchmarks.md section (benchmarks/report.py)."""
    from report import machine_line

    m = d["machine"]
    by = {(r["config"], r["population"]): r for r in d["rows"]}
    pops = sorted({r["population"] for r in d["rows"]})
    cohort = d["rows"][0].get("cohort", 1000)
    lines = ["## Ray at scale: 10,000 and 100,000 clients (issue #21)", "",
             f"Command: `{d['command']}`", "",
             machine_line(m)[:-1] + f", Ray {m.get('ray', '?')}.", "",
             f"FedAvg, {cohort:,} clients per round, an MLP 60-32-10 (2,282 parameters), "
             "clients of 6-14 samples generated from their ids (`benchmarks/scale_task.py`). "
             "`sequential` and `batched` hold the whole federation in one process on both "
             "cores; the `ray` rows run on a two-node local cluster (one CPU, one worker per "
             "node; the same two cores), their workers loading each client where it trains; "
             "`ray-memory` ships the whole federation through the object store instead. Build: "
             "data and transport up to the first round (the cluster's own start excluded). "
             "Rounds: the first, then the median of the rest (each round samples new clients, "
             "so a source-fed worker loads most of its share every round).", "",
             "| clients | config | build s | round 1 s | round s | driver RSS MB (peak) | "
             "worker RSS MB | object store MiB | loads per worker | weights vs sequential |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for pop in pops:
        for config in CONFIGS:
            r = by.get((config, pop))
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {pop:,} | {config} | failed: {r['error']} | | | | | | | |")
                continue
            workers = " / ".join(f"{x:.0f}" for x in r.get("worker_rss_mb", [])) or "-"
            store = f"{r['object_store_mib']:.0f}" if r.get("object_store_mib") is not None \
                else "-"
            loads = " / ".join(str(x) for x in r.get("worker_loads", [])) or "-"
            diff = r.get("max_weight_diff_vs_sequential")
            lines.append(
                f"| {pop:,} | {config} | {r['build_s']:.1f} | {r['first_round_s']:.2f} | "
                f"{r['median_round_s']:.2f} | {r['driver_rss_mb']:.0f} "
                f"({r['driver_peak_rss_mb']:.0f}) | {workers} | {store} | {loads} | "
                f"{'-' if diff is None else f'{diff:.1e}'} |")
    lines.append("")
    lines += _findings(by, pops)
    lines += _capacity(by, pops, cohort)
    return "\n".join(lines) + "\n"


def _capacity(by: dict[tuple[str, int], Any], pops: list[int], cohort: int) -> list[str]:
    """A capacity model from the measured per-client costs (the largest population's rows),
    projected to 1,000,000 clients and 10,000 per round."""
    hi, lo = pops[-1], pops[0]
    rb, rs = by.get(("ray-batched", hi)), by.get(("ray", hi))
    if not rb or not rs or "error" in rb or "error" in rs or lo == hi:
        return []
    trained = rb["rounds"] * cohort

    def per_client_ms(r: dict[str, Any], key: str) -> float:
        return sum(r[key]) / trained * 1e3

    w_bat, w_seq = per_client_ms(rb, "worker_cpu_s"), per_client_ms(rs, "worker_cpu_s")
    load = per_client_ms(rb, "worker_load_s")
    drv = rb["driver_cpu_s"] / trained * 1e3
    lo_row = by[("ray-batched", lo)]
    grow_drv = (rb["driver_rss_mb"] - lo_row["driver_rss_mb"]) / (hi - lo) * 2**20 / 1e3
    grow_wrk = max(b - a for a, b in zip(lo_row["worker_rss_mb"], rb["worker_rss_mb"],
                                         strict=False)) / (hi - lo) * 2**20 / 1e3
    c = 10_000
    lines = ["", "### Capacity model", "",
             f"Measured per-client costs ({hi:,} clients, `ray-batched` and `ray` rows): a "
             f"worker spends {w_bat:.3f} ms of CPU per client it trains batched (of which "
             f"{load:.3f} ms loading it), {w_seq:.3f} ms training one client after another; "
             f"the driver spends {drv:.3f} ms per client in the cohort (sampling, per-client "
             "seeds, dispatch, partial sums; its central evaluation once per run). Memory "
             f"grows by about {grow_drv:.2f} KB per client of the population in the driver "
             f"and {grow_wrk:.2f} KB in each worker (the client ids and their index), and "
             "with the clients a worker trains (its cache, bounded by `cache_bytes`).", "",
             f"A round of C clients on W workers takes about C x {drv:.3f} ms (the driver, "
             "serial) + C x w / W (the workers, in parallel), w the worker's per-client cost "
             "above. Projected for 1,000,000 clients, 10,000 per round, nodes of 16 cores "
             "(one worker per core):", "",
             "| nodes | workers | batched s/round | one-by-one s/round | with GPUs s/round "
             "(lower bound) |",
             "|---:|---:|---:|---:|---:|"]
    for nodes in (1, 4, 16, 64):
        workers = 16 * nodes
        base = c * drv / 1e3
        lines.append(f"| {nodes} | {workers} | {base + c * w_bat / workers / 1e3:.2f} | "
                     f"{base + c * w_seq / workers / 1e3:.2f} | "
                     f"{base + c * load / workers / 1e3:.2f} |")
    lines += ["",
              "The GPU column is a bound, not a measurement (no GPU in this session): it takes "
              "training as free and keeps the loading and the driver. Where it stops "
              f"scaling: the driver. Its {c * drv / 1e3:.2f} s per 10,000-client round is "
              "serial, so past about w / "
              f"{drv:.3f} ms workers ({w_bat / drv:.0f} batched, {w_seq / drv:.0f} one by one "
              "for this small model) more nodes do not shorten a round; a model whose "
              "clients take longer to train (a CNN: tens of ms each) scales to proportionally "
              f"more workers. Memory at 1,000,000 clients: about "
              f"{grow_drv * 1e6 / 1024:.0f} MB more in the driver and "
              f"{grow_wrk * 1e6 / 1024:.0f} MB more in each worker than at a handful of "
              "clients: the client ids and their index, nothing else there grows with the "
              "population (projected linearly from 10,000 and 100,000, not measured).", ""]
    return lines


def _findings(by: dict[tuple[str, int], Any], pops: list[int]) -> list[str]:
    """The acceptance figures, computed from the rows."""
    out = []
    lo, hi = (pops[0], pops[-1]) if len(pops) > 1 else (None, None)
    for config in ("ray", "ray-batched"):
        a, b = by.get((config, lo)), by.get((config, hi))
        if a and b and "error" not in a and "error" not in b:
            growth = max(y / x for x, y in zip(a["worker_rss_mb"], b["worker_rss_mb"],
                                               strict=False))
            out.append(f"- `{config}`: per-worker RSS at {hi:,} clients is {growth:.2f}x that at "
                       f"{lo:,} (largest of the two workers); the driver loaded "
                       f"{b.get('driver_loaded', '?')} clients.")
    for pop in pops:
        rb, bb = by.get(("ray-batched", pop)), by.get(("batched", pop))
        if rb and bb and "error" not in rb and "error" not in bb:
            out.append(f"- {pop:,} clients: a `ray-batched` round takes "
                       f"{rb['median_round_s'] / bb['median_round_s']:.2f}x the single-process "
                       f"`batched` round ({rb['median_round_s']:.2f} s vs "
                       f"{bb['median_round_s']:.2f} s; the goal is within 2x).")
    return out


if __name__ == "__main__":
    main()
