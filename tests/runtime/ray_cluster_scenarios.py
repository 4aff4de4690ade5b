"""The two-node Ray cluster scenarios of tests/runtime/test_ray_cluster.py, run in a process
of their own inside a network namespace that has only loopback (so that every Ray node is on
127.0.0.1: Ray otherwise picks the host's own address). Writes what it observed as JSON.

Usage: python ray_cluster_scenarios.py WORKDIR OUT.json [SCENARIO ...]
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import ray
import torch
from ray.cluster_utils import Cluster

import fedmosaic as fm
from fedmosaic.data import IID, load_digits, partition
from fedmosaic.data.source import LazyFederation, LoaderSource
from fedmosaic.models import MLP
from fedmosaic.runtime.ray_transport import RayTransport, WorkersLostError

make_trainer = functools.partial(fm.TorchTrainer, functools.partial(MLP, 64, [64], 10),
                                 lr=0.05, epochs=1, batch_size=32)


def _cluster(workers: int) -> tuple[Cluster, list[Any]]:
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(workers)]
    cluster.wait_for_nodes()
    return cluster, nodes


def _task(root: Path, digits: Any) -> LoaderSource:
    """One .npz per client and a task module whose load_data records the process it ran in."""
    for c in digits.clients:
        np.savez(root / f"{c.client_id}.npz", x=c.train.x, y=c.train.y)
    np.savez(root / "test.npz", x=digits.test.x, y=digits.test.y)
    (root / "where_task.py").write_text(textwrap.dedent(f"""
        import os
        import numpy as np
        from fedmosaic.data import ArrayDataset

        def load_data(client_id):
            with open({str(root / "loads.log")!r}, "a") as fh:
                fh.write(f"{{os.getpid()}} {{client_id}}\\n")
            arrays = np.load({str(root)!r} + f"/{{client_id}}.npz")
            return ArrayDataset(arrays["x"], arrays["y"])

        def load_test():
            arrays = np.load({str(root / "test.npz")!r})
            return ArrayDataset(arrays["x"], arrays["y"])
    """))
    return LoaderSource("where_task:load_data", tuple(digits.client_ids), base_dir=str(root))


def attach(root: Path, digits: Any, out: dict[str, Any]) -> None:
    cluster, _ = _cluster(2)
    try:
        source = _task(root, digits)
        os.environ["RAY_ADDRESS"] = cluster.address  # what ray job submit sets
        with RayTransport(make_trainer, source=source, num_workers="auto") as transport:
            out["alive_nodes"] = len([n for n in ray.nodes() if n["Alive"]])
            out["num_workers"] = transport.num_workers
            out["address_used"] = transport.address == cluster.address
            driver = LazyFederation(source, test=digits.test)
            got = fm.simulate(make_trainer(), driver, fm.FedAvg(clients_per_round=8), rounds=2,
                              seed=0, transport=transport)
            where = transport.where()
            try:
                RayTransport(make_trainer, digits, num_workers="auto", cpus_per_worker=4)
            except RuntimeError as exc:
                out["refusal"] = str(exc)
        del os.environ["RAY_ADDRESS"]
        want = fm.simulate(make_trainer(), digits, fm.FedAvg(clients_per_round=8), rounds=2,
                           seed=0, transport="sequential")
        out["max_weight_diff"] = float((got.weights - want.weights).abs().max())
        out["updates"] = [r["updates"] for r in got.history]
        out["worker_nodes"] = len({w["node_id"] for w in where})
        out["worker_pids"] = sorted(w["pid"] for w in where)
        out["worker_loads"] = [w["loaded"] for w in where]
        out["driver_pid"] = os.getpid()
        out["driver_loaded"] = dict(driver.loaded)
        log = root / "loads.log"
        out["loads"] = [line.split() for line in log.read_text().splitlines()] \
            if log.exists() else []
    finally:
        ray.shutdown()
        cluster.shutdown()


def loss(root: Path, digits: Any, out: dict[str, Any]) -> None:
    cluster, nodes = _cluster(2)
    try:
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        source = LoaderSource("where_task:load_data", tuple(digits.client_ids),
                              base_dir=str(root))
        transport = RayTransport(make_trainer, source=source, num_workers=2, start_timeout_s=8)

        def lose_a_node(record: dict[str, Any]) -> None:
            if record["round"] == 1:
                cluster.remove_node(nodes[1], allow_graceful=False)

        t0 = time.monotonic()
        res = fm.simulate(make_trainer(), LazyFederation(source, test=digits.test),
                          fm.FedAvg(clients_per_round=8), rounds=3, seed=0,
                          transport=transport, callbacks=[lose_a_node])
        out["one_lost_updates"] = [r["updates"] for r in res.history]
        out["one_lost_failures"] = [r["failures"] for r in res.history]
        out["one_lost_seconds"] = time.monotonic() - t0
        out["actors_after"] = len(transport.actors)
        cluster.remove_node(nodes[0], allow_graceful=False)
        t1 = time.monotonic()
        try:
            fm.simulate(make_trainer(), SimpleNamespace(test=digits.test),
                        fm.FedAvg(clients_per_round=8), rounds=3, seed=0, transport=transport)
            out["all_lost"] = "no error"
        except WorkersLostError as exc:
            out["all_lost"] = f"WorkersLostError: {exc}"
        except Exception as exc:  # anything else is a finding too
            out["all_lost"] = f"{type(exc).__name__}: {exc}"
        out["all_lost_seconds"] = time.monotonic() - t1
        transport.close()
    finally:
        ray.shutdown()
        cluster.shutdown()


EXPERIMENT = """\
name = "cluster-cli"
rounds = {rounds}
seed = 0
threads = 1
[strategy]
clients_per_round = 8
[model]
kind = "mlp"
hidden = [64]
[train]
lr = 0.05
batch_size = 32
[runtime]
transport = "ray"
workers = 2
start_timeout_s = 8
[data]
dataset = "custom"
loader = "where_task:load_data"
test_loader = "where_task:load_test"
num_classes = 10
clients = {clients}
"""


def _checkpointed(out: Path) -> int:
    from fedmosaic.runtime.checkpoint import load_checkpoint

    try:
        return int(load_checkpoint(out)["round"])
    except Exception:  # not written yet
        return 0


def cli(root: Path, digits: Any, out: dict[str, Any]) -> None:
    """RAY_ADDRESS and `fedmosaic run` (no address in the file); the run interrupted, a node
    lost, then `fedmosaic resume` on the one node left."""
    cluster, nodes = _cluster(2)
    try:
        _task(root, digits)
        rounds = 60
        exp = root / "exp.toml"
        exp.write_text(EXPERIMENT.format(rounds=rounds, clients=json.dumps(digits.client_ids)))
        run_dir = root / "run"
        env = {**os.environ, "RAY_ADDRESS": cluster.address}
        cmd = [sys.executable, "-m", "fedmosaic"]
        lines = []
        with subprocess.Popen([*cmd, "run", str(exp), "-o", str(run_dir)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:  # the CLI prints a line per round as it ends
                lines.append(line)
                if line.startswith("round 3/"):
                    proc.send_signal(signal.SIGINT)
                    break
            stdout, stderr = proc.communicate(timeout=60)
        out["run_pid"], out["run_rc"] = proc.pid, proc.returncode
        out["run_stdout"] = "".join(lines) + stdout[-3000:]
        out["run_stderr"] = stderr[-3000:]
        out["interrupted_after"] = _checkpointed(run_dir)
        cluster.remove_node(nodes[1], allow_graceful=False)
        t0 = time.monotonic()
        with subprocess.Popen([*cmd, "resume", str(run_dir)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            stdout, stderr = proc.communicate(timeout=300)
        out["resume_seconds"] = time.monotonic() - t0
        out["resume_pid"], out["resume_rc"] = proc.pid, proc.returncode
        out["resume_stdout"], out["resume_stderr"] = stdout[-3000:], stderr[-3000:]
        metrics = run_dir / "metrics.json"
        history = json.loads(metrics.read_text()) if metrics.exists() else []
        out["rounds"] = [r["round"] for r in history]
        out["updates"] = sorted({r["updates"] for r in history})
        record = run_dir / "guarantees.json"
        out["transport"] = json.loads(record.read_text())["transport"] if record.exists() \
            else None
        log = root / "loads.log"
        out["load_pids"] = sorted({int(line.split()[0]) for line in
                                   log.read_text().splitlines()}) if log.exists() else []
    finally:
        cluster.shutdown()


def main() -> None:
    root, dest = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    train, test = load_digits()
    digits = partition(train, IID(), 12, seed=0, test=test, name="digits")
    out: dict[str, Any] = {}
    only = sys.argv[3:]  # scenario names, to run some of them (debugging)
    for name, scenario in (("attach", attach), ("loss", loss), ("cli", cli)):
        if only and name not in only:
            continue
        part: dict[str, Any] = {}
        try:
            scenario(root, digits, part)
        except Exception:
            part["error"] = traceback.format_exc()
        out[name] = part
        dest.write_text(json.dumps(out))


if __name__ == "__main__":
    main()
