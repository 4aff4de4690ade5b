"""FedBuff vs synchronous FedAvg over gRPC with real client processes of unequal speed (#11).

One real ``fedmosaic server`` and 10 ``fedmosaic client`` processes over mutual TLS on
loopback, on the digits task (10 IID clients, MLP 64-32-10). Each client's local fit is
slowed by a fixed delay, geometric from 0.1 s (client 0) to 1.0 s (client 9): a 10x spread
of speeds, as in the deployment test. Both schedules get the same budget of client updates:

- ``sync``: synchronous FedAvg, all 10 clients per round, ``rounds`` rounds; each round waits
  for its slowest client;
- ``fedbuff``: FedBuff (Nguyen et al. 2022) with ``buffer_size = K`` and ``concurrency = 10``
  for ``rounds * 10 / K`` server steps; a client that finishes gets new work at once.

Reported per schedule: the time served (from the first tasks sent, once all 10 clients have
joined, to each step's ``round N done`` line in the server's log: start-up and joins
excluded for both), the test accuracy after each step, the time to reach the target
accuracy, and the updates contributed by fast and slow clients.

Run: ``.venv/bin/python benchmarks/async_deploy.py`` (about 2 minutes); writes
``benchmarks/results/async_deploy.json``; ``benchmarks/report.py`` renders it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = [f"client_{i:02d}" for i in range(10)]


def delay_of(i: int) -> float:
    """Client i's added fit time: 0.1 s * 10^(i/9), 0.1 to 1.0 s."""
    return round(0.1 * 10 ** (i / 9), 3)


def experiment(path: Path, credentials: Path, *, schedule: str, steps: int, k: int) -> Path:
    strategy = "" if schedule == "sync" else (
        f'\n[strategy]\nschedule = "fedbuff"\nbuffer_size = {k}\nconcurrency = 10\n')
    path.write_text(f"""name = "async-deploy-{schedule}"
seed = 0
rounds = {steps}

[data]
dataset = "digits"

[partition]
method = "iid"
clients = 10

[model]
kind = "mlp"
hidden = [32]

[train]
lr = 0.3
epochs = 1
batch_size = 32

[server]
address = "127.0.0.1"
port = 0
credentials = {json.dumps(str(credentials))}
min_clients = 10
heartbeat_interval = 2.0
round_deadline = 120.0
wait_for_clients = 300.0
linger = 5.0
{strategy}""")
    return path


def run(schedule: str, steps: int, k: int, work: Path, credentials: Path) -> dict[str, Any]:
    exp = experiment(work / f"{schedule}.toml", credentials, schedule=schedule, steps=steps,
                     k=k)
    out = work / f"out-{schedule}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "fedmosaic.cli"]
    logs = work / f"logs-{schedule}"
    logs.mkdir()
    with open(logs / "server.log", "wb") as log:
        server = subprocess.Popen([*cmd, "server", str(exp), "--output", str(out)], cwd=ROOT,
                                  stdout=log, stderr=subprocess.STDOUT, env=env)
    endpoint = out / "endpoint.json"
    deadline = time.monotonic() + 180
    while not endpoint.is_file():
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((logs / "server.log").read_text()[-2000:])
        time.sleep(0.2)
    port = json.loads(endpoint.read_text())["port"]
    clients = {}
    for i, cid in enumerate(CLIENTS):
        with open(logs / f"{cid}.log", "wb") as log:
            clients[cid] = subprocess.Popen(
                [*cmd, "client", "--server", f"127.0.0.1:{port}", "--credentials",
                 str(credentials), "--id", cid, "--config", str(exp), "--trainer",
                 "fedmosaic.faults.hooks:slow_trainer"], cwd=ROOT, stdout=log,
                stderr=subprocess.STDOUT,
                env={**env, "FEDMOSAIC_FAULT_EXPERIMENT": str(exp),
                     "FEDMOSAIC_FAULT_FIT_DELAY": str(delay_of(i))})
    started = time.monotonic()
    if server.wait(timeout=900) != 0:
        raise RuntimeError((logs / "server.log").read_text()[-2000:])
    wall = time.monotonic() - started
    accepted = {}
    for cid, proc in clients.items():
        proc.wait(timeout=120)
        found = re.findall(r"(\d+) updates accepted", (logs / f"{cid}.log").read_text())
        accepted[cid] = int(found[-1]) if found else None
    history = json.loads((out / "metrics.json").read_text())
    # Served time: from the first tasks sent (every client joined: min_clients = 10) to each
    # step's "round N done" log line, so that start-up and joins are excluded for both.
    stamps = {}
    first = None
    for line in (logs / "server.log").read_text().splitlines():
        m = re.match(r"(\S+) INFO \S+: (.*)$", line)
        if m is None:
            continue
        at = dt.datetime.fromisoformat(m.group(1)).timestamp()
        if first is None and " tasks sent" in m.group(2):
            first = at
        done = re.match(r"round (\d+) done", m.group(2))
        if done:
            stamps[int(done.group(1))] = at
    assert first is not None, "no 'tasks sent' line in the server log"
    for r in history:
        r["served_s"] = stamps[r["round"]] - first
    return {"schedule": schedule, "steps": steps, "buffer_size": k if schedule != "sync"
            else 10, "wall_s_from_clients_start": wall,
            "curve": [{"step": r["round"], "served_s": r["served_s"],
                       "updates": r["updates"], "accuracy": r.get("test_accuracy"),
                       "staleness_max": r.get("staleness_max")} for r in history],
            "accepted_by_client": accepted}


