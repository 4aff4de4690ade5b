"""Side-by-side benchmark of fedmosaic, Flower 1.42 and pfl-research 0.6 on the peer tasks.

Run with the project's venv:

    .venv/bin/python benchmarks/peer_compare.py                     # digits, all shared configs
    .venv/bin/python benchmarks/peer_compare.py --configs 10/10/5,100/100/3 --repeat 3
    .venv/bin/python benchmarks/peer_compare.py --with-large --frameworks fedmosaic-batched
    .venv/bin/python benchmarks/peer_compare.py --setup-flower --setup-pfl  # build the peers' venvs
    .venv/bin/python benchmarks/peer_compare.py --task fmnist-cnn   # the compute-bound task (#23)

Tasks: ``digits`` (issue #3: sklearn digits, MLP 64-64-10; results in
benchmarks/results/peer_compare.json) and ``fmnist-cnn`` (issue #23: Fashion-MNIST 60,000 /
10,000, IID, the 18,378-parameter CNN of benchmarks/compute_task.py; results in
benchmarks/results/compute_compare.json).

Every (configuration, framework) run is its own subprocess:

  * flower               benchmarks/.venv-flower/bin/python benchmarks/flower_peer.py ...
                         (Ray backend, one actor per core, 1 torch thread each)
  * pfl                  benchmarks/.venv-pfl/bin/python benchmarks/pfl_peer.py ... (one process)
  * pfl-2proc            benchmarks/.venv-pfl/bin/torchrun --standalone --nnodes=1
                         --nproc_per_node=2 benchmarks/pfl_peer.py ... (pfl's documented
                         multi-process simulation: one process per core)
  * fedmosaic-<t>        .venv/bin/python benchmarks/peer_fedmosaic.py ... --transport <t>, for
                         t in default (no transport given: fedmosaic's own choice), auto,
                         parallel, sequential, batched
  * reference            .venv/bin/python benchmarks/reference_peer.py ...: plain PyTorch, one
                         model, clients one after another, FedAvg by hand; it also reports the
                         seconds of its forward + backward passes alone (the compute floor)

The driver stamps time.time() just before spawning the runner and samples, every 50 ms until
it exits, the resident memory summed over the runner's whole process tree (the runner and all
its descendants: Ray's gcs_server, raylet, workers, ...), keeping the maximum. The runner
writes a JSON result (framework, version, clients, per_round, rounds, first_round_start_unix,
round_seconds, accuracy, final_accuracy). From it:

  * median round s  the median of round_seconds (each round: training + aggregation + the
                    server-side evaluation of the global model on the 360 test images);
  * start-up s      first_round_start_unix - spawn time (interpreter, imports, data, engine);
  * peak RSS MB     the maximum over samples of the tree's summed RSS (shared pages such as
                    libtorch count once per process; "peak PSS MB", sampled every 0.5 s,
                    shares them out instead);
  * speed-up        a peer's median round time / this framework's, per configuration
                    (vs Flower, pfl, pfl-2proc and the reference);
  * CPU / wall      CPU seconds of the runner's whole process tree during its rounds (from
                    the first round's start to the last round's end, sampled every 50 ms)
                    over those rounds' wall seconds: about 1 for one busy core, 2 for two.

Raw numbers and a description of the machine go to the task's results JSON; a Markdown table
is printed. The machine is shared: the system-wide CPU use just before each run
is recorded, and --idle-wait makes the driver wait for a quiet machine first.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FLOWER_VENV = HERE / ".venv-flower"
FLOWER_PYTHON = FLOWER_VENV / "bin" / "python"
SETUP_FLOWER = HERE / "setup_flower_venv.sh"
PFL_VENV = HERE / ".venv-pfl"
PFL_PYTHON = PFL_VENV / "bin" / "python"
PFL_TORCHRUN = PFL_VENV / "bin" / "torchrun"
SETUP_PFL = HERE / "setup_pfl_venv.sh"
RESULTS_JSON = HERE / "results" / "peer_compare.json"
TASKS = ("digits", "fmnist-cnn")
RESULTS = {"digits": RESULTS_JSON, "fmnist-cnn": HERE / "results" / "compute_compare.json"}

SHARED_CONFIGS = ("10/10/5", "100/10/5", "100/100/3", "1000/100/2", "1000/1000/2")
LARGE_CONFIGS = ("10000/1000/2", "10000/10000/2")  # fedmosaic only
# The compute-bound task: 3 rounds (the median drops round 1's one-off costs), 2 at 1000/1000.
COMPUTE_CONFIGS = ("100/10/3", "100/100/3", "1000/100/3", "1000/1000/2")
TASK_CONFIGS = {"digits": SHARED_CONFIGS, "fmnist-cnn": COMPUTE_CONFIGS}
FEDMOSAIC_TRANSPORTS = ("default", "auto", "parallel", "sequential", "batched")
FRAMEWORKS = (
    "flower", "pfl", "pfl-2proc", *(f"fedmosaic-{t}" for t in FEDMOSAIC_TRANSPORTS), "reference",
)  # fmt: skip
DEFAULT_FRAMEWORKS = {
    "digits": ("flower", "pfl", "fedmosaic-default", "fedmosaic-batched", "fedmosaic-sequential"),
    "fmnist-cnn": (
        "flower", "pfl", "pfl-2proc", "fedmosaic-default", "fedmosaic-parallel",
        "fedmosaic-sequential", "fedmosaic-batched", "reference",
    ),
}  # fmt: skip
PEERS = ("flower", "pfl", "pfl-2proc", "reference")  # the baselines speed-ups are given against
# The digits task has 1,437 samples; the peers run N <= 1000 only (fedmosaic tiles beyond).
PEER_MAX_CLIENTS = {"digits": 1000, "fmnist-cnn": 60_000}
FLOWER_MAX_CLIENTS = PEER_MAX_CLIENTS["digits"]

SAMPLE_S = 0.05
PSS_EVERY_S = 0.5
GRACE_S = 10.0  # how long leftover descendants get to exit by themselves after the runner


@dataclass(frozen=True)
class Config:
    clients: int
    per_round: int
    rounds: int

    @classmethod
    def parse(cls, text: str) -> Config:
        try:
            n, k, r = (int(part) for part in text.strip().split("/"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad configuration {text!r}: want N/K/R") from None
        if not (1 <= k <= n and r >= 1):
            raise argparse.ArgumentTypeError(f"bad configuration {text!r}: need 1 <= K <= N")
        return cls(n, k, r)

    def __str__(self) -> str:
        return f"{self.clients}/{self.per_round}/{self.rounds}"


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def dist_version(name: str, python: Path | None = None) -> str | None:
    """A distribution's version, in this interpreter or (without importing it) in another."""
    if python is None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    if not python.exists():
        return None
    code = f"import importlib.metadata as m; print(m.version({name!r}))"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    vm = psutil.virtual_memory()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(vm.total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": dist_version("torch"),
        "fedmosaic": dist_version("fedmosaic"),
        "flower_venv_python": str(FLOWER_PYTHON) if FLOWER_PYTHON.exists() else None,
        "flwr": dist_version("flwr", FLOWER_PYTHON),
        "ray_in_flower_venv": dist_version("ray", FLOWER_PYTHON),
        "torch_in_flower_venv": dist_version("torch", FLOWER_PYTHON),
        "pfl_venv_python": str(PFL_PYTHON) if PFL_PYTHON.exists() else None,
        "pfl": dist_version("pfl", PFL_PYTHON),
        "torch_in_pfl_venv": dist_version("torch", PFL_PYTHON),
        "loadavg_at_start": os.getloadavg(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- one run


def runner_command(
    framework: str, cfg: Config, seed: int, out: Path, task_name: str = "digits"
) -> list[str]:
    task = [
        "--task", task_name,
        "--clients", str(cfg.clients),
        "--per-round", str(cfg.per_round),
        "--rounds", str(cfg.rounds),
        "--seed", str(seed),
        "--out", str(out),
    ]  # fmt: skip
    if framework == "flower":
        return [str(FLOWER_PYTHON), str(HERE / "flower_peer.py"), *task]
    if framework == "pfl":
        return [str(PFL_PYTHON), str(HERE / "pfl_peer.py"), *task]
    if framework == "pfl-2proc":
        launch = [str(PFL_TORCHRUN), "--standalone", "--nnodes=1", "--nproc_per_node=2"]
        return [*launch, str(HERE / "pfl_peer.py"), *task]
    main_python = ROOT / ".venv" / "bin" / "python"
    python = str(main_python) if main_python.exists() else sys.executable
    if framework == "reference":
        return [python, str(HERE / "reference_peer.py"), *task]
    transport = framework.removeprefix("fedmosaic-")
    return [python, str(HERE / "peer_fedmosaic.py"), *task, "--transport", transport]


def system_cpu_busy(seconds: float = 1.0) -> float:
    """System-wide CPU use in percent over the next ``seconds`` (others' load included)."""
    return psutil.cpu_percent(interval=seconds)


def wait_for_idle(max_wait_s: float, threshold_pct: float = 15.0) -> float:
    """Wait (at most max_wait_s) until the machine is quiet; returns the last CPU reading."""
    deadline = time.monotonic() + max_wait_s
    busy = system_cpu_busy()
    while busy > threshold_pct and time.monotonic() < deadline:
        busy = system_cpu_busy(2.0)
    return busy


class TreeSampler:
    """Samples the summed RSS (and, less often, PSS) of a process and all its descendants."""

    def __init__(self, root_pid: int) -> None:
        self.root = psutil.Process(root_pid)
        self.seen: dict[int, psutil.Process] = {root_pid: self.root}
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_root_rss = 0
        self.peak_procs = 0
        self.samples = 0
        self._last_pss = 0.0
        self.cpu_s: dict[int, float] = {}  # pid -> last seen user+system CPU seconds
        # (time.time(), CPU seconds of the tree so far: exited processes keep their last value)
        self.cpu_series: list[tuple[float, float]] = []

    def tree(self) -> list[psutil.Process]:
        try:
            kids = self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        procs = [self.root, *kids]
        for p in kids:
            # keep the first Process object seen for a pid: it remembers the create time,
            # so psutil refuses to signal a recycled pid later
            self.seen.setdefault(p.pid, p)
        return procs

    def sample(self) -> None:
        procs = self.tree()
        if not procs:
            return
        rss = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                r = p.memory_info().rss
                rss += r
                if p.pid == self.root.pid:
                    self.peak_root_rss = max(self.peak_root_rss, r)
                t = p.cpu_times()
                self.cpu_s[p.pid] = t.user + t.system
        self.cpu_series.append((time.time(), sum(self.cpu_s.values())))
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_procs = max(self.peak_procs, len(procs))
        self.samples += 1
        now = time.monotonic()
        if now - self._last_pss >= PSS_EVERY_S:
            self._last_pss = now
            pss = 0
            for p in procs:
                with contextlib.suppress(psutil.Error, AttributeError):
                    pss += p.memory_full_info().pss
            self.peak_pss = max(self.peak_pss, pss)

    def survivors(self) -> list[psutil.Process]:
        return [p for p in self.seen.values() if p.pid != self.root.pid and p.is_running()]


def reap(procs: Iterable[psutil.Process], grace_s: float) -> int:
    """Wait for procs to exit; SIGTERM then SIGKILL whatever is left. Returns how many."""
    procs = list(procs)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    if not alive:
        return 0
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, still = psutil.wait_procs(alive, timeout=3)
    for p in still:
        with contextlib.suppress(psutil.Error):
            p.kill()
    return len(alive)


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores, all processes) so far."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def own_cpu_s() -> tuple[float, float]:
    """(this driver's CPU seconds, those of its waited-for descendants)."""
    t = psutil.Process().cpu_times()
    return t.user + t.system, t.children_user + t.children_system


def cpu_at(series: list[tuple[float, float]], t: float) -> float | None:
    """The tree's CPU seconds at time t, interpolated between the samples around it."""
    if not series or t < series[0][0] or t > series[-1][0]:
        return None
    for (t0, c0), (t1, c1) in itertools.pairwise(series):
        if t0 <= t <= t1:
            return c0 if t1 == t0 else c0 + (c1 - c0) * (t - t0) / (t1 - t0)
    return series[-1][1]


def run_one(
    framework: str,
    cfg: Config,
    seed: int,
    timeout_s: float,
    workdir: Path,
    idle_wait_s: float,
    task_name: str = "digits",
) -> dict[str, Any]:
    tag = f"{framework}-{cfg.clients}-{cfg.per_round}-{cfg.rounds}-{time.monotonic_ns()}"
    out = workdir / f"{tag}.json"
    log_path = workdir / f"{tag}.log"
    cmd = runner_command(framework, cfg, seed, out, task_name)
    busy = wait_for_idle(idle_wait_s) if idle_wait_s > 0 else system_cpu_busy()
    record: dict[str, Any] = {
        "framework": framework,
        "task": task_name,
        "config": str(cfg),
        "clients": cfg.clients,
        "per_round": cfg.per_round,
        "rounds": cfg.rounds,
        "seed": seed,
        "command": cmd,
        "cpu_busy_before_pct": busy,
        "loadavg_before": os.getloadavg(),
    }
    with log_path.open("wb") as log:
        machine_cpu0, own_cpu0 = busy_cpu_s(), own_cpu_s()
        spawn = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid)
        deadline = time.monotonic() + timeout_s
        timed_out = False
        while proc.poll() is None:
            sampler.sample()
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(SAMPLE_S)
        if timed_out:
            sampler.tree()
            reap([sampler.root, *sampler.survivors()], grace_s=0)
            proc.wait()
        exit_time = time.time()
        machine_cpu = busy_cpu_s() - machine_cpu0
        own_cpu1 = own_cpu_s()
        own_cpu = own_cpu1[0] - own_cpu0[0]
    # CPU that neither the runner's tree nor this driver used during the run: other people's
    # work on a shared machine. Runs with much of it have suspect timings. The tree's CPU is
    # what its waited-for processes reported to us, or the sum of the last samples of each
    # process if larger (orphans are not reported; the last ~50 ms of a process are not
    # sampled): a lower bound either way, so "foreign" errs high.
    tree_cpu = max(sum(sampler.cpu_s.values()), own_cpu1[1] - own_cpu0[1])
    foreign = max(machine_cpu - tree_cpu - own_cpu, 0.0)
    capacity = (exit_time - spawn) * (os.cpu_count() or 1)
    record["runner_cpu_s"] = tree_cpu
    record["driver_cpu_s"] = own_cpu
    record["foreign_cpu_pct"] = 100 * foreign / capacity if capacity > 0 else 0.0
    record["returncode"] = proc.returncode
    record["spawn_unix"] = spawn
    record["exit_unix"] = exit_time
    record["wall_s"] = exit_time - spawn
    record["peak_rss_mb"] = sampler.peak_rss / 2**20
    record["peak_pss_mb"] = sampler.peak_pss / 2**20 if sampler.peak_pss else None
    record["peak_root_rss_mb"] = sampler.peak_root_rss / 2**20
    record["peak_processes"] = sampler.peak_procs
    record["rss_samples"] = sampler.samples
    # Whatever the runner left behind (a Ray node that did not shut down) is ours to end.
    record["stragglers_reaped"] = reap(sampler.survivors(), GRACE_S)

    if timed_out or proc.returncode != 0 or not out.exists():
        why = "timed out" if timed_out else f"exit code {proc.returncode}"
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        record["error"] = why
        record["log_tail"] = tail
        print(f"  !! {framework} {cfg}: {why}; last lines of its output:", file=sys.stderr)
        for line in tail:
            print(f"     {line}", file=sys.stderr)
        return record

    result = json.loads(out.read_text())
    record["result"] = result
    rounds = [float(s) for s in result["round_seconds"]]
    record["median_round_s"] = statistics.median(rounds)
    # rounds 2..R alone: free of whatever one-off work a runner leaves in round 1
    record["steady_round_s"] = statistics.median(rounds[1:]) if len(rounds) > 1 else None
    record["startup_s"] = float(result["first_round_start_unix"]) - spawn
    record["final_accuracy"] = float(result["final_accuracy"])
    record["version"] = result.get("version")
    rounds_end = float(
        result.get("last_round_end_unix") or float(result["first_round_start_unix"]) + sum(rounds)
    )
    record["shutdown_s"] = exit_time - rounds_end
    if result.get("floor_seconds"):
        record["floor_round_s"] = statistics.median(float(s) for s in result["floor_seconds"])
    if result.get("eval_seconds"):
        record["eval_round_s"] = statistics.median(float(s) for s in result["eval_seconds"])
    cpu0 = cpu_at(sampler.cpu_series, float(result["first_round_start_unix"]))
    cpu1 = cpu_at(sampler.cpu_series, rounds_end)
    if cpu0 is not None and cpu1 is not None and sum(rounds) > 0:
        record["rounds_cpu_s"] = cpu1 - cpu0
        record["cpu_per_wall"] = (cpu1 - cpu0) / sum(rounds)
    return record


