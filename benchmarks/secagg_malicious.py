"""What SecAgg+'s malicious-server defences cost: signatures and the consistency round.

One simulated SecAgg+ round of ``--clients`` clients (default 100) with vectors of ``--dim``
values, through the real message encoding and the real client and server objects
(``fedmosaic.privacy.secagg``), every client with a fresh ECDSA P-256 signing key and a
simulated PKI (as ``secure_sum`` does; certificates are not parsed here -- a deployment adds
one certificate check per roster entry, cached). Measured per client and round:

* signatures: time in ``SigningIdentity.sign`` (2 per client: advertised keys, survivor
  set) and in ``verify_signature`` (every other roster entry, then consistency signatures
  until each neighbour has t verified ones from its own neighbours), with their counts;
* the consistency round: bytes of ``ConsistencyRequest`` + ``ConsistencySignature`` and of
  the survivor set and signatures the ``UnmaskRequest`` carries, and client and server time
  of that round;
* the signed roster: bytes of the ``KeysBroadcast`` (every member's signed keys, O(n));
* the whole round, for scale.

Run: .venv/bin/python benchmarks/secagg_malicious.py --clients 100 --dim 100000 --rounds 3
(writes benchmarks/results/secagg_malicious.json and the measured section of
docs/security.md; ``--doc-only`` rewrites the section from the saved JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS, machine, replace_doc_section, save

import fedmosaic.privacy.secagg.protocol as protocol
from fedmosaic.privacy.secagg import (
    SecAggBounds,
    SecAggPlusClient,
    SecAggPlusServer,
    SigningIdentity,
    StaticPki,
    decode_message,
)
from fedmosaic.privacy.secagg.messages import Message, UnmaskRequest
from fedmosaic.privacy.secagg.simulate import make_config

DOC = Path(__file__).parents[1] / "docs" / "security.md"
HEADING = "## Measured: cost of the malicious-server defences of SecAgg+"
STAGES = ("advertise", "share_keys", "masked_input", "consistency", "unmask")


class Meter:
    """Wall time and calls of the signing and verification functions, per stage."""

    def __init__(self) -> None:
        self.stage = ""
        self.side = "client"
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            tick = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                key = f"{self.side}/{kind}/{self.stage}"
                self.seconds[key] += time.perf_counter() - tick
                self.calls[key] += 1
        return timed


def one_round(n: int, dim: int, meter: Meter) -> dict[str, Any]:
    config = make_config(n, dim)
    signers = [SigningIdentity.generate(f"client/{u}") for u in range(n)]
    pki = StaticPki({s.identity: s.public_key for s in signers})
    bounds = SecAggBounds()
    # An honest server verifies every signature too (as the gRPC driver does).
    server = SecAggPlusServer(config, [s.identity for s in signers], verifier=pki)
    clients = [SecAggPlusClient(u, signer=signers[u], verifier=pki, bounds=bounds)
               for u in range(n)]
    x = np.random.default_rng(0).integers(0, 2**32, size=(n, dim), dtype=np.uint64)
    x = x.astype(np.uint32)
    up, down = defaultdict(int), defaultdict(int)
    client_s, server_s = defaultdict(float), defaultdict(float)
    extra_unmask_bytes = 0

    def exchange(stage: str, outgoing: Mapping[int, Message]) -> None:
        nonlocal extra_unmask_bytes
        meter.stage = stage
        for u, message in outgoing.items():
            data = message.to_bytes()
            down[stage] += len(data)
            if isinstance(message, UnmaskRequest):
                # What the consistency check adds to the unmask request: U3 and signatures.
                extra_unmask_bytes += 4 * len(message.survivors) + sum(
                    4 + 4 + len(sig) for _, sig in message.signatures)
            tick = time.perf_counter()
            reply = clients[u].handle(decode_message(data), x[u]).to_bytes()
            tock = time.perf_counter()
            client_s[stage] += tock - tick
            up[stage] += len(reply)
            meter.side = "server"
            server.receive(decode_message(reply))
            meter.side = "client"
            server_s[stage] += time.perf_counter() - tock

    def close(stage: str, step: Callable[[], Mapping[int, Message]]) -> Mapping[int, Message]:
        meter.stage = stage
        tick = time.perf_counter()
        out = step()
        server_s[stage] += time.perf_counter() - tick
        return out

    exchange("advertise", dict.fromkeys(range(n), server.setup_message()))
    exchange("share_keys", close("share_keys", server.broadcast_keys))
    exchange("masked_input", close("masked_input", server.route_shares))
    exchange("consistency", close("consistency", server.request_consistency))
    exchange("unmask", close("unmask", server.request_unmask))
    result = close("finalize", server.finalize)
    assert result.total.tolist() == (x.astype(np.uint64).sum(axis=0) % 2**32).tolist()
    return {"degree": config.degree, "threshold": config.threshold,
            "up": dict(up), "down": dict(down), "client_s": dict(client_s),
            "server_s": dict(server_s), "extra_unmask_bytes": extra_unmask_bytes}


def micro(repeats: int = 200) -> dict[str, float]:
    """One P-256 sign and one verify, median of ``repeats`` (the unit costs)."""
    signer = SigningIdentity.generate("client/0")
    data = bytes(200)
    sig = signer.sign(data)
    signs, verifies = [], []
    for _ in range(repeats):
        tick = time.perf_counter()
        signer.sign(data)
        signs.append(time.perf_counter() - tick)
        tick = time.perf_counter()
        protocol.verify_signature(signer.public_key, sig, data)
        verifies.append(time.perf_counter() - tick)
    return {"sign_ms": 1e3 * float(np.median(signs)),
            "verify_ms": 1e3 * float(np.median(verifies))}


def measure(n: int, dim: int, rounds: int) -> dict[str, Any]:
    meter = Meter()
    original_sign = SigningIdentity.sign
    original_verify = protocol.verify_signature
    SigningIdentity.sign = meter.wrap("sign", original_sign)  # type: ignore[method-assign]
    protocol.verify_signature = meter.wrap("verify", original_verify)
    try:
        runs = [one_round(n, dim, meter) for _ in range(rounds)]
    finally:
        SigningIdentity.sign = original_sign  # type: ignore[method-assign]
        protocol.verify_signature = original_verify
    per = n * rounds

    def mean(key: str) -> dict[str, float]:
        return {s: sum(r[key].get(s, 0.0) for r in runs) / (per if key != "server_s"
                                                             else rounds)
                for s in (*STAGES, "finalize")}

    client_s, server_s = mean("client_s"), mean("server_s")
    up, down = mean("up"), mean("down")
    sign_s = sum(v for k, v in meter.seconds.items() if k.startswith("client/sign/")) / per
    verify_s = sum(v for k, v in meter.seconds.items() if k.startswith("client/verify/")) / per
    signs = sum(v for k, v in meter.calls.items() if k.startswith("client/sign/")) / per
    verifies = sum(v for k, v in meter.calls.items() if k.startswith("client/verify/")) / per
    server_verify_s = sum(v for k, v in meter.seconds.items()
                          if k.startswith("server/verify/")) / rounds
    consistency_bytes = (up["consistency"] + down["consistency"]
                         + sum(r["extra_unmask_bytes"] for r in runs) / per)
    consistency_client = (client_s["consistency"]
                          + meter.seconds["client/verify/unmask"] / per)
    total_client = sum(client_s[s] for s in STAGES)
    total_bytes = sum(up[s] + down[s] for s in STAGES)
    return {
        "clients": n, "dim": dim, "rounds": rounds,
        "degree": runs[0]["degree"], "threshold": runs[0]["threshold"],
        "unit": micro(),
        "per_client": {
            "sign_seconds": sign_s, "signs": signs,
            "verify_seconds": verify_s, "verifies": verifies,
            "consistency_bytes": consistency_bytes,
            "consistency_client_seconds": consistency_client,
            "roster_bytes": down["share_keys"],
            "round_client_seconds": total_client, "round_bytes": total_bytes,
            "client_seconds_by_stage": {s: client_s[s] for s in STAGES},
            "bytes_up_by_stage": {s: up[s] for s in STAGES},
            "bytes_down_by_stage": {s: down[s] for s in STAGES},
        },
        "server": {"seconds_by_stage": server_s, "verify_seconds": server_verify_s},
    }


def markdown(d: dict[str, Any]) -> str:
    p, u, m = d["per_client"], d["unit"], d["machine"]
    sig_share = (p["sign_seconds"] + p["verify_seconds"]) / p["round_client_seconds"]
    cons_share = p["consistency_bytes"] / p["round_bytes"]
    lines = [
        HEADING,
        "",
        f"One simulated SecAgg+ round, n = {d['clients']} clients, {d['dim']:,} values each "
        f"(k = {d['degree']}, t = {d['threshold']}, the parameters for gamma = 0.2 and "
        f"delta = 0.1), mean of {d['rounds']} rounds per client; {m.get('cpu', '?')}, "
        f"{m.get('cores', '?')} cores. Command: `.venv/bin/python benchmarks/secagg_malicious.py"
        f" --clients {d['clients']} --dim {d['dim']} --rounds {d['rounds']}`.",
        "",
        "| cost per client and round | measured |",
        "|---|---|",
        f"| ECDSA P-256 signatures made | {p['signs']:.0f}, {1e3 * p['sign_seconds']:.2f} ms "
        f"({u['sign_ms']:.3f} ms each) |",
        f"| signatures verified (roster + consistency) | {p['verifies']:.0f}, "
        f"{1e3 * p['verify_seconds']:.1f} ms ({u['verify_ms']:.3f} ms each) |",
        f"| signed roster (`KeysBroadcast`, every member's keys: O(n)) | "
        f"{p['roster_bytes'] / 1024:.1f} KiB down |",
        f"| consistency round (survivor set, signature, signatures relayed) | "
        f"{p['consistency_bytes'] / 1024:.1f} KiB, "
        f"{1e3 * p['consistency_client_seconds']:.1f} ms client time |",
        f"| whole round | {p['round_bytes'] / 1024:.0f} KiB, "
        f"{1e3 * p['round_client_seconds']:.0f} ms client time |",
        "",
        f"Signing and verifying take {100 * sig_share:.0f}% of a client's time in the round; "
        f"the consistency round adds {100 * cons_share:.1f}% of its bytes. The server spends "
        f"{1e3 * d['server']['seconds_by_stage']['consistency']:.0f} ms closing the masked "
        "stage and collecting the signatures, and "
        f"{1e3 * d['server']['verify_seconds']:.0f} ms per round verifying every "
        "advertisement and consistency signature itself (so that one member with a bad "
        "signature is dropped, not the round). Verification dominates: every client checks "
        "its neighbours' roster signatures at once and, lazily, the roster entries and "
        "consistency signatures of its neighbours' neighbours until t of each verify (the "
        "roster's graph seed is bound into every share and consistency signature, so members "
        "with different views share nothing); at this size that is most of the members, at "
        "larger n a shrinking fraction. A deployment also parses and checks one certificate "
        "per verified member (cached per run).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--dim", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--doc-only", action="store_true")
    args = ap.parse_args()
    if args.doc_only:
        d = json.loads((RESULTS / "secagg_malicious.json").read_text())
    else:
        d = {**measure(args.clients, args.dim, args.rounds), "machine": machine()}
        save("secagg_malicious", d)
    replace_doc_section(DOC, HEADING, markdown(d))
    print(markdown(d))


if __name__ == "__main__":
    main()
