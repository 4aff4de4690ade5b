"""Secure aggregation side by side: fedmosaic's SecAgg+ and Flower 1.42's SecAgg+ (and plain).

Run with the project's venv:

    .venv/bin/python benchmarks/secagg_compare.py                          # n = 100 and 1000
    .venv/bin/python benchmarks/secagg_compare.py --clients 100 --dim 10000
    .venv/bin/python benchmarks/secagg_compare.py --rounds-at 1000=1 --frameworks flower-secagg+

The task: each of n clients holds a fixed float32 vector of --dim values in [-1, 1]; every
client takes part in every round and the server must obtain their mean. No training happens,
so only the aggregation protocol is measured. Every (n, framework) run is its own subprocess:

  * flower-plain    benchmarks/.venv-flower/bin/python benchmarks/flower_secagg.py --plain ...
  * flower-secagg+  benchmarks/.venv-flower/bin/python benchmarks/flower_secagg.py ...
                    (SecAggPlusWorkflow + secaggplus_mod; see that file for the parameters
                    and for exactly what its timings and byte counts contain)
  * fedmosaic       .venv/bin/python benchmarks/secagg_fedmosaic.py --clients N --dim D
                    --out FILE (skipped, with a note, while that script does not exist)

As in peer_compare.py, the driver samples every 50 ms the resident memory summed over the
runner's whole process tree (Ray's processes included) and keeps the maximum, and records
how much CPU other processes used meanwhile. Each runner writes a JSON result with at least
framework, clients, dim, round_seconds, client_seconds_per_client, server_seconds,
bytes_up_per_client, bytes_down_per_client and max_abs_error. The table shows:

  * round s          the median of round_seconds (with --repeats, the median over the
                     repeated runs of each run's median; client and server s likewise);
  * client s         client-side protocol CPU time per client and round (Flower: inside
                     secaggplus_mod; fedmosaic: process CPU time around each client's
                     message handling); "—" for plain FedAvg, which has no protocol. Both
                     runners also report the wall time (client_wall_s in the summary);
  * server s         server-side protocol time per round (Flower: the fit workflow's wall
                     time minus the time spent waiting in grid.send_and_receive);
  * bytes up/down    per client and round (Flower: the records in the messages' content);
  * peak RSS MB      the maximum over samples of the process tree's summed RSS;
  * fedmosaic speed-up  Flower SecAgg+'s round s / fedmosaic's round s, same n;
  * SecAgg+/plain    Flower SecAgg+'s round s / Flower plain's round s, same n.

The two SecAgg+ implementations do not run the same protocol. fedmosaic runs its default,
secure against a malicious server: signed key advertisements that every member verifies, a
signed consistency round before unmasking, and k/t chosen for gamma = 0.2 corrupted clients
and delta = 0.1 dropouts (k = 42, t = 32 at n = 100). Flower's SecAgg+ is the semi-honest
protocol (no signatures, no consistency round) with num_shares 15 and threshold 10 at
n = 100 (see flower_secagg.py). So the comparison is of fedmosaic's stronger protocol
against Flower's weaker one; benchmarks/secagg_malicious.py measures what the defences cost.

Raw numbers and a description of the machine go to benchmarks/results/secagg_compare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from peer_compare import (  # noqa: E402  (the directory must be on sys.path first)
    FLOWER_PYTHON,
    FLOWER_VENV,
    GRACE_S,
    SAMPLE_S,
    SETUP_FLOWER,
    TreeSampler,
    busy_cpu_s,
    machine_info,
    own_cpu_s,
    reap,
    save,
    system_cpu_busy,
    wait_for_idle,
)

ROOT = HERE.parent
RESULTS_JSON = HERE / "results" / "secagg_compare.json"
FLOWER_RUNNER = HERE / "flower_secagg.py"
FEDMOSAIC_RUNNER = HERE / "secagg_fedmosaic.py"
FRAMEWORKS = ("flower-plain", "flower-secagg+", "fedmosaic")
REQUIRED_KEYS = (
    "framework",
    "clients",
    "dim",
    "round_seconds",
    "client_seconds_per_client",
    "server_seconds",
    "bytes_up_per_client",
    "bytes_down_per_client",
    "max_abs_error",
)


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated integers, got {text!r}") from None
    if not values or min(values) < 3:
        raise argparse.ArgumentTypeError("need client counts of at least 3")
    return values


def rounds_overrides(text: str) -> dict[int, int]:
    """'1000=1,5000=1' -> {1000: 1, 5000: 1}."""
    out: dict[int, int] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            n, r = (int(v) for v in part.split("="))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad override {part!r}: want N=ROUNDS") from None
        out[n] = r
    return out


# --------------------------------------------------------------------------- one run


def runner_command(
    framework: str, n: int, dim: int, rounds: int, out: Path, args: argparse.Namespace
) -> list[str]:
    if framework == "fedmosaic":
        main_python = ROOT / ".venv" / "bin" / "python"
        python = str(main_python) if main_python.exists() else sys.executable
        extra = shlex.split(args.fedmosaic_args) if args.fedmosaic_args else []
        return [
            python, str(FEDMOSAIC_RUNNER), "--clients", str(n), "--dim", str(dim),
            "--out", str(out), *extra,
        ]  # fmt: skip
    cmd = [
        str(FLOWER_PYTHON), str(FLOWER_RUNNER), "--clients", str(n), "--dim", str(dim),
        "--rounds", str(rounds), "--seed", str(args.seed), "--out", str(out),
    ]  # fmt: skip
    if framework == "flower-plain":
        return [*cmd, "--plain"]
    return [*cmd, "--num-shares", args.num_shares, "--threshold", args.threshold]


def run_one(
    framework: str, n: int, dim: int, rounds: int, workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    tag = f"{framework}-{n}-{dim}-{time.monotonic_ns()}"
    out = workdir / f"{tag}.json"
    log_path = workdir / f"{tag}.log"
    cmd = runner_command(framework, n, dim, rounds, out, args)
    busy = wait_for_idle(args.idle_wait) if args.idle_wait > 0 else system_cpu_busy()
    record: dict[str, Any] = {
        "framework": framework,
        "clients": n,
        "dim": dim,
        "rounds_requested": rounds if framework != "fedmosaic" else None,
        "command": cmd,
        "cpu_busy_before_pct": busy,
        "loadavg_before": os.getloadavg(),
    }
    with log_path.open("wb") as log:
        machine_cpu0, own_cpu0 = busy_cpu_s(), own_cpu_s()
        spawn = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid)
        deadline = time.monotonic() + args.timeout
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
    # CPU used by neither the runner's tree nor this driver: others' work on a shared machine
    # (a lower bound on the tree's CPU, so this errs high; see peer_compare.run_one).
    tree_cpu = max(sum(sampler.cpu_s.values()), own_cpu1[1] - own_cpu0[1])
    foreign = max(machine_cpu - tree_cpu - (own_cpu1[0] - own_cpu0[0]), 0.0)
    capacity = (exit_time - spawn) * (os.cpu_count() or 1)
    record.update(
        runner_cpu_s=tree_cpu,
        foreign_cpu_pct=100 * foreign / capacity if capacity > 0 else 0.0,
        returncode=proc.returncode,
        spawn_unix=spawn,
        exit_unix=exit_time,
        wall_s=exit_time - spawn,
        peak_rss_mb=sampler.peak_rss / 2**20,
        peak_pss_mb=sampler.peak_pss / 2**20 if sampler.peak_pss else None,
        peak_root_rss_mb=sampler.peak_root_rss / 2**20,
        peak_processes=sampler.peak_procs,
        rss_samples=sampler.samples,
    )
    # Whatever the runner left behind (a Ray node that did not shut down) is ours to end.
    record["stragglers_reaped"] = reap(sampler.survivors(), GRACE_S)

    result: dict[str, Any] | None = None
    if out.exists():
        try:
            result = json.loads(out.read_text())
        except json.JSONDecodeError as e:
            record["error"] = f"unreadable result: {e}"
    missing = [k for k in REQUIRED_KEYS if result is not None and k not in result]
    # flower_secagg.py exits 3 after writing its result when the aggregate is wrong: keep it
    if timed_out or result is None or missing or proc.returncode not in (0, 3):
        why = (
            "timed out"
            if timed_out
            else f"result lacks {missing}"
            if missing
            else f"exit code {proc.returncode}"
        )
        record.setdefault("error", why)
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        record["log_tail"] = tail
        print(f"  !! {framework} n={n}: {record['error']}; last lines of its output:")
        for line in tail:
            print(f"     {line}")
        if result is not None:
            record["result"] = result
        return record
    assert result is not None
    record["result"] = result
    rounds_s = [float(s) for s in result["round_seconds"]]
    record["median_round_s"] = statistics.median(rounds_s)
    if "first_round_start_unix" in result:
        record["startup_s"] = float(result["first_round_start_unix"]) - spawn
    if result.get("correct") is False or proc.returncode == 3:
        record["incorrect"] = True
    return record


# --------------------------------------------------------------------------- summary


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (n, framework): the median over its repeated runs of each timing."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["clients"], r["framework"]), []).append(r)
    rows: list[dict[str, Any]] = []
    for (n, fw), group in groups.items():
        row: dict[str, Any] = {"clients": n, "framework": fw}
        ok = [r for r in group if "error" not in r]
        if not ok:
            row["error"] = group[-1]["error"]
            rows.append(row)
            continue
        res = [r["result"] for r in ok]
        med = statistics.median
        row.update(
            dim=res[0]["dim"],
            rounds=len(res[0]["round_seconds"]),
            repeats=len(ok),
            round_s=med(r["median_round_s"] for r in ok),
            round_s_per_repeat=[r["median_round_s"] for r in ok],
            client_s=med(float(x["client_seconds_per_client"]) for x in res),
            client_s_per_repeat=[float(x["client_seconds_per_client"]) for x in res],
            client_wall_s=med(float(x.get("client_wall_seconds_per_client", 0.0)) for x in res),
            server_s=med(float(x["server_seconds"]) for x in res),
            bytes_up=int(res[0]["bytes_up_per_client"]),
            bytes_down=int(res[0]["bytes_down_per_client"]),
            peak_rss_mb=max(r["peak_rss_mb"] for r in ok),
            max_abs_error=max(float(x["max_abs_error"]) for x in res),
            correct=not any(r.get("incorrect", False) for r in ok),
            # How loaded the shared machine was: before each run (busy %, 1-min load average)
            # and during it (CPU used by processes outside the run's tree, % of all cores).
            cpu_busy_before_pct_max=max(r["cpu_busy_before_pct"] for r in ok),
            loadavg_before_max=max(r["loadavg_before"][0] for r in ok),
            foreign_cpu_pct_max=max(r.get("foreign_cpu_pct", 0.0) for r in ok),
        )
        row.update(protocol_parameters(res[0]))
        if len(ok) < len(group):
            row["failed_repeats"] = len(group) - len(ok)
        rows.append(row)
    by_key = {(row["clients"], row["framework"]): row for row in rows if "round_s" in row}
    for row in rows:
        secagg = by_key.get((row["clients"], "flower-secagg+"))
        plain = by_key.get((row["clients"], "flower-plain"))
        if "round_s" not in row:
            continue
        if row["framework"] == "fedmosaic" and secagg:
            row["speedup_vs_flower_secagg"] = secagg["round_s"] / row["round_s"]
        if row["framework"] == "flower-secagg+" and plain:
            row["secagg_over_plain"] = row["round_s"] / plain["round_s"]
    return rows


def protocol_parameters(result: dict[str, Any]) -> dict[str, Any]:
    """The secret-sharing parameters a run used, each under its framework's own definition.

    fedmosaic: degree k (neighbours a client shares with; it keeps no share of its own) and
    threshold t, plus the protocol variant. Flower: num_shares (including the share a client
    keeps) and reconstruction_threshold.
    """
    if result.get("framework") == "fedmosaic":
        out: dict[str, Any] = {"degree": result.get("degree"), "threshold": result.get("threshold")}
        if "protocol" in result:
            out["protocol"] = result["protocol"]
        return out
    secagg = result.get("secagg")
    if isinstance(secagg, dict) and "num_shares" in secagg:
        return {
            "num_shares": secagg["num_shares"],
            "reconstruction_threshold": secagg.get("reconstruction_threshold"),
        }
    return {}


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| n | framework | round s | client s (per client) | server s | bytes up/client "
        "| bytes down/client | peak RSS MB | fedmosaic speed-up vs Flower SecAgg+ "
        "| Flower SecAgg+/plain | max abs err |"
    )
    lines = [head, "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for row in rows:
        if "error" in row:
            lines.append(
                f"| {row['clients']} | {row['framework']} | failed: {row['error']} "
                "| | | | | | | | |"
            )
            continue
        client = "—" if row["framework"] == "flower-plain" else f"{row['client_s']:.4f}"
        speed = (
            f"{row['speedup_vs_flower_secagg']:.1f}×" if "speedup_vs_flower_secagg" in row else ""
        )
        ratio = f"{row['secagg_over_plain']:.1f}×" if "secagg_over_plain" in row else ""
        err = f"{row['max_abs_error']:.2g}" + ("" if row["correct"] else " (WRONG)")
        name = f"{row['framework']} (R={row['rounds']})"
        lines.append(
            f"| {row['clients']} | {name} | {row['round_s']:.3f} | {client} "
            f"| {row['server_s']:.3f} | {row['bytes_up']:,} | {row['bytes_down']:,} "
            f"| {row['peak_rss_mb']:.0f} | {speed} | {ratio} | {err} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="fedmosaic's SecAgg+ vs Flower 1.42's SecAgg+ and plain FedAvg",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(__doc__ or "").split("\n\n", 1)[1],
    )
    p.add_argument("--clients", type=int_list, default=[100, 1000], help="comma-separated n")
    p.add_argument("--dim", type=int, default=100_000, help="values per client vector")
    p.add_argument("--rounds", type=int, default=2, help="rounds per Flower run")
    p.add_argument(
        "--rounds-at",
        type=rounds_overrides,
        default={},
        help="per-n Flower round counts, e.g. 1000=1 (overrides --rounds for that n)",
    )
    p.add_argument(
        "--repeats", type=int, default=1,
        help="runs of each (n, framework), in alternating order; the table shows medians",
    )
    p.add_argument(
        "--repeats-at",
        type=rounds_overrides,
        default={},
        help="per-n repeat counts, e.g. 100=3 (overrides --repeats for that n)",
    )
    p.add_argument(
        "--frameworks",
        type=lambda s: [f.strip() for f in s.split(",") if f.strip()],
        default=list(FRAMEWORKS),
        help=f"comma-separated subset of {','.join(FRAMEWORKS)} (default: all)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--num-shares", default="log", help="Flower SecAgg+ num_shares: log | all | integer"
    )
    p.add_argument(
        "--threshold", default="0.6667", help="Flower SecAgg+ threshold: fraction or integer"
    )
    p.add_argument(
        "--fedmosaic-args", default="", help="extra arguments for secagg_fedmosaic.py (quoted)"
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    p.add_argument(
        "--idle-wait",
        type=float,
        default=0.0,
        help="before each run, wait up to this many seconds for the CPUs to be quiet",
    )
    p.add_argument(
        "--setup-flower", action="store_true", help="run setup_flower_venv.sh before anything"
    )
    p.add_argument("--out", type=Path, default=RESULTS_JSON, help="where to write the JSON")
    args = p.parse_args(argv)
    unknown = [f for f in args.frameworks if f not in FRAMEWORKS]
    if unknown:
        p.error(f"unknown framework(s) {unknown}; choose from {FRAMEWORKS}")
    if args.dim < 1 or args.rounds < 1 or args.repeats < 1:
        p.error("need --dim >= 1, --rounds >= 1 and --repeats >= 1")
    if any(v < 1 for v in args.repeats_at.values()):
        p.error("--repeats-at counts must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    frameworks: list[str] = list(args.frameworks)
    notes: list[str] = []

    if any(f.startswith("flower") for f in frameworks):
        if args.setup_flower:
            subprocess.run(["bash", str(SETUP_FLOWER)], check=True)
        if not FLOWER_PYTHON.exists():
            msg = (
                f"Flower skipped: {FLOWER_VENV} does not exist; "
                "run with --setup-flower (or bash benchmarks/setup_flower_venv.sh) first"
            )
            print(msg, file=sys.stderr)
            notes.append(msg)
            frameworks = [f for f in frameworks if not f.startswith("flower")]
    if "fedmosaic" in frameworks and not FEDMOSAIC_RUNNER.exists():
        msg = (
            "fedmosaic skipped: benchmarks/secagg_fedmosaic.py does not exist yet "
            "(contract: --clients N --dim D --out FILE writing framework, clients, dim, "
            "round_seconds, client_seconds_per_client, server_seconds, bytes_up_per_client, "
            "bytes_down_per_client, max_abs_error)"
        )
        print(msg, file=sys.stderr)
        notes.append(msg)
        frameworks.remove("fedmosaic")
    if not frameworks:
        print("nothing to run", file=sys.stderr)
        return 2
    for n, r in sorted(args.rounds_at.items()):
        if n in args.clients and any(f.startswith("flower") for f in frameworks):
            notes.append(f"Flower runs at n={n} use {r} round(s) (--rounds-at)")

    # Repeats alternate the order of the frameworks, so that neither always runs first on a
    # machine still settling after the previous run (Ray's processes, page cache).
    order = [fw for fw in FRAMEWORKS if fw in frameworks]
    plan = [
        (n, fw)
        for n in args.clients
        for rep in range(args.repeats_at.get(n, args.repeats))
        for fw in (order if rep % 2 == 0 else order[::-1])
    ]
    payload: dict[str, Any] = {
        "benchmark": "secure aggregation: fedmosaic SecAgg+ vs Flower 1.42 SecAgg+ / plain "
        "(see benchmarks/secagg_compare.py)",
        "machine": machine_info(),
        "settings": {
            "clients": args.clients,
            "dim": args.dim,
            "rounds": args.rounds,
            "rounds_at": {str(k): v for k, v in args.rounds_at.items()},
            "repeats": args.repeats,
            "repeats_at": {str(k): v for k, v in args.repeats_at.items()},
            "frameworks": frameworks,
            "seed": args.seed,
            "flower_num_shares": args.num_shares,
            "flower_threshold": args.threshold,
            "fedmosaic_args": args.fedmosaic_args,
            "timeout_s": args.timeout,
            "rss_sample_s": SAMPLE_S,
            "argv": shlex.join(sys.argv[1:] if argv is None else argv),
        },
        "notes": notes,
        "runs": [],
        "summary": [],
    }
    print(f"machine: {payload['machine']['cpu']}, {payload['machine']['cores']} cores")
    with tempfile.TemporaryDirectory(prefix="secagg_compare_") as tmp:
        for i, (n, fw) in enumerate(plan, 1):
            rounds = args.rounds_at.get(n, args.rounds)
            print(f"[{i}/{len(plan)}] n={n} dim={args.dim} {fw} ...", flush=True)
            rec = run_one(fw, n, args.dim, rounds, Path(tmp), args)
            payload["runs"].append(rec)
            if "error" not in rec:
                res = rec["result"]
                print(
                    f"    rounds {[round(float(s), 3) for s in res['round_seconds']]} s, "
                    f"client {float(res['client_seconds_per_client']):.4f} s, server "
                    f"{float(res['server_seconds']):.3f} s, peak RSS {rec['peak_rss_mb']:.0f} MB, "
                    f"max err {float(res['max_abs_error']):.2g} (others' CPU before / during: "
                    f"{rec['cpu_busy_before_pct']:.0f}% / {rec['foreign_cpu_pct']:.0f}%)",
                    flush=True,
                )
            payload["summary"] = summarise(payload["runs"])
            save(args.out, payload)  # after every run, so an interrupted benchmark keeps data

    busy = [
        f"n={r['clients']} {r['framework']}"
        for r in payload["runs"]
        if r["cpu_busy_before_pct"] > 25 or r.get("foreign_cpu_pct", 0.0) > 10
    ]
    if busy:
        payload["notes"].append(
            "other processes used the CPUs before (>25%) or during (>10%) these runs, so "
            f"their timings are suspect: {'; '.join(busy)}. Rerun with --idle-wait 120."
        )
    wrong = [f"n={r['clients']} {r['framework']}" for r in payload["runs"] if r.get("incorrect")]
    if wrong:
        payload["notes"].append(f"aggregate outside its error bound: {'; '.join(wrong)}")
    save(args.out, payload)
    print()
    print(markdown(payload["summary"]))
    for note in payload["notes"]:
        print(f"\nnote: {note}")
    print(f"\nraw results: {args.out}")
    failed = [r for r in payload["runs"] if "error" in r or r.get("incorrect")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