# --------------------------------------------------------------------------- summary


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (config, framework): medians over the repeats that succeeded."""
    rows: list[dict[str, Any]] = []
    keys: list[tuple[str, str]] = []
    for r in runs:
        if (r["config"], r["framework"]) not in keys:
            keys.append((r["config"], r["framework"]))
    for config, framework in keys:
        ok = [
            r
            for r in runs
            if r["config"] == config and r["framework"] == framework and "error" not in r
        ]
        row: dict[str, Any] = {"config": config, "framework": framework, "runs": len(ok)}
        if ok:
            for key in ("median_round_s", "startup_s", "peak_rss_mb", "final_accuracy"):
                row[key] = statistics.median(r[key] for r in ok)
            for key in ("floor_round_s", "eval_round_s", "cpu_per_wall"):
                vals = [r[key] for r in ok if r.get(key) is not None]
                row[key] = statistics.median(vals) if vals else None
            row["rounds"] = ok[0]["rounds"]
            row["loadavg_before"] = [r["loadavg_before"] for r in ok]
            record = ok[0]["result"].get("transport_record")
            if record:
                row["transport_record"] = record
            steady = [r["steady_round_s"] for r in ok if r.get("steady_round_s") is not None]
            row["steady_round_s"] = statistics.median(steady) if steady else None
            pss = [r["peak_pss_mb"] for r in ok if r.get("peak_pss_mb")]
            row["peak_pss_mb"] = statistics.median(pss) if pss else None
        rows.append(row)
    for peer in PEERS:
        base = {
            row["config"]: row["median_round_s"]
            for row in rows
            if row["framework"] == peer and "median_round_s" in row
        }
        key = f"speedup_vs_{peer.replace('-', '_')}"
        for row in rows:
            if row["framework"] != peer and row["config"] in base and "median_round_s" in row:
                row[key] = base[row["config"]] / row["median_round_s"]
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| config N/K/R | framework | median round s | floor s | CPU/wall | start-up s "
        "| peak RSS MB | final acc | vs Flower | vs pfl | vs pfl-2proc | vs reference |"
    )
    lines = [head, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]

    def cell(value: float | None, fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    for row in rows:
        if row["runs"] == 0:
            lines.append(f"| {row['config']} | {row['framework']} | failed |" + " |" * 9)
            continue
        speeds = []
        for peer in PEERS:
            if row["framework"] == peer:
                speeds.append("1.00×")
            else:
                v = row.get(f"speedup_vs_{peer.replace('-', '_')}")
                speeds.append("—" if v is None else f"{v:.2f}×")
        lines.append(
            f"| {row['config']} | {row['framework']} | {row['median_round_s']:.3f} "
            f"| {cell(row.get('floor_round_s'), '.3f')} | {cell(row.get('cpu_per_wall'), '.2f')} "
            f"| {row['startup_s']:.2f} | {row['peak_rss_mb']:.0f} | {row['final_accuracy']:.4f} "
            f"| {' | '.join(speeds)} |"
        )
    return "\n".join(lines)


def save(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="fedmosaic vs Flower 1.42 on the peer task",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--task", choices=TASKS, default="digits", help="which peer task")
    p.add_argument(
        "--configs",
        type=lambda s: [Config.parse(c) for c in s.split(",") if c.strip()],
        default=None,
        help=f"comma-separated N/K/R list (default: digits {','.join(SHARED_CONFIGS)}; "
        f"fmnist-cnn {','.join(COMPUTE_CONFIGS)})",
    )
    p.add_argument(
        "--with-large",
        action="store_true",
        help=f"add the fedmosaic-only configurations {','.join(LARGE_CONFIGS)}",
    )
    p.add_argument(
        "--frameworks",
        type=lambda s: [f.strip() for f in s.split(",") if f.strip()],
        default=None,
        help=f"comma-separated subset of {','.join(FRAMEWORKS)} (default: digits "
        f"{','.join(DEFAULT_FRAMEWORKS['digits'])}; fmnist-cnn "
        f"{','.join(DEFAULT_FRAMEWORKS['fmnist-cnn'])})",
    )
    p.add_argument("--repeat", type=int, default=1, help="runs per (config, framework)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--retries", type=int, default=1, help="reruns of a run that failed (kept in the JSON)"
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument(
        "--idle-wait",
        type=float,
        default=0.0,
        help="before each run, wait up to this many seconds for the CPUs to be quiet",
    )
    p.add_argument(
        "--setup-flower", action="store_true", help="run setup_flower_venv.sh before anything"
    )
    p.add_argument(
        "--setup-pfl", action="store_true", help="run setup_pfl_venv.sh before anything"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="where to write the JSON (default: per task)"
    )
    p.add_argument(
        "--append",
        action="store_true",
        help="keep the runs already in --out, replacing only the planned (config, framework)",
    )
    args = p.parse_args(argv)
    if args.frameworks is None:
        args.frameworks = list(DEFAULT_FRAMEWORKS[args.task])
    if args.out is None:
        args.out = RESULTS[args.task]
    unknown = [f for f in args.frameworks if f not in FRAMEWORKS]
    if unknown:
        p.error(f"unknown framework(s) {unknown}; choose from {FRAMEWORKS}")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configs: list[Config] = args.configs or [Config.parse(c) for c in TASK_CONFIGS[args.task]]
    if args.with_large:
        configs += [Config.parse(c) for c in LARGE_CONFIGS if Config.parse(c) not in configs]
    frameworks: list[str] = list(args.frameworks)
    notes: list[str] = []

    if "flower" in frameworks:
        if args.setup_flower:
            subprocess.run(["bash", str(SETUP_FLOWER)], check=True)
        if not FLOWER_PYTHON.exists():
            msg = (
                f"Flower skipped: {FLOWER_VENV} does not exist; "
                "run with --setup-flower (or bash benchmarks/setup_flower_venv.sh) first"
            )
            print(msg, file=sys.stderr)
            notes.append(msg)
            frameworks.remove("flower")
    if any(f.startswith("pfl") for f in frameworks):
        if args.setup_pfl:
            subprocess.run(["bash", str(SETUP_PFL)], check=True)
        if not PFL_PYTHON.exists():
            msg = (
                f"pfl skipped: {PFL_VENV} does not exist; "
                "run with --setup-pfl (or bash benchmarks/setup_pfl_venv.sh) first"
            )
            print(msg, file=sys.stderr)
            notes.append(msg)
            frameworks = [f for f in frameworks if not f.startswith("pfl")]
    if (
        any(f.startswith("fedmosaic") for f in frameworks)
        and not (HERE / "peer_fedmosaic.py").exists()
    ):
        msg = "fedmosaic skipped: benchmarks/peer_fedmosaic.py does not exist"
        print(msg, file=sys.stderr)
        notes.append(msg)
        frameworks = [f for f in frameworks if not f.startswith("fedmosaic")]
    if not frameworks:
        print("nothing to run", file=sys.stderr)
        return 2

    peer_max = PEER_MAX_CLIENTS[args.task]
    plan = [
        (cfg, rep, fw)
        for cfg in configs
        for rep in range(args.repeat)
        for fw in frameworks
        if fw.startswith("fedmosaic") or cfg.clients <= peer_max
    ]
    skipped = sorted({str(cfg) for cfg in configs if cfg.clients > peer_max})
    if skipped and any(not f.startswith("fedmosaic") for f in frameworks):
        notes.append(
            f"Flower, pfl and the reference not run for {', '.join(skipped)} "
            "(fedmosaic-only configurations)"
        )

    payload: dict[str, Any] = {
        "benchmark": f"peer task {args.task}: fedmosaic vs Flower and pfl "
        "(see benchmarks/peer_compare.py)",
        "task": args.task,
        "command": " ".join(
            [".venv/bin/python", "benchmarks/peer_compare.py", *(argv or sys.argv[1:])]
        ),
        "machine": machine_info(),
        "settings": {
            "configs": [str(c) for c in configs],
            "frameworks": frameworks,
            "repeat": args.repeat,
            "seed": args.seed,
            "timeout_s": args.timeout,
            "rss_sample_s": SAMPLE_S,
            "pss_sample_s": PSS_EVERY_S,
        },
        "notes": notes,
        "runs": [],
        "summary": [],
    }
    if args.append and args.out.exists():
        # Add to (or redo part of) an earlier result: its runs of the planned (configuration,
        # framework) pairs are replaced, the others kept; each invocation is recorded.
        old = json.loads(args.out.read_text())
        if old.get("task", "digits") != args.task:
            print(f"--append: {args.out} holds task {old.get('task')!r}", file=sys.stderr)
            return 2
        planned = {(str(cfg), fw) for cfg, _, fw in plan}
        invocations = old.get("invocations") or [
            {k: old.get(k) for k in ("command", "machine", "settings")}
        ]
        invocations.append({k: payload[k] for k in ("command", "machine", "settings")})
        payload["invocations"] = invocations
        payload["command"] = " && ".join(i["command"] for i in invocations if i.get("command"))
        payload["machine"] = old.get("machine", payload["machine"])
        payload["notes"] = old.get("notes", []) + notes
        payload["runs"] = [r for r in old.get("runs", [])
                           if (r["config"], r["framework"]) not in planned]
        if old.get("failed_attempts"):
            payload["failed_attempts"] = old["failed_attempts"]
    print(f"machine: {payload['machine']['cpu']}, {payload['machine']['cores']} cores")
    with tempfile.TemporaryDirectory(prefix="peer_compare_") as tmp:
        for i, (cfg, rep, fw) in enumerate(plan, 1):
            print(f"[{i}/{len(plan)}] {cfg} {fw} (repeat {rep + 1}/{args.repeat}) ...", flush=True)
            rec = run_one(fw, cfg, args.seed, args.timeout, Path(tmp), args.idle_wait, args.task)
            for attempt in range(args.retries):
                if "error" not in rec:
                    break
                # Kept, and said in the notes: a run that failed is part of the record.
                payload.setdefault("failed_attempts", []).append(rec)
                payload["notes"].append(
                    f"{cfg} {fw}: attempt {attempt + 1} failed ({rec['error']}); run again"
                )
                print(f"    retrying {cfg} {fw} ...", flush=True)
                rec = run_one(fw, cfg, args.seed, args.timeout, Path(tmp), args.idle_wait,
                              args.task)
            rec["repeat"] = rep
            payload["runs"].append(rec)
            if "error" not in rec:
                print(
                    f"    median round {rec['median_round_s']:.3f} s, start-up "
                    f"{rec['startup_s']:.2f} s, peak RSS {rec['peak_rss_mb']:.0f} MB, "
                    f"final acc {rec['final_accuracy']:.4f}, CPU/wall "
                    f"{rec.get('cpu_per_wall') or float('nan'):.2f} (others' CPU before / "
                    f"during: {rec['cpu_busy_before_pct']:.0f}% / {rec['foreign_cpu_pct']:.0f}%; "
                    f"load {rec['loadavg_before'][0]:.1f})",
                    flush=True,
                )
            payload["summary"] = summarise(payload["runs"])
            save(args.out, payload)  # after every run, so an interrupted benchmark keeps data

    busy = [
        f"{r['config']} {r['framework']}"
        for r in payload["runs"]
        if r["cpu_busy_before_pct"] > 25 or r["foreign_cpu_pct"] > 10
    ]
    if busy:
        msg = (
            f"other processes used the CPUs before (>25%) or during (>10%) these runs, so "
            f"their timings are suspect: {'; '.join(busy)}. Rerun with --idle-wait 120."
        )
        payload["notes"].append(msg)
        save(args.out, payload)
    print()
    print(markdown(payload["summary"]))
    for note in payload["notes"]:
        print(f"\nnote: {note}")
    print(f"\nraw results: {args.out}")
    failed = [r for r in payload["runs"] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
