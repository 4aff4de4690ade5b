"""Secure-aggregation modes side by side (issue #12): cost of one secure sum, and the digits
peer task's model under each mode.

Part 1, one round's sum of n client vectors of 100,000 values (uniform in [-1, 1]) at
n = 10 and 100, in one process: per-client time (encode and share / mask), the server's (or
each aggregator's) time, bytes each client uploads, and the largest error of the decoded
sum against the float sum. Modes:

* ``plain``: float32 vectors sent as they are, summed by the server;
* ``secagg+``: the SecAgg+ protocol through its real messages (``secagg.simulate``);
* ``shares-2`` / ``shares-3``: additive secret sharing over 2 or 3 aggregators
  (``privacy.shares``), after the same fixed-point encoding; the aggregators work in
  parallel on their own machines, so the server column is the slowest aggregator's time.

Part 2, the digits peer task (64-64-10 MLP, 100 clients, 10 per round, 30 rounds) under
plain FedAvg, SecAgg+ and secret sharing: median round time, final accuracy and the largest
distance of the final weights from the plain run's.

Run: .venv/bin/python benchmarks/secure_modes.py   (about 2 minutes on 2 cores)
Writes benchmarks/results/secure_modes.json; benchmarks/report.py puts it in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODES = ("plain", "secagg+", "shares-2", "shares-3")


def sum_costs(mode: str, n: int, dim: int, seed: int = 0) -> dict[str, Any]:
    from fedmosaic.privacy.secagg.crypto import DeterministicRandom
    from fedmosaic.privacy.secagg.quantize import Quantizer
    from fedmosaic.privacy.secagg.simulate import secure_sum
    from fedmosaic.privacy.shares import shared_sum

    rng = np.random.default_rng(seed)
    rows = rng.uniform(-1, 1, size=(n, dim))
    want = rows.sum(axis=0)
    if mode == "plain":
        sent = rows.astype(np.float32)
        t0 = time.perf_counter()
        total = sent.sum(axis=0, dtype=np.float64)
        server = time.perf_counter() - t0
        return {"client_s": 0.0, "server_s": server, "bytes_up": dim * 4,
                "max_error": float(np.abs(total - want).max())}
    if mode == "secagg+":
        res = secure_sum(rows, clip=1.0, bits=32, seed=seed)
        return {"client_s": float(res.client_seconds.mean()),
                "server_s": float(res.server_seconds),
                "bytes_up": float(res.bytes_up_per_client.mean()),
                "max_error": float(np.abs(res.sum - want).max())}
    aggregators = int(mode.split("-")[1])
    q = Quantizer(1.0, bits=32, num_clients=n)
    t0 = time.perf_counter()
    encoded = np.stack([q.encode(r, rng) for r in rows])
    encode_s = (time.perf_counter() - t0) / n
    res = shared_sum(encoded, aggregators=aggregators, bits=32,
                     random_bytes=DeterministicRandom(seed, b"bench"))
    return {"client_s": encode_s + float(res.client_seconds.mean()),
            "server_s": max(res.aggregator_seconds) + _combine_s(res, dim),
            "bytes_up": float(res.bytes_up_per_client.mean()),
            "max_error": float(np.abs(q.decode(res.total) - want).max()),
            "error_bound": q.error_bound(n)}


def _combine_s(res: Any, dim: int) -> float:
    """The coordinator's time to add the aggregators' sums (measured again here)."""
    from fedmosaic.privacy.secagg.crypto import MaskAccumulator

    t0 = time.perf_counter()
    acc = MaskAccumulator(dim, 32)
    for s in res.aggregator_sums:
        acc.add(s)
    acc.value()
    return time.perf_counter() - t0


def peer_run(mode: str, rounds: int) -> dict[str, Any]:
    import torch
    from peer_fedmosaic import digits_mlp, peer_partition

    import fedmosaic as fm
    from fedmosaic.data import load_digits
    from fedmosaic.privacy.secagg.transport import SecAggPlusTransport
    from fedmosaic.privacy.shares_transport import SecretSharingTransport

    torch.set_num_threads(1)
    train, test = load_digits()
    fed = peer_partition(train, test, 100, seed=0)
    trainer = fm.TorchTrainer(digits_mlp, lr=0.05, epochs=1, batch_size=32)
    inner = fm.SequentialTransport(trainer, fed)
    weight = float(max(fed.sizes().values()))
    transport: Any = inner
    if mode == "secagg+":
        transport = SecAggPlusTransport(inner, clip=1.0, max_weight=weight)
    elif mode.startswith("shares"):
        transport = SecretSharingTransport(inner, clip=1.0, max_weight=weight,
                                           aggregators=int(mode.split("-")[1]))
    res = fm.simulate(trainer, fed, fm.FedAvg(clients_per_round=10), rounds=rounds, seed=0,
                      transport=transport)
    walls = [r["wall_time"] for r in res.history]
    return {"median_round_s": statistics.median(walls),
            "test_accuracy": res.history[-1]["test_accuracy"],
            "bytes_up_per_round": res.history[-1]["bytes_up"], "weights": res.weights}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--dim", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    from common import machine, save

    sums = []
    for n in args.clients:
        for mode in MODES:
            row = {"mode": mode, "clients": n, "dim": args.dim, **sum_costs(mode, n, args.dim)}
            sums.append(row)
            print(row, flush=True)
    peers = []
    plain_weights = None
    for mode in ("plain", "secagg+", "shares-2", "shares-3"):
        out = peer_run(mode, args.rounds)
        weights = out.pop("weights")
        if plain_weights is None:
            plain_weights = weights
        out["max_weight_diff_vs_plain"] = float((weights - plain_weights).abs().max())
        peers.append({"mode": mode, **out})
        print(peers[-1], flush=True)
    meta = machine()
    meta["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    save("secure_modes", {"machine": meta, "command": "python benchmarks/secure_modes.py",
                          "sums": sums, "peer": peers, "rounds": args.rounds})


def markdown(d: dict[str, Any]) -> str:
    from report import machine_line

    lines = ["## Secure aggregation modes (issue #12)", "", f"Command: `{d['command']}`", "",
             machine_line(d["machine"]), "",
             "One round's secure sum of n vectors of 100,000 values in [-1, 1] (32-bit ring), "
             "all parties in one process through the real messages. Client: mean seconds per "
             "client to encode and share or mask; server: the server's seconds (for shares, "
             "the slowest aggregator's, as they run on separate machines, plus combining "
             "their sums); bytes up: per client.", "",
             "| n | mode | client s | server s | bytes up per client | x plain bytes | "
             "max error of the sum |", "|---:|---|---:|---:|---:|---:|---:|"]
    plain = {r["clients"]: r for r in d["sums"] if r["mode"] == "plain"}
    for r in d["sums"]:
        ratio = r["bytes_up"] / plain[r["clients"]]["bytes_up"]
        lines.append(f"| {r['clients']} | {r['mode']} | {r['client_s']:.4f} | "
                     f"{r['server_s']:.4f} | {r['bytes_up']:,.0f} | {ratio:.3f} | "
                     f"{r['max_error']:.1e} |")
    lines += ["", f"The digits peer task (MLP 64-64-10, 100 clients, 10 per round, "
              f"{d['rounds']} rounds, sequential training) under each mode:", "",
              "| mode | median round s | final accuracy | bytes up per round | "
              "max weight difference vs plain |", "|---|---:|---:|---:|---:|"]
    for r in d["peer"]:
        lines.append(f"| {r['mode']} | {r['median_round_s']:.3f} | {r['test_accuracy']:.4f} | "
                     f"{r['bytes_up_per_round']:,} | {r['max_weight_diff_vs_plain']:.1e} |")
    base = next(r for r in d["peer"] if r["mode"] == "plain")["median_round_s"]
    for r in d["peer"]:
        if r["mode"].startswith("shares"):
            lines.append("")
            lines.append(f"- `{r['mode']}`: a round takes {r['median_round_s'] / base:.2f}x "
                         "the plain round (goal: under 1.5x).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
