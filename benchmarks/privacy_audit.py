"""Empirical privacy audit of DP-FedAvg (issue #20, item 5): lower bound vs accounted epsilon.

Canary clients (Andrew et al. 2024) are inserted into the digits peer task, each with
probability 1/2 (Steinke, Nasr and Jagielski 2023), and the audit reports the 95% lower bound
on epsilon and the Gaussian-fit estimate next to the accountant's epsilon, for:

- DP-FedAvg with a fixed clip (Poisson sampling, add/remove);
- DP-FedAvg with adaptive clipping (Andrew et al. 2021, target quantile 0.5);
- DP-FedAvg with fixed-size cohorts (replace-one; excluded canaries are mirrored);
- an under-noised mechanism (benchmark-only subclass): the accountant charges for the noise
  multiplier z, but the sum receives z / 10. The audit must show a lower bound above its
  claimed epsilon.

Run: .venv/bin/python benchmarks/privacy_audit.py   (about 4 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, save

from fedmosaic.audit.privacy_audit import audit_privacy, largest_lower_bound
from fedmosaic.data import IID, load_digits, partition
from fedmosaic.models import build_model
from fedmosaic.privacy.dp_fedavg import DPFedAvg
from fedmosaic.train import TorchTrainer


class UnderNoisedDPFedAvg(DPFedAvg):
    """Benchmark-only broken mechanism: accounted for z, noised with z / factor."""

    factor = 10.0

    def update_noise_multiplier(self, population: int) -> float:
        return super().update_noise_multiplier(population) / self.factor


CONFIGS: dict[str, tuple[type[DPFedAvg], dict[str, Any]]] = {
    "dp-fedavg": (DPFedAvg, {"sampling": "poisson", "rate": 0.1}),
    "dp-fedavg, adaptive clip": (DPFedAvg, {"sampling": "poisson", "rate": 0.1,
                                            "adaptive_clip_quantile": 0.5}),
    "dp-fedavg, fixed cohorts": (DPFedAvg, {"sampling": "fixed", "clients_per_round": 150}),
    "under-noised (z/10)": (UnderNoisedDPFedAvg, {"sampling": "poisson", "rate": 0.1}),
}


def run(name: str, target: float, *, clients: int, canaries: int, rounds: int,
        seed: int) -> dict[str, Any]:
    cls, sampling = CONFIGS[name]
    train, test = load_digits(seed=0)
    fed = partition(train, IID(), clients, 0, test=test, name="digits")
    trainer = TorchTrainer(partial(build_model, "mlp", (64,), 10, hidden=(64,)),
                           "cross_entropy", lr=0.05, epochs=1, batch_size=32)
    strategy = cls(clip=0.2, delta=1e-5, target_epsilon=target, rounds=rounds, **sampling)
    start = time.perf_counter()
    report = audit_privacy(trainer, fed, strategy, rounds, canaries=canaries, seed=seed)
    seconds = time.perf_counter() - start
    s = report.steinke
    row = {"config": name, "target_epsilon": target,
           "accounted_epsilon": report.accounted_epsilon,
           "lower_bound": s.epsilon_lower_bound, "confidence": s.confidence,
           "score": s.score, "guesses": s.guesses, "correct": s.correct,
           "guesses_in": s.guesses_in, "guesses_out": s.guesses_out, "tests": s.tests,
           "andrew_estimate": report.andrew_epsilon_estimate,
           "andrew_equal_variance_estimate": report.andrew_equal_variance_estimate,
           "inserted": report.inserted, "violation": report.violation,
           "largest_possible_bound": report.largest_possible_bound,
           "noise_multiplier": report.settings.get("noise_multiplier"),
           "seconds": seconds}
    print(f"{name:28s} target {target:4.1f}: accounted {row['accounted_epsilon']:.3f}  lower "
          f"bound {row['lower_bound']:.3f} ({s.correct}/{s.guesses}, {s.score})  estimate "
          f"{row['andrew_estimate']:.3f} / {row['andrew_equal_variance_estimate']:.3f}  "
          f"{seconds:.1f} s", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--canaries", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--targets", default="1,2,4,8")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    targets = [float(t) for t in args.targets.split(",")]
    rows = [run(name, t, clients=args.clients, canaries=args.canaries, rounds=args.rounds,
                seed=args.seed) for name in CONFIGS for t in targets]
    cmd = "python benchmarks/privacy_audit.py"
    if (args.clients, args.canaries, args.rounds, args.targets, args.seed) != (
            1000, 1000, 50, "1,2,4,8", 0):
        cmd += (f" --clients {args.clients} --canaries {args.canaries} --rounds {args.rounds}"
                f" --targets {args.targets} --seed {args.seed}")
    path = save("privacy_audit", {
        "command": cmd,
        "machine": {**machine(), "date": dt.datetime.now(dt.UTC).isoformat()},
        "settings": {"data": "digits peer task (1,437 train samples), IID", "clients":
                     args.clients, "canaries": args.canaries, "rounds": args.rounds,
                     "model": "MLP 64-64-10", "clip": 0.2, "delta": 1e-5, "lr": 0.05,
                     "seed": args.seed, "canary_norm": "1000 x clip",
                     "largest_possible_bound": largest_lower_bound(args.canaries, 1e-5, 0.95,
                                                                   scores=2)},
        "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
