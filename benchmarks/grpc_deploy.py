"""The deployed gRPC runtime on loopback (issue #5): round overhead and peak server memory.

Run with the project's venv (each part merges its results into the same JSON file):

    .venv/bin/python benchmarks/grpc_deploy.py --part overhead   # 10 and 100 clients, digits
    .venv/bin/python benchmarks/grpc_deploy.py --part memory     # 100M parameters, 1-10 clients
    .venv/bin/python benchmarks/grpc_deploy.py --part overhead --clients 4 --rounds 2  # smoke

What runs, for every configuration: a fresh federation (``create_federation``: CA, server and
one certificate per client) in a temporary directory; the server in its own process
(``--role server``: ``start_server`` with mutual TLS and the default ``DeploySettings`` apart
from a loopback address, an ephemeral port and ``min_clients`` = N, then the unchanged server
loop, ``fedmosaic.runtime.Server``, over ``GrpcTransport``, all N clients in every round, no
central evaluation); and the N clients as threads spread over ``--client-procs`` client
processes (``--role clients``), each thread with its own mutual-TLS channel and certificate
and its own ``FederationClient`` loop. Rounds start once all N clients have joined.

Overhead part (digits, the MLP of the tests, 1 local epoch): each client's trainer records
when every ``fit`` began and ended (``time.monotonic``, CLOCK_MONOTONIC, which all processes
of the machine share); fits in one client process take turns (one lock per process: torch's
global RNG is per process, and two cores gain nothing from more concurrent fits). For each
round the server records its wall time (``Server.run_round``: selection, dispatch, downloads,
training, uploads, validation, aggregation). *Training* is the part of that window during
which at least one client was inside ``fit`` (the union of the fit intervals); *overhead* =
round time - training, i.e. the wall time during which no client was training.

Memory part (a flat model of ``--mem-params`` float32 values, 400 MB at 100M, with
``PerturbationTrainer``, whose fit adds seeded noise instead of training, so that no data is
needed and client time is small): the driver samples the server process's RSS every 20 ms with
psutil, and the server reports its own peak (``ru_maxrss``, the kernel's exact high-water
mark) and its RSS once listening with the model built, before any client joined. Client
counts that would not fit in the available memory (estimated as 3 model copies per client
plus 6 for the server) are skipped with a note.

Results: benchmarks/results/grpc_deploy.json (``overhead`` and ``memory`` keys, each with its
command, the machine and the raw per-round figures).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from common import machine  # noqa: E402  (the directory must be on sys.path first)

from fedmosaic.core.params import ParamSpec  # noqa: E402
from fedmosaic.train.base import (  # noqa: E402
    Dataset,
    FitConfig,
    FitResult,
    Trainer,
    TrainerWrapper,
)

RESULTS_JSON = HERE / "results" / "grpc_deploy.json"
SAMPLE_S = 0.02
START_TIMEOUT_S = 300.0
PERTURBATION_SCALE = 1e-3
SETTINGS_RECORDED = ("chunk_bytes", "upload_slots", "max_workers", "heartbeat_interval",
                     "round_deadline")


# --------------------------------------------------------------------------- trainers


class PerturbationTrainer:
    """A ``Trainer`` for one flat float32 parameter tensor of ``numel`` values whose ``fit``
    adds seeded Gaussian noise (scale ``PERTURBATION_SCALE``) instead of training: the server
    sees a full-size, distinct, finite update from every client at the cost of one random
    draw, so that memory, not compute, is measured."""

    def __init__(self, numel: int) -> None:
        if numel < 1:
            raise ValueError(f"numel must be >= 1, got {numel}")
        self.numel = numel
        # A meta tensor describes the layout without allocating it.
        self._spec = ParamSpec.from_state_dict({"weight": torch.empty(numel, device="meta")})

    @property
    def spec(self) -> ParamSpec:
        return self._spec

    def initial_weights(self, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(self.numel, generator=gen).mul_(0.01)

    def full_steps(self, num_samples: int, config: FitConfig) -> int:
        return 1

    def fit(self, weights: torch.Tensor, data: Dataset, config: FitConfig) -> FitResult:
        self._spec.check_vector(weights)
        gen = torch.Generator().manual_seed(config.seed)
        out = torch.randn(self.numel, generator=gen).mul_(PERTURBATION_SCALE).add_(weights)
        return FitResult(weights=out, num_samples=len(data), steps=1)

    def evaluate(self, weights: torch.Tensor, data: Dataset) -> dict[str, float]:
        self._spec.check_vector(weights)
        return {"l2_norm": float(weights.norm()), "num_samples": float(len(data))}


class TimedTrainer(TrainerWrapper):
    """Wraps a trainer: records each fit's (round, start, end) in ``time.monotonic`` seconds;
    fits sharing ``lock`` take turns."""

    def __init__(self, inner: Trainer, lock: threading.Lock) -> None:
        super().__init__(inner)
        self.lock = lock
        self.fits: list[tuple[int, float, float]] = []

    def fit(self, weights: torch.Tensor, data: Dataset, config: FitConfig) -> FitResult:
        with self.lock:
            start = time.monotonic()
            result = self.inner.fit(weights, data, config)
            self.fits.append((config.round, start, time.monotonic()))
        return result


# --------------------------------------------------------------------------- task setup


def digits_experiment(workdir: Path, clients: int, rounds: int) -> Path:
    """The tests' digits task (MLP, one hidden layer of 16) over ``clients`` IID clients."""
    path = workdir / "digits.toml"
    path.write_text(f"""name = "grpc-deploy-digits"
seed = 7
rounds = {rounds}
threads = 1

[data]
dataset = "digits"

[partition]
method = "iid"
clients = {clients}

[model]
kind = "mlp"
hidden = [16]

[train]
lr = 0.1
epochs = 1
batch_size = 32
""")
    return path


