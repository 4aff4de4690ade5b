"""Thousands of connected clients (issue #18, item 2): a real server under many members.

Run with the project's venv:

    .venv/bin/python benchmarks/load.py --clients 100,1000,5000 --rounds 3 --procs 4
    .venv/bin/python benchmarks/load.py --clients 1000 --connect-timeout-ms 20000 --append
    .venv/bin/python benchmarks/load.py --clients 150 --rounds 2 --per-round 50 --procs 1 \\
        --no-save   # a quick look, results printed only

For each size N: a federation with N client certificates (``create_federation``, the API
behind ``fedmosaic certs init``; issued once per count and cached under
``benchmarks/.cache/``, about 1 ms per certificate, re-issued when the cached CA expires
within a day); a real ``fedmosaic server`` process (``python -m fedmosaic server``) on
127.0.0.1 with mutual TLS, the digits task with the tests' MLP (one hidden layer of 16,
1,210 parameters), ``clients_per_round`` = ``--per-round`` (100), ``min_clients`` = N (the
first round starts once all N are connected), a 300 s round deadline and otherwise the
``[server]`` defaults (``--set KEY=VALUE`` overrides one, recorded); and N lightweight
members (``benchmarks/load_client.py``) spread over ``--procs`` load-generator processes,
each running its members on one asyncio event loop with one ``grpc.aio`` channel and one
client certificate per member. A member joins, heartbeats at the server's interval,
long-polls for tasks, downloads the model and uploads a small random finite update for each
FIT task, exactly as the real client frames these calls, and stops at DONE. ``--evaluate K``
adds a federated evaluation by K members after each round (``EVALUATE`` tasks: download,
``ReportEvaluation``), on the same model with the members' data declared (``custom`` data
that the server never loads) instead of the server's central evaluation. ``--hold S``
(default 10): the N members connect, the server idles with them for S seconds
(``min_clients`` = N + 1), then one more member joins and the rounds start, so the cost of
N idle connected members is measured on its own.

Measured per size:

- **connect**: seconds from the first member's first ``Join`` to the last member's (all N
  joined), and from the load generators' start (process start-up included);
- **rounds**: each round's wall time as the server records it (``wall_time`` in
  ``metrics.json``: selection, dispatch, long polls answered, 100 downloads and uploads,
  aggregation, central evaluation), median and max over rounds 2 and later (round 1 also
  waits for all N members to connect); and per round, from the first FIT task a member
  received to the last upload answered;
- **server**: the ``fedmosaic server`` process sampled every 0.1 s with psutil: peak RSS,
  RSS with all members connected, CPU (user + system) per wall second (1.0 = one core)
  while members connect and while rounds run, and its peak thread count;
- **status**: the operator's ``Status`` call over a fresh mutual-TLS channel (what
  ``fedmosaic status`` does once started: connect, handshake, call) every
  ``--status-every`` seconds from the moment the server listens, median and max while the
  members connect and while the rounds run; and the whole ``fedmosaic status --json``
  command (a new Python process) every ``--cli-every`` seconds;
- **refusals**: every failed call of every member, by method, gRPC status and the server's
  refusal code (a call without one failed before the server saw it: connection attempt,
  TLS handshake, deadline), and the server's own counters scraped from ``/metrics``
  (``fedmosaic_rejected_messages_total``, ``fedmosaic_clients_dropped_total`` and
  ``fedmosaic_clients_refused_total`` by reason, ``fedmosaic_tls_handshake_failures_total``
  by kind) plus the ``refused`` lines of its log.
  Honest members should see none.

Members use the real client's channel options (``fedmosaic.net.channel.RECONNECT_OPTIONS``;
``grpc.min_reconnect_backoff_ms``, which gRPC core also takes as the shortest deadline of a
connection attempt, is left at gRPC's 20 s since the first runs of this benchmark showed
attempts timing out at the earlier 200 ms); ``--connect-timeout-ms`` sets a value (recorded
with the row), to tell connection attempts that time out on the member's side from refusals.

A size that fails (the server does not start, members give up, the run does not finish in
``--timeout`` seconds) is recorded with its error and whatever was measured, and the next
size runs. The machine is shared by the server and the load generators (2 cores here): the
members' own CPU time is recorded too.

Results: ``benchmarks/results/load.json``; the section "Thousands of connected clients
(issue #18)" of docs/benchmarks.md is generated from it (``markdown`` below, called by
``benchmarks/report.py``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import psutil  # noqa: E402

CACHE = HERE / ".cache"
RESULTS_NAME = "load"
SAMPLE_S = 0.1
START_TIMEOUT_S = 120.0
# The [server] settings the benchmark sets (everything else is the default, or --set).
ROUND_DEADLINE_S = 300.0
# After the members stop, how long the server may take to exit (its linger is 15 s).
SERVER_EXIT_S = 30.0
CLIENT_ID_FORMAT = "m{:05d}"
LOG_LINE = re.compile(r" (DEBUG|INFO|WARNING|ERROR|CRITICAL) ([\w.]+): ")
REFUSED_LINE = re.compile(r"\brefused (\w+) from ")
METRIC_LINE = re.compile(r'^fedmosaic_(rejected_messages|clients_dropped|clients_refused|'
                         r'tls_handshake_failures)_total'
                         r'\{(?:reason|kind)="([^"]+)"\} ([0-9.e+]+)$')


# --------------------------------------------------------------------------- credentials


def member_ids(count: int) -> list[str]:
    return [CLIENT_ID_FORMAT.format(i) for i in range(count)]


def provision(count: int, cache: Path = CACHE) -> tuple[Path, float]:
    """A federation directory with at least ``count`` member credentials (``m00000``...):
    the cached one for the smallest cached count >= ``count`` whose CA is valid for another
    day, else a new one issued now. Returns (directory, seconds spent issuing: 0 if
    cached)."""
    from cryptography import x509

    from fedmosaic.net.certs import create_federation

    cache.mkdir(parents=True, exist_ok=True)
    ignore = cache / ".gitignore"
    if not ignore.is_file():
        ignore.write_text("*\n")  # certificates and keys never enter the repository
    soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)
    for folder in sorted(cache.glob("federation-*"), key=lambda p: int(p.name.split("-")[1])):
        have = int(folder.name.split("-")[1])
        ca = folder / "ca.pem"
        if have < count or not ca.is_file() or not (folder / "federation.json").is_file():
            continue
        cert = x509.load_pem_x509_certificate(ca.read_bytes())
        if cert.not_valid_after_utc > soon and (folder / "clients" /
                                                f"{member_ids(count)[-1]}.pem").is_file():
            return folder, 0.0
    folder = cache / f"federation-{count}"
    start = time.perf_counter()
    create_federation(folder, clients=member_ids(count), ca_passphrase=None, overwrite=True)
    return folder, time.perf_counter() - start


# --------------------------------------------------------------------------- the task


# The members' own data in the federated-evaluation task: the server never loads it (it only
# declares that the clients hold local test splits); members declare their data instead.
MEMBER_DATA = """import numpy as np


