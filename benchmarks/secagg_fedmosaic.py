"""fedmosaic's SecAgg+ on its own: one secure sum of ``--clients`` vectors of ``--dim`` float32
values, through the real message encoding, timing client and server work separately and
counting every byte. The vectors are fixed per client (no training), so only the protocol is
measured -- the same work benchmarks/flower_secagg.py gives Flower's SecAggPlusWorkflow.

What runs is the protocol as deployed, with its defaults: the version secure against a
malicious server. Every client signs its AdvertiseKeys (ECDSA P-256) and verifies the signed
advertisement of every member of the roster the server relays (n - 1 signatures, so this part
of a client's work grows linearly in n), every survivor signs the survivor set in the
consistency round, and before unmasking each client verifies those signatures until every
neighbour it holds shares of has t valid ones from its own neighbours (each signature at most
once). ``k``/``t`` come from ``secagg_plus_parameters`` for the clients' default tolerance
(gamma = 0.2 corrupted clients colluding with the server, delta = 0.1 dropouts; k = 42, t = 32
at n = 100). The clients' long-term signing keys are generated before the round and not timed
(in a deployment they are certified once, not per round); everything else -- key agreement,
Shamir sharing, share encryption, masking, signing and verifying -- is in the client and server
timings. Keys and masks come from the OS CSPRNG.

Run: .venv/bin/python benchmarks/secagg_fedmosaic.py --clients 100 --dim 100000 --out r.json
(benchmarks/secagg_compare.py runs it next to Flower.)
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from fedmosaic.privacy.secagg.simulate import DEFAULT_CORRUPTED_FRACTION, secure_sum


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, required=True)
    ap.add_argument("--dim", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.0, help="fraction that drops")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    vectors = rng.uniform(-1, 1, (args.clients, args.dim)).astype(np.float32)
    plan = None
    if args.dropout > 0:
        dropped = rng.choice(args.clients, int(args.dropout * args.clients), replace=False)
        plan = {"masked_input": {int(c) for c in dropped}}
    rounds, client_s, client_wall_s, server_s, err = [], [], [], [], []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        # No seed: keys and masks from the OS CSPRNG, as in a deployment. No threshold or
        # degree either: the defaults, which the clients' default bounds accept.
        res = secure_sum(vectors, clip=1.0, bits=32, dropout=plan,
                         dropout_rate=max(0.1, args.dropout))
        rounds.append(time.perf_counter() - t0)
        participants = np.count_nonzero(res.bytes_up_per_client)
        # CPU time per client, as Flower's runner reports it (benchmarks/flower_secagg.py);
        # wall time too, for the like-for-like wall comparison.
        client_s.append(float(res.client_cpu_seconds.sum()) / participants)
        client_wall_s.append(float(res.client_seconds.sum()) / participants)
        server_s.append(res.server_seconds)
        want = vectors[res.survivors].astype(np.float64).sum(axis=0)
        err.append(float(np.abs(res.sum - want).max()))
        up = int(res.bytes_up_per_client.max())
        down = int(res.bytes_down_per_client.max())
        print(f"round {r + 1}: {rounds[-1]:.2f}s (client {client_s[-1]:.4f}s CPU / "
              f"{client_wall_s[-1]:.4f}s wall each, server "
              f"{server_s[-1]:.3f}s), {up:,} B up / {down:,} B down per client, "
              f"k={res.degree} t={res.threshold}, max error {err[-1]:.2e}", flush=True)
    with open(args.out, "w") as fh:
        json.dump({"framework": "fedmosaic", "clients": args.clients, "dim": args.dim,
                   "round_seconds": rounds,
                   "client_seconds_per_client": float(np.median(client_s)),
                   "client_wall_seconds_per_client": float(np.median(client_wall_s)),
                   "server_seconds": float(np.median(server_s)),
                   "bytes_up_per_client": up, "bytes_down_per_client": down,
                   "degree": res.degree, "threshold": res.threshold,
                   "protocol": {
                       "variant": "SecAgg+ secure against a malicious server (defaults)",
                       "signed_advertise_keys": "ECDSA P-256, each verified by every member",
                       "consistency_round": True,
                       "corrupted_fraction": DEFAULT_CORRUPTED_FRACTION,
                       "dropout_rate": max(0.1, args.dropout),
                   },
                   "max_abs_error": max(err)}, fh, indent=1)


if __name__ == "__main__":
    main()