def client_ids(task: str, clients: int, workdir: Path) -> list[str]:
    """The ids the task's partition uses (and the certificates are issued for)."""
    if task == "flat":
        return [f"c{i:03d}" for i in range(clients)]
    from fedmosaic.build import build_data
    from fedmosaic.config import load_experiment

    return list(build_data(load_experiment(workdir / "digits.toml")).client_ids)


# --------------------------------------------------------------------------- server role


def run_server(args: argparse.Namespace) -> None:
    """One server process: listen, wait for all clients, run the rounds, report."""
    from fedmosaic.net.server import start_server
    from fedmosaic.net.settings import DeploySettings
    from fedmosaic.net.transport import GrpcTransport
    from fedmosaic.net.wire import spec_hash
    from fedmosaic.runtime.server import Server

    workdir, n = Path(args.workdir), args.clients[0]
    trainer: Trainer
    if args.task == "flat":
        from fedmosaic.algorithms.strategy import FedAvg

        trainer, strategy = PerturbationTrainer(args.params), FedAvg()
    else:
        from fedmosaic.build import build_data, build_strategy, build_trainer
        from fedmosaic.config import load_experiment

        exp = load_experiment(workdir / "digits.toml")
        trainer, strategy = build_trainer(exp, build_data(exp)), build_strategy(exp)
    settings = DeploySettings(credentials=workdir / "federation", address="127.0.0.1", port=0,
                              min_clients=n)
    transport = GrpcTransport(settings, numel=trainer.spec.numel,
                              spec_hash=spec_hash(trainer.spec), experiment="grpc-deploy",
                              rounds=args.rounds)
    running = start_server(settings, transport)
    initial = trainer.initial_weights(args.seed)
    listening_rss = psutil.Process().memory_info().rss
    (workdir / "endpoint.json").write_text(json.dumps({"port": running.port}))
    rounds: list[dict[str, Any]] = []

    def on_round(record: dict[str, Any]) -> None:
        end = time.monotonic()
        transport.round_completed(record)
        rounds.append({**{k: v for k, v in record.items() if isinstance(v, (int, float))},
                       "start": end - record["wall_time"], "end": end})

    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            with transport.cond:
                joined = len(transport.connected_unlocked())
            if joined >= n:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"only {joined} of {n} clients joined")
            time.sleep(0.05)
        server = Server(trainer=trainer, strategy=strategy, transport=transport,
                        rounds=args.rounds, seed=args.seed, callbacks=[on_round])
        server.run(initial_weights=initial)
        transport.finish()
        end = time.monotonic() + settings.linger
        while time.monotonic() < end and not transport.all_told_done():
            time.sleep(0.05)
    finally:
        running.stop(0)
    report = {"rounds": rounds, "numel": trainer.spec.numel,
              "settings": {k: getattr(settings, k) for k in SETTINGS_RECORDED},
              "listening_rss_bytes": listening_rss,
              "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    (workdir / "server.json").write_text(json.dumps(report))


# --------------------------------------------------------------------------- client role


def run_clients(args: argparse.Namespace) -> None:
    """One client process hosting ``--ids`` as threads, each a full ``FederationClient``."""
    from fedmosaic.data import ArrayDataset
    from fedmosaic.net.certs import FederationPaths
    from fedmosaic.net.client import Backoff, FederationClient, open_channel
    from fedmosaic.net.wire import MESSAGE_OVERHEAD

    workdir = Path(args.workdir)
    ids = args.ids.split(",")
    lock = threading.Lock()
    trainers: dict[str, TimedTrainer] = {}
    data: dict[str, Any] = {}
    if args.task == "flat":
        tiny = ArrayDataset(np.zeros((1, 1), dtype=np.float32), np.zeros(1, dtype=np.int64))
        for cid in ids:
            trainers[cid], data[cid] = TimedTrainer(PerturbationTrainer(args.params), lock), tiny
    else:
        from fedmosaic.build import build_data, build_trainer
        from fedmosaic.config import load_experiment

        exp = load_experiment(workdir / "digits.toml")
        fed = build_data(exp)
        for cid in ids:  # built here, not in the threads: building draws from torch's RNG
            trainers[cid] = TimedTrainer(build_trainer(exp, fed), lock)
            data[cid] = fed.client(cid).train
    paths = FederationPaths(workdir / "federation")
    reports: dict[str, Any] = {}
    errors: list[str] = []

    def client(cid: str) -> None:
        channel = open_channel(f"127.0.0.1:{args.port}", paths.ca_cert, paths.client_cert(cid),
                               paths.client_key(cid),
                               max_message_bytes=64 * 1024 * 1024 + MESSAGE_OVERHEAD)
        try:
            fc = FederationClient(channel, trainers[cid], data[cid], backoff=Backoff(budget=120))
            reports[cid] = fc.run().rounds
        except Exception as exc:  # reported to the driver, which fails the configuration
            errors.append(f"{cid}: {exc!r}")
        finally:
            channel.close()

    threads = [threading.Thread(target=client, args=(cid,), name=cid) for cid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = {"rounds": reports, "errors": errors,
           "fits": {cid: tr.fits for cid, tr in trainers.items()},
           "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    (workdir / f"clients-{args.proc}.json").write_text(json.dumps(out))


# --------------------------------------------------------------------------- driver


class RssSampler(threading.Thread):
    """Samples one process's RSS every ``SAMPLE_S`` seconds and keeps the maximum."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(SAMPLE_S):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def _spawn(role_args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *role_args],
                                cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_all(procs: dict[str, subprocess.Popen[bytes]], workdir: Path, timeout: float) -> None:
    end = time.monotonic() + timeout
    try:
        for name, proc in procs.items():
            rc = proc.wait(timeout=max(end - time.monotonic(), 1.0))
            if rc != 0:
                log = (workdir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with {rc}:\n{log}")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def run_config(task: str, clients: int, rounds: int, client_procs: int, params: int,
               seed: int, timeout: float) -> dict[str, Any]:
    """One server process and ``client_procs`` client processes; the raw results."""
    from fedmosaic.net.certs import create_federation

    with tempfile.TemporaryDirectory(prefix="grpc-deploy-") as tmp:
        workdir = Path(tmp)
        if task == "digits":
            digits_experiment(workdir, clients, rounds)
        ids = client_ids(task, clients, workdir)
        create_federation(workdir / "federation", clients=ids, ca_passphrase=None)
        common = ["--workdir", str(workdir), "--task", task, "--params", str(params),
                  "--clients", str(clients), "--rounds", str(rounds), "--seed", str(seed)]
        procs = {"server": _spawn(["--role", "server", *common], workdir / "server.log")}
        sampler = RssSampler(procs["server"].pid)
        sampler.start()
        try:
            end = time.monotonic() + START_TIMEOUT_S
            while not (workdir / "endpoint.json").is_file():
                if procs["server"].poll() is not None or time.monotonic() > end:
                    raise RuntimeError("server did not start:\n"
                                       + (workdir / "server.log").read_text(errors="replace"))
                time.sleep(0.05)
            port = json.loads((workdir / "endpoint.json").read_text())["port"]
            started = time.monotonic()
            groups = [ids[i::client_procs] for i in range(client_procs)]
            for i, group in enumerate(g for g in groups if g):
                procs[f"clients-{i}"] = _spawn(
                    ["--role", "clients", *common, "--port", str(port), "--proc", str(i),
                     "--ids", ",".join(group)], workdir / f"clients-{i}.log")
            _wait_all(procs, workdir, timeout)
            total = time.monotonic() - started
        finally:
            sampled_peak = sampler.stop()
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        server = json.loads((workdir / "server.json").read_text())
        client_files = [json.loads(p.read_text()) for p in sorted(workdir.glob("clients-*.json"))]
    errors = [e for c in client_files for e in c["errors"]]
    if errors:
        raise RuntimeError("clients failed: " + "; ".join(errors[:5]))
    fits = [f for c in client_files for fl in c["fits"].values() for f in fl]
    return {"server": server, "fits": fits, "sampled_peak_rss_bytes": sampled_peak,
            "client_process_ru_maxrss_bytes": [c["ru_maxrss_bytes"] for c in client_files],
            "seconds_after_server_start": total}


def union_length(intervals: Sequence[tuple[float, float]]) -> float:
    """Total length covered by a set of closed intervals."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None and cur_start is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None and cur_start is not None:
        total += cur_end - cur_start
    return total


def round_breakdown(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """Per round: server wall time, the part covered by some client's fit, the rest."""
    rows = []
    for r in raw["server"]["rounds"]:
        fits = [(max(s, r["start"]), min(e, r["end"])) for rnd, s, e in raw["fits"]
                if rnd == r["round"]]
        fits = [(s, e) for s, e in fits if e > s]
        training = union_length(fits)
        rows.append({"round": r["round"], "updates": r["updates"], "failures": r["failures"],
                     "round_s": r["wall_time"], "training_s": training,
                     "overhead_s": r["wall_time"] - training,
                     "slowest_fit_s": max((e - s for s, e in fits), default=0.0),
                     "fits": len(fits), "bytes_up": r["bytes_up"],
                     "bytes_down": r["bytes_down"]})
    return rows


def overhead_part(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for n in args.clients:
        print(f"overhead: {n} clients, {args.rounds} rounds ...", flush=True)
        t0 = time.monotonic()
        raw = run_config("digits", n, args.rounds, min(args.client_procs, n), 0, args.seed,
                         args.timeout)
        per_round = round_breakdown(raw)
        incomplete = [r for r in per_round if r["updates"] != n]
        if incomplete:
            raise RuntimeError(f"{n} clients: rounds without every client: {incomplete}")
        row = {
            "clients": n, "rounds": args.rounds, "client_procs": min(args.client_procs, n),
            "median_round_s": statistics.median(r["round_s"] for r in per_round),
            "median_training_s": statistics.median(r["training_s"] for r in per_round),
            "median_overhead_s": statistics.median(r["overhead_s"] for r in per_round),
            "median_overhead_per_client_ms":
                1e3 * statistics.median(r["overhead_s"] for r in per_round) / n,
            "server_peak_rss_mb": raw["server"]["ru_maxrss_bytes"] / 2**20,
            "per_round": per_round, "settings": raw["server"]["settings"],
            "seconds": time.monotonic() - t0,
        }
        print(f"  round {row['median_round_s']:.3f}s, training {row['median_training_s']:.3f}s,"
              f" overhead {row['median_overhead_s']:.3f}s (medians), {row['seconds']:.0f}s",
              flush=True)
        rows.append(row)
    return {"task": "digits, MLP 64-16-10, 1 local epoch, SGD lr 0.1, batch 32, IID",
            "rows": rows}


def memory_part(args: argparse.Namespace) -> dict[str, Any]:
    model_bytes = 4 * args.mem_params
    rows, notes = [], []
    for n in args.mem_clients:
        need = (3 * n + 6) * model_bytes + 2**30
        available = psutil.virtual_memory().available
        if need > available:
            note = (f"{n} clients skipped: about {need / 2**30:.1f} GiB needed, "
                    f"{available / 2**30:.1f} GiB available")
            print(note, flush=True)
            notes.append(note)
            continue
        print(f"memory: {n} clients, {args.mem_params:,} parameters ...", flush=True)
        t0 = time.monotonic()
        raw = run_config("flat", n, args.mem_rounds, min(args.client_procs, n), args.mem_params,
                         args.seed, args.timeout)
        per_round = round_breakdown(raw)
        if any(r["updates"] != n for r in per_round):
            raise RuntimeError(f"{n} clients: a round without every client: {per_round}")
        row = {
            "clients": n, "rounds": args.mem_rounds, "client_procs": min(args.client_procs, n),
            "server_peak_rss_mb": raw["server"]["ru_maxrss_bytes"] / 2**20,
            "server_sampled_peak_rss_mb": raw["sampled_peak_rss_bytes"] / 2**20,
            "server_listening_rss_mb": raw["server"]["listening_rss_bytes"] / 2**20,
            "client_process_peak_rss_mb": [b / 2**20
                                           for b in raw["client_process_ru_maxrss_bytes"]],
            "round_s": [r["round_s"] for r in per_round], "settings": raw["server"]["settings"],
            "seconds": time.monotonic() - t0,
        }
        print(f"  server peak RSS {row['server_peak_rss_mb']:.0f} MiB (listening "
              f"{row['server_listening_rss_mb']:.0f} MiB), {row['seconds']:.0f}s", flush=True)
        rows.append(row)
    return {"params": args.mem_params, "model_mb": model_bytes / 2**20, "rows": rows,
            "notes": notes}


def csv_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more integers >= 1")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("overhead", "memory", "all"), default="all")
    p.add_argument("--clients", type=csv_ints, default=[10, 100],
                   help="client counts of the overhead part")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the overhead part")
    p.add_argument("--mem-clients", type=csv_ints, default=[1, 2, 5, 10],
                   help="client counts of the memory part")
    p.add_argument("--mem-params", type=int, default=100_000_000,
                   help="parameters of the flat model of the memory part")
    p.add_argument("--mem-rounds", type=int, default=2)
    p.add_argument("--client-procs", type=int, default=2,
                   help="client processes the clients are spread over (as threads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds one configuration may take")
    p.add_argument("--out", type=Path, default=RESULTS_JSON)
    # Internal: the server and client processes the driver starts.
    p.add_argument("--role", choices=("driver", "server", "clients"), default="driver",
                   help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--task", choices=("digits", "flat"), help=argparse.SUPPRESS)
    p.add_argument("--params", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--proc", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("rounds", "mem_rounds", "client_procs", "mem_params"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.timeout > 0:
        p.error(f"--timeout must be > 0, got {args.timeout}")
    if args.role != "driver":
        if not args.workdir or not args.task or len(args.clients) != 1:
            p.error(f"--role {args.role} needs --workdir, --task and one --clients value")
        if args.role == "clients" and (args.port is None or not args.ids):
            p.error("--role clients needs --port and --ids")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.role == "server":
        run_server(args)
        return
    if args.role == "clients":
        run_clients(args)
        return
    argv = sys.argv[1:] if argv is None else argv
    info = {**machine(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    command = "python benchmarks/grpc_deploy.py" + (" " + shlex.join(argv) if argv else "")
    payload = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.part in ("overhead", "all"):
        payload["overhead"] = {"command": command, "machine": info, **overhead_part(args)}
        _save(args.out, payload)
    if args.part in ("memory", "all"):
        payload["memory"] = {"command": command, "machine": info, **memory_part(args)}
        _save(args.out, payload)
    print(f"wrote {args.out}")


def _save(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    main()