def load_data(client_id):
    rng = np.random.default_rng(0)
    return rng.normal(size=(40, 64)).astype("float32"), rng.integers(0, 10, 40)
"""


def write_experiment(workdir: Path, *, clients: int, rounds: int, per_round: int,
                     credentials: Path, overrides: dict[str, Any], evaluate: int = 0) -> Path:
    """The digits task with the tests' MLP, served to ``clients`` members; ``evaluate`` > 0:
    the same model on 64 features and 10 classes with federated evaluation by ``evaluate``
    members after each round instead of the server's central evaluation (``custom`` data,
    the members' ids listed)."""
    server: dict[str, Any] = {"address": "127.0.0.1", "port": 0,
                              "credentials": str(credentials), "min_clients": clients,
                              "wait_for_clients": 600.0, "round_deadline": ROUND_DEADLINE_S,
                              "round_retries": 0, **overrides}
    lines = [f'name = "load-{clients}"', "seed = 1", f"rounds = {rounds}", "threads = 1", ""]
    if evaluate > 0:
        (workdir / "member_data.py").write_text(MEMBER_DATA)
        lines += ["[data]", 'dataset = "custom"', f"clients = {json.dumps(member_ids(clients))}",
                  'loader = "member_data.py:load_data"', "test_fraction = 0.25",
                  "feature_shape = [64]", "num_classes = 10", "", "[evaluation]",
                  "central = false", "federated = true", f"clients = {evaluate}", ""]
    else:
        lines += ["[data]", 'dataset = "digits"', "", "[partition]", 'method = "iid"',
                  "clients = 10", ""]
    lines += ["[model]", 'kind = "mlp"', "hidden = [16]", "", "[train]", "lr = 0.1", "",
              "[strategy]", f"clients_per_round = {per_round}", "", "[server]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in server.items()]
    path = workdir / "experiment.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def model_layout(experiment: Path) -> dict[str, Any]:
    """What a member declares: the server task's layout hash, size, sample shape, classes."""
    from fedmosaic.build import server_task
    from fedmosaic.config import load_experiment
    from fedmosaic.net.wire import spec_hash

    task = server_task(load_experiment(experiment))
    return {"spec_hash": spec_hash(task.trainer.spec), "numel": task.trainer.spec.numel,
            "feature_shape": list(task.profile.feature_shape or ()),
            "num_classes": int(task.profile.num_classes or 2)}


# --------------------------------------------------------------------------- probes


class ServerSampler(threading.Thread):
    """The server process every ``SAMPLE_S`` s: (monotonic, RSS bytes, CPU s, threads)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.samples: list[tuple[float, int, float, int]] = []
        # Once a second, for where it breaks: the load generators' processes (set by the
        # driver once they run) and the whole machine's CPU use, next to the server's.
        self.loaders: list[int] = []
        self.timeline: list[dict[str, float]] = []
        self._stop_event = threading.Event()

    def _loaders(self) -> tuple[float, int]:
        cpu, threads = 0.0, 0
        for pid in list(self.loaders):
            try:
                proc = psutil.Process(pid)
                with proc.oneshot():
                    t = proc.cpu_times()
                    cpu += t.user + t.system
                    threads += proc.num_threads()
            except psutil.Error:
                continue
        return cpu, threads

    def run(self) -> None:
        psutil.cpu_percent(None)
        next_line = time.monotonic()
        while not self._stop_event.is_set():
            try:
                with self.proc.oneshot():
                    cpu = self.proc.cpu_times()
                    self.samples.append((time.monotonic(), self.proc.memory_info().rss,
                                         cpu.user + cpu.system, self.proc.num_threads()))
            except psutil.Error:
                return
            if self.samples[-1][0] >= next_line:
                next_line += 1.0
                t, rss, cpu_s, threads = self.samples[-1]
                loader_cpu, loader_threads = self._loaders()
                self.timeline.append({
                    "t": t, "server_rss_mb": round(rss / 2**20, 1),
                    "server_cpu_s": round(cpu_s, 2), "server_threads": threads,
                    "loaders_cpu_s": round(loader_cpu, 2), "loaders_threads": loader_threads,
                    "machine_cpu_pct": psutil.cpu_percent(None),
                    "load_1min": os.getloadavg()[0]})
            self._stop_event.wait(SAMPLE_S)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def cpu_share(self, start: float, end: float) -> float | None:
        """CPU seconds per wall second between ``start`` and ``end`` (1.0 = one core)."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2 or inside[-1][0] - inside[0][0] <= 0:
            return None
        return (inside[-1][2] - inside[0][2]) / (inside[-1][0] - inside[0][0])

    def rss_at(self, when: float) -> int | None:
        before = [s for s in self.samples if s[0] <= when]
        return before[-1][1] if before else None


def parse_metrics(text: str) -> dict[str, dict[str, float]]:
    """The refusal and drop counters of a ``/metrics`` page, by reason."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        m = METRIC_LINE.match(line.strip())
        if m:
            out.setdefault(m.group(1), {})[m.group(2)] = float(m.group(3))
    return out


class StatusProbe(threading.Thread):
    """The operator's view while the size runs: a ``Status`` call over a fresh channel every
    ``every`` s, the ``/metrics`` counters after each, and the ``fedmosaic status --json``
    command every ``cli_every`` s (0: never)."""

    def __init__(self, target: str, credentials: Path, metrics_port: int | None,
                 every: float, cli_every: float, connect_timeout_ms: int | None = None) -> None:
        super().__init__(daemon=True)
        self.connect_timeout_ms = connect_timeout_ms
        self.target, self.credentials = target, credentials
        self.metrics_port, self.every, self.cli_every = metrics_port, every, cli_every
        # (monotonic at the call's start, seconds or None, connected, completed, state, error)
        self.calls: list[tuple[float, float | None, int, int, str, str]] = []
        self.cli: list[tuple[float, float, int]] = []  # (start, seconds, exit status)
        # (the failed command's entry in ``cli``, the end of its stderr)
        self.cli_errors: list[tuple[tuple[float, float, int], str]] = []
        self.call_errors: list[tuple[float, str]] = []  # the first few failed Status calls
        self.counters: dict[str, dict[str, float]] = {}
        self.scrape_error = ""
        self._stop_event = threading.Event()

    def _status(self) -> None:
        import grpc

        from fedmosaic.net.certs import FederationPaths
        from fedmosaic.net.client import _Stubs, open_channel
        from fedmosaic.net.proto import fedmosaic_pb2 as pb

        paths = FederationPaths(self.credentials)
        start = time.monotonic()
        if self.connect_timeout_ms is None:  # exactly as `fedmosaic status`
            channel = open_channel(self.target, paths.ca_cert, paths.operator_cert,
                                   paths.operator_key)
        else:  # its options with the members' connection deadline
            from load_client import channel_options

            from fedmosaic.net.auth import channel_credentials, pinned_server_name
            from fedmosaic.net.wire import MESSAGE_OVERHEAD

            channel = grpc.secure_channel(
                self.target, channel_credentials(paths.ca_cert, paths.operator_cert,
                                                 paths.operator_key),
                options=channel_options(64 * 1024 * 1024 + MESSAGE_OVERHEAD,
                                        pinned_server_name(paths.ca_cert),
                                        self.connect_timeout_ms))
        try:
            reply = _Stubs(channel).status(pb.StatusRequest(), timeout=10)
            self.calls.append((start, time.monotonic() - start, reply.connected_clients,
                               reply.completed_rounds, reply.state, ""))
        except grpc.RpcError as exc:
            self.calls.append((start, None, -1, -1, "", exc.code().name))
            if len(self.call_errors) < 100:
                self.call_errors.append((start, f"{exc.code().name}: {exc.details()}"[:300]))
        finally:
            channel.close()

    def scrape(self) -> None:
        if self.metrics_port is None:
            return
        try:
            url = f"http://127.0.0.1:{self.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as page:
                self.counters = parse_metrics(page.read().decode())
        except OSError as exc:
            self.scrape_error = str(exc)

    def _cli(self) -> None:
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "fedmosaic", "status", "--server",
                               self.target, "--credentials", str(self.credentials), "--json"],
                              cwd=ROOT, capture_output=True, timeout=60, check=False)
        self.cli.append((start, time.monotonic() - start, done.returncode))
        if done.returncode != 0:
            self.cli_errors.append((self.cli[-1], done.stderr.decode(errors="replace")[-300:]))

    def _cli_loop(self) -> None:
        while True:
            self._cli()
            if self._stop_event.wait(self.cli_every):
                return

    def run(self) -> None:
        cli = None
        if self.cli_every > 0:  # a thread of its own: the command takes seconds to start
            cli = threading.Thread(target=self._cli_loop, daemon=True)
            cli.start()
        while not self._stop_event.is_set():
            began = time.monotonic()
            self._status()
            self.scrape()
            self._stop_event.wait(max(self.every - (time.monotonic() - began), 0.05))
        if cli is not None:
            cli.join()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def connected(self) -> int:
        """Members connected, as the last answered Status said (0 before any)."""
        return next((c[2] for c in reversed(self.calls) if c[1] is not None), 0)

    def finished_at(self, rounds: int) -> float | None:
        """When the probe first saw every round completed."""
        return next((c[0] for c in self.calls if c[3] >= rounds), None)


# --------------------------------------------------------------------------- one size


def _summary(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "median": None, "max": None}
    return {"n": len(values), "median": statistics.median(values), "max": max(values)}


def _merge(tallies: list[dict[str, Any]]) -> dict[str, Any]:
    """The load generators' tallies as one."""
    total: dict[str, Any] = {}
    for key in ("members", "joined", "joins", "done", "unfinished", "heartbeats", "polls",
                "fits", "uploads_accepted", "uploads_not_accepted", "evaluations"):
        total[key] = sum(t[key] for t in tallies)
    for key in ("gave_up", "errors", "fit_rounds"):
        merged: Counter[str] = Counter()
        for t in tallies:
            merged.update(t[key])
        total[key] = dict(sorted(merged.items()))
    examples: dict[str, str] = {}
    for t in tallies:
        for k, v in t["error_examples"].items():
            examples.setdefault(k, v)
    total["error_examples"] = examples
    for key in ("join_latency_s", "joined_at", "done_at", "download_s", "upload_s",
                "fit_events"):
        total[key] = [v for t in tallies for v in t[key]]
    starts = [t["first_join_start"] for t in tallies if t["first_join_start"] is not None]
    total["first_join_start"] = min(starts) if starts else None
    total["started"] = min(t["started"] for t in tallies)
    total["cpu_s"] = sum(t["cpu_s"] for t in tallies)
    total["ru_maxrss_mb"] = [t["ru_maxrss_mb"] for t in tallies]
    return total


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        return subprocess.Popen(argv, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _stop(proc: subprocess.Popen[bytes], grace: float) -> int | None:
    """Wait up to ``grace`` s, then SIGTERM, then SIGKILL; the exit status (None: killed)."""
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return None


def run_size(clients: int, *, rounds: int, per_round: int, procs: int, workdir: Path,
             credentials: Path | None = None, overrides: dict[str, Any] | None = None,
             timeout: float = 900.0, status_every: float = 0.25, cli_every: float = 15.0,
             poll_seconds: float = 10.0, join_concurrency: int = 64,
             connect_timeout_ms: int | None = None, hold: float = 0.0,
             evaluate: int = 0) -> dict[str, Any]:
    """One size: server, ``procs`` load generators, the probes; the row of results.

    ``hold`` > 0: once the N members are connected the server idles with them for ``hold``
    seconds (``min_clients`` = N + 1), then one more member (a load generator of its own,
    the latecomer) joins and the rounds start; the idle window is measured on its own.
    ``evaluate`` > 0: federated evaluation by that many members after each round."""
    from load_client import Plan

    overrides = dict(overrides or {})
    row: dict[str, Any] = {"clients": clients, "procs": procs, "rounds": rounds,
                           "per_round": per_round, "server_overrides": overrides,
                           "join_concurrency": join_concurrency, "poll_seconds": poll_seconds,
                           "connect_timeout_ms": connect_timeout_ms, "hold_s": hold,
                           "evaluate": evaluate,
                           "error": None,
                           # Other work on the machine competes for its cores too.
                           "load_average_1min_before": os.getloadavg()[0]}
    issued = 0.0
    if credentials is None:
        credentials, issued = provision(clients + 1)
    row["certificates_issued_s"] = issued
    workdir.mkdir(parents=True, exist_ok=True)
    experiment = write_experiment(workdir, clients=clients + (hold > 0), rounds=rounds,
                                  per_round=per_round, credentials=credentials,
                                  overrides=overrides, evaluate=evaluate)
    layout = model_layout(experiment)
    row["numel"] = layout["numel"]
    out = workdir / "out"
    server = _spawn([sys.executable, "-m", "fedmosaic", "server", str(experiment), "--output",
                     str(out), "--metrics-port", "0"], workdir / "server.log")
    sampler = ServerSampler(server.pid)
    sampler.start()
    probe: StatusProbe | None = None
    loaders: list[subprocess.Popen[bytes]] = []
    spawned = time.monotonic()
    late_spawned: float | None = None
    try:
        end = time.monotonic() + START_TIMEOUT_S
        while not (out / "endpoint.json").is_file():
            if server.poll() is not None or time.monotonic() > end:
                raise RuntimeError("the server did not start: " + _tail(workdir / "server.log"))
            time.sleep(0.1)
        endpoint = json.loads((out / "endpoint.json").read_text())
        target = f"127.0.0.1:{endpoint['port']}"
        probe = StatusProbe(target, credentials, endpoint.get("metrics_port"), status_every,
                            cli_every, connect_timeout_ms)
        probe.start()
        ids = member_ids(clients + 1)

        def loader(name: str, group: list[str], seed: int) -> subprocess.Popen[bytes]:
            plan = Plan(target=target, credentials=str(credentials), ids=group,
                        out=str(workdir / f"{name}.json"), poll_seconds=poll_seconds,
                        join_concurrency=join_concurrency, deadline=timeout, seed=seed,
                        connect_timeout_ms=connect_timeout_ms, **layout)
            plan_path = workdir / f"plan-{name}.json"
            plan_path.write_text(json.dumps(asdict(plan)))
            return _spawn([sys.executable, str(HERE / "load_client.py"), str(plan_path)],
                          workdir / f"{name}.log")

        spawned = time.monotonic()
        for i in range(procs):
            group = ids[:clients][i::procs]
            if group:
                loaders.append(loader(f"load-{i}", group, i))
        sampler.loaders = [p.pid for p in loaders]
        deadline = spawned + timeout + 30
        if hold > 0:
            while probe.connected() < clients:
                if time.monotonic() > deadline or any(p.poll() is not None for p in loaders):
                    raise RuntimeError(f"{probe.connected()} of {clients} members connected")
                time.sleep(0.1)
            time.sleep(hold)
            row["late_spawned"] = time.monotonic() - spawned
            late_spawned = time.monotonic()
            loaders.append(loader("latecomer", ids[clients:], procs))
            sampler.loaders = [p.pid for p in loaders]
        for proc in loaders:
            _stop(proc, max(deadline - time.monotonic(), 1.0))
        server_rc = _stop(server, SERVER_EXIT_S)
        row["server_exit"] = server_rc
        if server_rc != 0:
            row["error"] = f"the server exited with {server_rc}: " + _tail(
                workdir / "server.log")
    except Exception as exc:  # recorded: the benchmark goes on with the next size
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        running = [p for p in loaders if p.poll() is None]
        for proc in running:  # all at once: each writes what its members did, then exits
            proc.terminate()
        for proc in running:
            _stop(proc, 15.0)
        if probe is not None:
            probe.scrape()
            probe.stop()
        if server.poll() is None:
            _stop(server, 0)
        sampler.stop()
    tallies = [json.loads(p.read_text()) for p in sorted(workdir.glob("load-*.json"))]
    late = workdir / "latecomer.json"
    latecomer = json.loads(late.read_text()) if late.is_file() else None
    row.update(_results(row, tallies, latecomer, sampler, probe, out, workdir, spawned,
                        late_spawned))
    # Once a second, relative to the load generators' start, with what the operator saw.
    seen = probe.calls if probe is not None else []
    for line in sampler.timeline:
        line["connected"] = next((c[2] for c in reversed(seen)
                                  if c[1] is not None and c[0] <= line["t"]), 0)
        line["t"] = round(line["t"] - spawned, 1)
    row["timeline"] = sampler.timeline
    log = _tail(workdir / "server.log", 10**8)
    row["server_log_lines"] = dict(Counter(
        f"{m.group(1)} {m.group(2)}" for m in LOG_LINE.finditer(log)))
    if row["error"] or row.get("client_errors_total"):
        row["server_log_tail"] = log[-4000:]
        row["loader_log_tails"] = {p.name: _tail(p, 1500)
                                   for p in sorted(workdir.glob("*.log"))
                                   if p.name != "server.log"}
    row["load_average_1min_after"] = os.getloadavg()[0]
    return row


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _results(row: dict[str, Any], tallies: list[dict[str, Any]],
             latecomer: dict[str, Any] | None, sampler: ServerSampler,
             probe: StatusProbe | None, out: Path, workdir: Path, spawned: float,
             late_spawned: float | None) -> dict[str, Any]:
    res: dict[str, Any] = {}
    # The N members' connection figures; the latecomer counts for everything else.
    main = _merge(tallies) if tallies else None
    members = _merge([*tallies, latecomer]) if tallies and latecomer else main
    if members is None and row["error"] is None:
        row["error"] = "no load generator wrote its results"
    records: list[dict[str, Any]] = []
    if (out / "metrics.json").is_file():
        records = json.loads((out / "metrics.json").read_text())
    res["round_records"] = [{k: r.get(k) for k in (
        "round", "updates", "failures", "rejected", "wall_time", "test_accuracy",
        "fed_eval_clients", "fed_eval_failures", "fed_test_accuracy") if k in r}
        for r in records]
    res["rounds_completed"] = len(records)
    # Round 1's wall time includes waiting for all N members (min_clients = N): left out.
    walls = [float(r["wall_time"]) for r in records[1:] if r.get("wall_time") is not None]
    res["round_s"] = _summary(walls)
    res["round1_s"] = records[0].get("wall_time") if records else None
    connected = finished = first_join = None
    rounds_from = None  # when the rounds could start: all N (and the latecomer) joined
    if members is not None and main is not None:
        joined_at = main["joined_at"]
        connected = max(joined_at) if len(joined_at) == row["clients"] else None
        first_join = main["first_join_start"]
        rounds_from = connected
        if row.get("hold_s"):
            rounds_from = latecomer["joined_at"][0] if latecomer and \
                latecomer["joined_at"] else None
        res["connect"] = {
            "joined": main["joined"],
            "all_joined_s": connected - first_join if connected and first_join else None,
            "from_spawn_s": connected - spawned if connected else None,
            "join_latency_s": _summary(main["join_latency_s"]),
        }
        res["members"] = {k: members[k] for k in (
            "members", "joined", "joins", "done", "gave_up", "unfinished", "heartbeats",
            "polls", "fits", "uploads_accepted", "uploads_not_accepted", "evaluations",
            "fit_rounds", "cpu_s", "ru_maxrss_mb")}
        spans: dict[int, list[tuple[float, float]]] = {}
        for rnd, arrived, answered, _ in members["fit_events"]:
            spans.setdefault(int(rnd), []).append((arrived, answered))
        # Per round, from the first FIT task a member received to the last upload answered.
        res["member_round_span_s"] = {
            str(k): max(a for _, a in v) - min(t for t, _ in v) for k, v in sorted(spans.items())}
        res["members"]["download_s"] = _summary(members["download_s"])
        res["members"]["upload_s"] = _summary(members["upload_s"])
        res["client_errors"] = members["errors"]
        res["client_error_examples"] = members["error_examples"]
        res["client_errors_total"] = sum(members["errors"].values())
        # A call the server refused carries its refusal code; one without ("-") failed
        # before the server saw it (connection attempt, TLS handshake, deadline).
        res["client_errors_refused"] = sum(v for k, v in members["errors"].items()
                                           if not k.endswith(" -"))
        res["client_errors_transport"] = res["client_errors_total"] - \
            res["client_errors_refused"]
    if members is not None and members["done_at"]:
        finished = min(members["done_at"])  # the first member told DONE: rounds are over
    if probe is not None:
        finished = finished or probe.finished_at(row["rounds"])
        during = [c for c in probe.calls
                  if rounds_from is not None and c[0] >= rounds_from
                  and (finished is None or c[0] <= finished)]
        connecting = [c for c in probe.calls if c[0] >= spawned
                      and (connected is None or c[0] < connected)]
        idle = [c for c in probe.calls if connected is not None and late_spawned is not None
                and connected <= c[0] <= late_spawned]
        res["status"] = {
            "calls": len(probe.calls),
            # Calls after the last round may meet a server that is exiting: not counted.
            "failed": dict(Counter(c[5] for c in probe.calls if c[5] and (
                finished is None or c[0] < finished))),
            "all_s": _summary([c[1] for c in probe.calls if c[1] is not None]),
            "during_rounds_s": _summary([c[1] for c in during if c[1] is not None]),
            "while_connecting_s": _summary([c[1] for c in connecting if c[1] is not None]),
            "idle_s": _summary([c[1] for c in idle if c[1] is not None]),
            "cli_s": _summary([c[1] for c in probe.cli if c[2] == 0]),
            # A command that ended after the last round may have met an exiting server.
            "cli_failed": sum(1 for c in probe.cli if c[2] != 0
                              and (finished is None or c[0] + c[1] < finished)),
            "cli_errors": [e for c, e in probe.cli_errors
                           if finished is None or c[0] + c[1] < finished][:5],
            "call_errors": [{"at_s": round(t - spawned, 2), "error": e}
                            for t, e in probe.call_errors
                            if finished is None or t < finished][:5],
            "max_connected_seen": max((c[2] for c in probe.calls), default=0),
        }
        res["server_counters"] = {k: {r: v for r, v in sorted(d.items()) if v}
                                  for k, d in sorted(probe.counters.items())}
        res["server_refusals_total"] = sum(
            probe.counters.get("rejected_messages", {}).values())
        if probe.scrape_error and not probe.counters:
            res["server_counters_error"] = probe.scrape_error
    log = _tail(workdir / "server.log", 10**8)
    refused = Counter(m.group(1) for m in REFUSED_LINE.finditer(log))
    res["server_log_refused_lines"] = dict(refused)
    samples = sampler.samples
    res["server"] = {
        "peak_rss_mb": max((s[1] for s in samples), default=0) / 2**20,
        "rss_connected_mb": (sampler.rss_at(connected) or 0) / 2**20 if connected else None,
        # Listening, before the first member's join: the model, the data, the libraries.
        "rss_listening_mb": (sampler.rss_at(spawned) or 0) / 2**20,
        "peak_threads": max((s[3] for s in samples), default=0),
        "cpu_connect": sampler.cpu_share(first_join, connected) if connected and first_join
        else None,
        "cpu_idle": sampler.cpu_share(connected, late_spawned)
        if connected and late_spawned else None,
        "cpu_rounds": sampler.cpu_share(rounds_from, finished) if rounds_from and finished
        else None,
        "cpu_s_total": samples[-1][2] if samples else None,
    }
    srv = res["server"]
    if srv["rss_connected_mb"] and srv["rss_listening_mb"]:
        srv["rss_per_member_kb"] = (srv["rss_connected_mb"] - srv["rss_listening_mb"]) \
            * 1024 / row["clients"]
    res["rounds_wall_s"] = finished - rounds_from if rounds_from and finished else None
    if members is not None and latecomer is None and row.get("hold_s"):
        row["error"] = row["error"] or "the latecomer wrote no results"
    return res


# --------------------------------------------------------------------------- report


def _fmt(value: Any, spec: str = ".2f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _size(r: dict[str, Any]) -> str:
    size = f"{r['clients']:,}"
    if r.get("connect_timeout_ms") is not None:
        size += f" (members allow {r['connect_timeout_ms'] / 1000:g} s to connect)"
    return size


def _pair(s: dict[str, Any] | None, spec: str = ".2f") -> str:
    s = s or {}
    return f"{_fmt(s.get('median'), spec)} / {_fmt(s.get('max'), spec)}"


def _rounds_cells(r: dict[str, Any]) -> str:
    conn = r.get("connect") or {}
    joined = conn.get("joined")
    joined_cell = _fmt(conn.get("all_joined_s"), ".1f") if joined == r["clients"] \
        else f"{joined or 0:,} joined"
    return (f"| {_size(r)} | {joined_cell} | {r.get('rounds_completed', 0)}/{r['rounds']} "
            f"| {_pair(r.get('round_s'))} "
            f"| {r.get('client_errors_refused', '-')} / {r.get('client_errors_transport', '-')} "
            f"| {_fmt(r.get('server_refusals_total'), '.0f')} "
            f"| {_fmt(r.get('load_average_1min_before'), '.1f')} / "
            f"{_fmt(r.get('load_average_1min_after'), '.1f')} |")


def _server_cells(r: dict[str, Any]) -> str:
    srv, st = r.get("server") or {}, r.get("status") or {}
    return (f"| {_size(r)} "
            f"| {_fmt(srv.get('rss_listening_mb'), '.0f')} / "
            f"{_fmt(srv.get('rss_connected_mb'), '.0f')} / {_fmt(srv.get('peak_rss_mb'), '.0f')} "
            f"({_fmt(srv.get('rss_per_member_kb'), '.0f')} KB per member) "
            f"| {_fmt(srv.get('cpu_connect'))} / {_fmt(srv.get('cpu_idle'))} / "
            f"{_fmt(srv.get('cpu_rounds'))} "
            f"| {srv.get('peak_threads', '-')} "
            f"| {_pair(st.get('while_connecting_s'), '.3f')} "
            f"| {_pair(st.get('idle_s'), '.3f')} "
            f"| {_pair(st.get('during_rounds_s'), '.3f')} "
            f"| {_pair(st.get('cli_s'), '.1f')} |")


def _row_notes(r: dict[str, Any]) -> str | None:
    """What went wrong at this size, in one line (None: nothing)."""
    what = []
    if r.get("error"):
        what.append("error: " + r["error"].strip().splitlines()[0][:300])
    if r.get("client_errors"):
        top = sorted(r["client_errors"].items(), key=lambda kv: -kv[1])[:4]
        what.append("failed member calls (method, status, refusal code) "
                    + ", ".join(f"`{k}` {v}" for k, v in top))
        example = next(iter((r.get("client_error_examples") or {}).values()), "")
        if example:
            what.append(f"e.g. \"{example[:160]}\"")
    refusals = (r.get("server_counters") or {}).get("rejected_messages")
    if refusals:
        what.append("server refusals " + ", ".join(f"`{k}` {v:.0f}"
                                                    for k, v in refusals.items()))
    drops = (r.get("server_counters") or {}).get("clients_dropped")
    if drops:
        what.append("members dropped from rounds " + ", ".join(f"`{k}` {v:.0f}"
                                                               for k, v in drops.items()))
    tls = (r.get("server_counters") or {}).get("tls_handshake_failures")
    if tls:
        what.append("failed TLS handshakes counted by the server " + ", ".join(
            f"`{k}` {v:.0f}" for k, v in tls.items()))
    gave_up = (r.get("members") or {}).get("gave_up")
    if gave_up:
        what.append("members gave up: " + ", ".join(f"`{k}` {v}" for k, v in gave_up.items()))
    failed = (r.get("status") or {}).get("failed")
    if failed:
        first = ((r.get("status") or {}).get("call_errors") or [{}])[0]
        what.append("operator Status failed " + ", ".join(f"{k} {v}" for k, v in failed.items())
                    + (f" (first {first['at_s']:g} s after the members started: "
                       f"\"{first['error'][:160]}\")" if first else ""))
    cli_failed = (r.get("status") or {}).get("cli_failed")
    if cli_failed:
        what.append(f"`fedmosaic status` failed {cli_failed} time" + "s" * (cli_failed > 1))
    if not what:
        return None
    return f"- {_size(r)} connected: " + "; ".join(what) + "."


# Commits whose rows were measured with the client's 200 ms connection-attempt deadline.
OLD_CONNECT_DEADLINE_COMMITS = ("4aa8d0c", "70e4568")


def markdown(d: dict[str, Any]) -> str:
    """The section of docs/benchmarks.md (called by benchmarks/report.py)."""
    from report import machine_line

    overrides = d.get("overrides") or {}
    holds = ", ".join(sorted({f"{r.get('hold_s', 0):g} s, then one more member joins and "
                              "the rounds start" for r in d["rows"]}))
    lines = [
        "## Thousands of connected clients (issue #18)", "",
        *[f"Command (at commit `{k[1]}`): `{k[0]}`" for k in dict.fromkeys(
            (r.get("command", d["command"]), r.get("commit", d.get("commit", "?")))
            for r in d["rows"])],
        "", machine_line(d["machine"]),
        "",
        "One `fedmosaic server` process (the `grpc.aio` service; digits, the MLP of "
        f"{d['rows'][0].get('numel', '?'):,} parameters, {d['per_round']} clients selected per "
        "round, `min_clients` = N + 1: the N members connect, the server idles with them, "
        "then one more member joins and the rounds start, "
        f"`round_deadline` = {ROUND_DEADLINE_S:g} s, `round_retries` = 0, the other `[server]` "
        "settings at their defaults"
        + (", and " + ", ".join(f"`{k} = {v}`" for k, v in overrides.items())
           if overrides else "")
        + f") and N lightweight members in {d['procs']} load-generator processes "
        "(`benchmarks/load_client.py`: each member has its own `grpc.aio` channel, TLS 1.3 "
        "session and client certificate, and speaks the real protocol: join, heartbeats at "
        "the server's interval, 10 s long polls, model download, a small random update "
        "uploaded as the real client frames it). Server, members and probes share the "
        "machine's cores.", "",
        "- *all joined*: seconds from the first member's `Join` to the last one's.",
        "- *round*: the server's `wall_time` of rounds 2 and later (round 1 includes the "
        "wait for all members, so it is left out; it is in the JSON).",
        "- *failed member calls*: refused by the server (the call carries a refusal code) / "
        "failed before the server saw a call (connection attempt, TLS handshake; the member "
        "retried it, as the real client does); *server refusals*: "
        "`fedmosaic_rejected_messages_total`, all reasons.",
        "- *load*: the machine's 1-minute load average before / after the size ran "
        "(other jobs on the machine included).",
        "- *server RSS*: listening (before the first join) / with all N connected / peak, "
        "and (connected - listening) / N; *CPU*: the server process's user + "
        "system time per wall second (1.00 = one core busy) while the members connect, "
        f"while it idles with all N connected ({holds}; the operator probe's `Status` "
        "calls included), and while the rounds run; *threads*: its peak thread "
        "count.",
        "- *Status*: the operator's `Status` call over a fresh mutual-TLS channel (what "
        f"`fedmosaic status` does once started), every {d.get('status_every', 0.25):g} s, "
        "median / max (s); *`fedmosaic status`*: the whole command (a new Python process), "
        f"every {d.get('cli_every', 15):g} s, median / max (s).", "",
        "| connected | all joined (s) | rounds | round median / max (s) | failed member "
        "calls: refused / connection | server refusals | load |",
        "|---|---|---|---|---|---|---|"]
    rows = sorted(d["rows"], key=lambda r: (r["clients"], r.get("connect_timeout_ms") or 0))
    lines += [_rounds_cells(r) for r in rows]
    lines += ["",
              "| connected | server RSS (MB) | server CPU connect / idle / rounds | server "
              "threads | Status while connecting | Status idle | Status during rounds "
              "| `fedmosaic status` |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [_server_cells(r) for r in rows]
    notes = [n for n in (_row_notes(r) for r in rows) if n]
    lines.append("")
    if any(r.get("client_errors_transport") for r in rows):
        old = [r for r in rows if r.get("connect_timeout_ms") is None
               and str(r.get("commit", "")) in OLD_CONNECT_DEADLINE_COMMITS]
        lines += [
            "Failed connection attempts never reach the service: the server neither refuses "
            "nor counts them, and the member retries as the real client does. "
            + ("Rows measured before commit a14a5f9 used the client's earlier "
               "`grpc.min_reconnect_backoff_ms` = 200, which gRPC core also takes as the "
               "deadline of a connection attempt: attempts timed out on the client's side "
               "while hundreds of handshakes queued. " if old else "")
            + "With gRPC's default deadline (20 s), the calls that failed at 2,500 and 5,000 "
            "members ended CANCELLED, without details, on the members' side while all of them "
            "connected at once with both cores saturated (server and load generators); the "
            "server's log and counters show no refusal, every member then joined and every "
            "round completed. The members' side of these cancellations is not diagnosed "
            "further.", ""]
    if notes:
        lines += ["What failed, by size:", "", *notes, ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- driver


def _git_commit() -> str:
    done = subprocess.run(["git", "log", "-1", "--format=%h"], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    return done.stdout.strip()


def _net_dirty() -> bool:
    """Whether src/fedmosaic/net holds changes not committed (the figures are then of those)."""
    done = subprocess.run(["git", "status", "--porcelain", "--", "src/fedmosaic/net"], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    return bool(done.stdout.strip())


def _setting(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="100,1000,5000",
                        help="comma-separated sizes (connected members)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=100, help="clients_per_round")
    parser.add_argument("--procs", type=int, default=4, help="load-generator processes")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per size")
    parser.add_argument("--hold", type=float, default=10.0,
                        help="seconds the server idles with all N connected before one more "
                             "member joins and the rounds start (0: start at once)")
    parser.add_argument("--status-every", type=float, default=0.25,
                        help="seconds between the operator's Status calls")
    parser.add_argument("--evaluate", type=int, default=0,
                        help="federated evaluation by this many members after each round "
                             "(0: the server evaluates centrally)")
    parser.add_argument("--connect-timeout-ms", type=int, default=None,
                        help="members' grpc.min_reconnect_backoff_ms (default: the real "
                             "client's, gRPC's 20 s)")
    parser.add_argument("--cli-every", type=float, default=15.0,
                        help="seconds between `fedmosaic status` commands (0: none)")
    parser.add_argument("--set", dest="overrides", type=_setting, action="append", default=[],
                        metavar="KEY=VALUE", help="a [server] setting (JSON value)")
    parser.add_argument("--no-save", action="store_true", help="print, do not write results")
    parser.add_argument("--append", action="store_true",
                        help="add the rows to benchmarks/results/load.json instead of "
                             "replacing it (each row keeps its command)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.clients.split(",") if s.strip()]
    if not sizes or min(sizes) < 1 or args.per_round < 1 or args.procs < 1:
        parser.error("--clients, --per-round and --procs must be positive")
    from common import RESULTS, machine, save

    overrides = dict(args.overrides)
    info = machine()
    info["date"] = dt.datetime.now(dt.timezone.utc).isoformat()
    info["load_average_1min"] = os.getloadavg()[0]
    command = "python benchmarks/load.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    rows = []
    payload_commit = _git_commit() + (" (src/fedmosaic/net modified)" if _net_dirty() else "")
    for n in sizes:
        print(f"--- {n} connected", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"load-{n}-") as tmp:
            row = run_size(n, rounds=args.rounds, per_round=min(args.per_round, n),
                           procs=args.procs, workdir=Path(tmp), overrides=overrides,
                           timeout=args.timeout, status_every=args.status_every,
                           cli_every=args.cli_every,
                           connect_timeout_ms=args.connect_timeout_ms, hold=args.hold,
                           evaluate=args.evaluate)
        row["command"], row["commit"] = command, payload_commit
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in (
            "clients", "error", "round_records", "connect", "round_s", "server", "status",
            "members", "client_errors", "server_counters")}, indent=1, default=str),
            flush=True)
    payload = {"command": command, "machine": info, "commit": _git_commit(),
               "net_dirty": _net_dirty(),
               "per_round": args.per_round, "procs": args.procs, "rounds": args.rounds,
               "overrides": overrides, "status_every": args.status_every,
               "cli_every": args.cli_every, "rows": rows}
    previous = RESULTS / f"{RESULTS_NAME}.json"
    if args.append and previous.is_file():
        old = json.loads(previous.read_text())
        payload["rows"] = old["rows"] + rows
        payload["machine"] = old["machine"]  # the first run's; each row has its load
    if not args.no_save:
        print(f"wrote {save(RESULTS_NAME, payload)}")


if __name__ == "__main__":
    main()