def time_to(curve: list[dict[str, Any]], target: float) -> tuple[float | None, int | None]:
    """Served seconds and client updates until the test accuracy first reaches ``target``."""
    updates = 0
    for point in curve:
        updates += point["updates"]
        if point["accuracy"] is not None and point["accuracy"] >= target:
            return point["served_s"], updates
    return None, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20, help="synchronous rounds of 10 updates")
    ap.add_argument("--buffer-size", type=int, default=5)
    ap.add_argument("--target", type=float, default=0.8)
    args = ap.parse_args()
    updates = args.rounds * 10
    if updates % args.buffer_size:
        raise SystemExit("rounds * 10 must be a multiple of --buffer-size")
    from fedmosaic.net.certs import create_federation

    with tempfile.TemporaryDirectory(prefix="async-deploy-") as tmp:
        work = Path(tmp)
        credentials = work / "federation"
        create_federation(credentials, clients=CLIENTS, ca_passphrase=None)
        rows = [run("sync", args.rounds, 10, work, credentials),
                run("fedbuff", updates // args.buffer_size, args.buffer_size, work,
                    credentials)]
    for row in rows:
        row["time_to_target_s"], row["updates_to_target"] = time_to(row["curve"], args.target)
        row["final_accuracy"] = row["curve"][-1]["accuracy"]
        row["served_s"] = row["curve"][-1]["served_s"]
    sync, buff = rows
    speedup = (sync["time_to_target_s"] / buff["time_to_target_s"]
               if sync["time_to_target_s"] and buff["time_to_target_s"] else None)
    payload = {
        "command": "python benchmarks/async_deploy.py " + " ".join(sys.argv[1:]),
        "machine": {**machine(), "date": dt.datetime.now(dt.timezone.utc).isoformat(),
                    "load_average_1min": os.getloadavg()[0]},
        "target": args.target, "delays_s": [delay_of(i) for i in range(10)],
        "rows": rows, "speedup_time_to_target": speedup,
    }
    print(json.dumps({r["schedule"]: {k: r[k] for k in ("served_s", "time_to_target_s",
                                                         "updates_to_target",
                                                         "final_accuracy")} for r in rows},
                     indent=1), "speed-up", speedup)
    save("async_deploy", payload)


def markdown(d: dict[str, Any]) -> str:
    """The docs/benchmarks.md section (called by benchmarks/report.py)."""
    m = d["machine"]
    lines = [
        "## FedBuff vs synchronous FedAvg over gRPC, real clients of unequal speed (issue #11)",
        "",
        "A real `fedmosaic server` and 10 `fedmosaic client` processes over mutual TLS on "
        "loopback, digits (10 IID clients), MLP 64-32-10, lr 0.3, one local epoch. Each "
        "client's fit is slowed by a fixed delay from 0.1 s to 1.0 s (geometric: "
        + ", ".join(f"{x:g}" for x in d["delays_s"]) + " s), a 10x spread. Both runs get the "
        "same budget of client updates: synchronous FedAvg takes all 10 clients per round and "
        "waits for the slowest; FedBuff keeps all 10 training and steps every `buffer_size` "
        "updates. *Served* time: seconds from the first tasks sent (all clients joined) to the "
        "step's `round N done` line in the server log (start-up and joins excluded). Target: "
        f"test accuracy {d['target']:g}.",
        "",
        f"Command: `{d['command'].strip()}`.",
        "",
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, no GPU, torch {m.get('torch')}, "
        f"Python {m.get('python')}, measured {m.get('date', '')[:10]} (1-minute load average "
        f"{m.get('load_average_1min', 0):.1f} at the end: other work shared the cores).",
        "",
        "| schedule | server steps | updates per step | served (s) | time to target (s) | "
        "updates to target | final accuracy | updates by the 5 fastest / 5 slowest clients |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in d["rows"]:
        acc = r["accepted_by_client"]
        ids = sorted(acc)
        fast = sum(acc[c] or 0 for c in ids[:5])
        slow = sum(acc[c] or 0 for c in ids[5:])
        ttt = "not reached" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.1f}"
        utt = "-" if r["updates_to_target"] is None else str(r["updates_to_target"])
        lines.append(f"| {r['schedule']} | {r['steps']} | {r['buffer_size']} | "
                     f"{r['served_s']:.1f} | {ttt} | {utt} | {r['final_accuracy']:.4f} | "
                     f"{fast} / {slow} |")
    if d.get("speedup_time_to_target"):
        lines += ["", f"FedBuff reaches the target {d['speedup_time_to_target']:.1f}x sooner "
                  "in served time. One run each; timings vary with the machine's load."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
