"""Attacks x defences (issue #6): final test accuracy of every simulated attack against
every Byzantine-robust rule, anomaly detection and plain FedAvg.

Set-up: scikit-learn digits (1,437 train / 360 test, the default split), 50 clients, IID
(a seeded permutation cut into equal parts), every client in every round; 10 of them (20%)
malicious, chosen by ``choose_malicious(ids, 0.2, seed)`` and the same in every cell. MLP
64-64-10; each client 5 local epochs of plain SGD (lr 0.1, batch 16); 30 rounds; clients
trained by ``BatchedTransport`` (the same model as sequential training up to rounding).

Attacks (``fedmosaic.attacks``, default parameters): label flipping (every label l -> 9-l),
sign flipping (-1 x the honest update), Gaussian noise (N(0, 1) per coordinate), the scaled
model-replacement backdoor (2x2 trigger in the bottom-right corner, target class 0, half of
each attacker's samples poisoned, gamma = n / m = 5), ALIE (z_max(50, 10) = 0.4677) and IPM
(epsilon = 0.5). Defences: every rule ``fedmosaic.robust`` provides, with f = 10 where it
takes f; FLTrust with a 100-sample root set held out of the clients' training data
(``hold_out_root``, that column only); norm bounding and centered clipping at 1.0, above the
largest honest update norm of the clean run (measured in the clean FedAvg cell and reported);
the anomaly detector with its defaults on top of the plain mean.

Run: .venv/bin/python benchmarks/security_matrix.py [--rounds 30 --epochs 5]
Writes benchmarks/results/security_matrix.json and regenerates the attacks x defences
section of docs/security.md (``--doc-only`` regenerates it from the existing JSON).
Accuracy figures only: they are deterministic for a seed and do not depend on load.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, machine, replace_doc_section, save

import fedmosaic as fm
from fedmosaic import data as fd
from fedmosaic.attacks import (
    ALIE,
    IPM,
    Attack,
    Backdoor,
    GaussianNoise,
    LabelFlip,
    SignFlip,
    alie_z_max,
    choose_malicious,
    simulate_attack,
)
from fedmosaic.models import MLP

DOC = Path(__file__).resolve().parent.parent / "docs" / "security.md"
HEADING = "## Measured: attacks x defences"
CLIENTS, FRACTION, F = 50, 0.2, 10
ROOT_SAMPLES = 100
CLIP = 1.0  # norm bound and centered-clipping radius (see the module docstring)

ATTACKS: dict[str, Attack | None] = {
    "none": None,
    "label_flip": LabelFlip(),
    "sign_flip": SignFlip(),
    "gaussian": GaussianNoise(std=1.0),
    "backdoor": Backdoor(),
    "alie": ALIE(),
    "ipm": IPM(),
}

Defence = Callable[[fd.FederatedDataset, Callable[[], fm.TorchTrainer], int],
                   tuple[fd.FederatedDataset, dict[str, Any]]]


def defences() -> dict[str, Defence]:
    """Plain FedAvg, then every robust rule and the anomaly detector that exist."""
    out: dict[str, Defence] = {"none": lambda fed, trainer, seed: (fed, {})}
    try:
        from fedmosaic import robust
    except ImportError:  # the robust package is not there: the matrix has one column
        return out
    params: dict[str, dict[str, Any]] = {
        "krum": {"f": F}, "multikrum": {"f": F}, "median": {"f": F},
        "trimmed_mean": {"f": F}, "bulyan": {"f": F}, "geomed": {"f": F},
        "centered_clip": {"tau": CLIP, "f": F}, "norm_bound": {"max_norm": CLIP},
    }
    for name in robust.RULES:
        if name == "fltrust":
            out[name] = _fltrust
        elif name in params:
            out[name] = (lambda n: lambda fed, trainer, seed: (
                fed, {"robust": robust.make_robust(n, **params[n])}))(name)
        else:
            print(f"skipping robust rule {name!r}: no benchmark parameters for it", flush=True)
    if hasattr(robust, "AnomalyDetector"):
        out["anomaly"] = lambda fed, trainer, seed: (fed, {"anomaly": robust.AnomalyDetector()})
    return out


def _fltrust(fed: fd.FederatedDataset, trainer: Callable[[], fm.TorchTrainer],
             seed: int) -> tuple[fd.FederatedDataset, dict[str, Any]]:
    from fedmosaic.robust import FLTrust, hold_out_root

    rest, root = hold_out_root(fed, ROOT_SAMPLES, seed)
    return rest, {"robust": FLTrust().bind(trainer(), root)}


class NormProbe:
    """Passes a transport's individual updates through, recording their L2 norms."""

    def __init__(self, inner: fm.BatchedTransport) -> None:
        self.inner = inner
        self.norms: list[float] = []

    def available_clients(self) -> list[str]:
        return self.inner.available_clients()

    def full_steps(self, client_id: str, config: fm.FitConfig) -> int | None:
        return self.inner.full_steps(client_id, config)

    def fit(self, weights: torch.Tensor, tasks: Any, weighting: Any = None) -> Any:
        for result in self.inner.fit(weights, tasks, None):
            if isinstance(result, fm.ClientUpdate):
                self.norms.append(float(result.delta.norm()))
            yield result


def run_cell(attack: Attack | None, defence: Defence, fed: fd.FederatedDataset,
             args: argparse.Namespace, probe_norms: bool = False) -> dict[str, Any]:
    def trainer() -> fm.TorchTrainer:
        return fm.TorchTrainer(lambda: MLP(64, [64], 10), lr=0.1, batch_size=16,
                               epochs=args.epochs)

    tr = trainer()
    fed_d, kwargs = defence(fed, trainer, args.seed)
    strategy = fm.FedAvg(**kwargs)
    probe = NormProbe(fm.BatchedTransport(tr, fed_d)) if probe_norms else None
    if attack is None:
        res = fm.simulate(tr, fed_d, strategy, args.rounds, seed=args.seed,
                          transport=probe or fm.BatchedTransport(tr, fed_d))
    else:
        res = simulate_attack(tr, fed_d, strategy, args.rounds, attack=attack,
                              fraction=FRACTION, seed=args.seed,
                              make_transport=lambda f: fm.BatchedTransport(tr, f))
    cell: dict[str, Any] = {
        "final_accuracy": res.final["test_accuracy"],
        "accuracy": res.metric("test_accuracy"),
        "rounds_skipped": int(sum(r.get("robust_skipped", 0) for r in res.history)),
        "rejected": int(sum(r["rejected"] for r in res.history)),
    }
    # How often the model sends triggered non-target test images to the target class: the
    # backdoor's success rate, and for every other row the same rate as a baseline.
    cell["backdoor_success_rate"] = tr.evaluate(
        res.weights, Backdoor().triggered_test_set(fed.test))["accuracy"]
    if probe is not None:
        norms = torch.tensor(probe.norms)
        cell["honest_update_norm"] = {"median": float(norms.median()),
                                      "max": float(norms.max())}
    anomaly = res.guarantees.get("robustness", {}).get("anomaly")
    if anomaly is not None:
        cell["anomaly"] = anomaly
    return cell


def markdown(d: dict[str, Any]) -> str:
    s = d["setup"]
    cols = d["defences"]
    rows = [a for a in d["attacks"]]
    cell = {(c["attack"], c["defence"]): c for c in d["cells"]}

    def acc(a: str, df: str) -> str:
        c = cell.get((a, df))
        if c is None:
            return "-"
        return "error" if "error" in c else f"{c['final_accuracy']:.3f}"

    def asr(a: str, df: str) -> str:
        c = cell.get((a, df))
        return "-" if c is None or "error" in c else f"{c['backdoor_success_rate']:.3f}"

    m = d["machine"]
    clean = cell.get(("none", "none"), {}).get("honest_update_norm")
    norm_note = "" if clean is None else (
        f" (honest update norms in the clean FedAvg run: median {clean['median']:.2f}, "
        f"largest {clean['max']:.2f})")
    lines = [
        HEADING, "",
        f"Command: `{d['command']}`", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, "
        + (f"GPU {m['cuda']}" if m.get("cuda") else "no GPU")
        + f", torch {m['torch']}, Python {m['python']}, measured {d['date'][:10]}. Accuracy "
        "figures only (deterministic for a seed and torch version; no timings).", "",
        f"Set-up: scikit-learn digits ({s['train_samples']} train / {s['test_samples']} test), "
        f"{s['clients']} clients, IID (a seeded permutation cut into equal parts), every "
        f"client in every round, {s['malicious']} of them ({s['fraction']:.0%}) malicious "
        f"(`choose_malicious`, seed {s['seed']}, the same clients in every cell). MLP "
        f"64-64-10, {s['epochs']} local epochs of plain SGD (lr {s['lr']}, batch "
        f"{s['batch_size']}) per round, {s['rounds']} rounds, FedAvg weighted by samples with "
        "server learning rate 1; clients trained by `BatchedTransport` (the same model as "
        "sequential training up to float rounding).", "",
        "Attacks, with `fedmosaic.attacks` defaults: label flipping (every label l -> 9 - l); "
        "sign flipping (the honest update times -1); Gaussian noise (N(0, 1) per coordinate in "
        "place of the update); the scaled backdoor (a 2x2 patch of 1.0 in the bottom-right "
        "corner, target class 0, half of each attacker's samples poisoned, gamma = n / m = "
        f"{s['clients'] / s['malicious']:g}); ALIE (z = z_max({s['clients']}, "
        f"{s['malicious']}) = {s['alie_z']:.4f}); IPM (epsilon = 0.5). Defences: plain FedAvg "
        f"(`none`), then `fedmosaic.robust` rules with f = {s['f']} where they take f; "
        f"`fltrust` with {s['root_samples']} root samples held out of the clients' training "
        "data (that column only); `norm_bound` and `centered_clip` at "
        f"{s['clip']}{norm_note}; "
        "`anomaly`: the anomaly detector (default thresholds, quarantine) over the plain "
        "mean.", "",
        "Final test accuracy (the global model after the last round):", "",
        "| attack \\ defence | " + " | ".join(f"`{c}`" for c in cols) + " |",
        "|---|" + "--:|" * len(cols),
    ]
    for a in rows:
        lines.append(f"| {a} | " + " | ".join(acc(a, c) for c in cols) + " |")
        if a == "backdoor":
            lines.append("| backdoor: attack success rate | "
                         + " | ".join(asr(a, c) for c in cols) + " |")
    base = [c["backdoor_success_rate"] for c in d["cells"]
            if c["attack"] == "none" and "error" not in c]
    span = "" if not base else (
        f"; without an attack the same rate is {min(base):.3f} in every column"
        if f"{min(base):.3f}" == f"{max(base):.3f}" else
        f"; without an attack the same rate is between {min(base):.3f} and {max(base):.3f}")
    lines += ["", "The attack success rate is the share of triggered test images of other "
              "classes that the final model assigns to the target class" + span + "."]
    lines += ["", *reading(d, cell)]
    errors = [c for c in d["cells"] if "error" in c]
    skipped = [c for c in d["cells"] if c.get("rounds_skipped")]
    if skipped:
        lines += ["", "Rounds in which the rule's precondition failed and the model was not "
                  "moved: " + "; ".join(f"{c['attack']} x {c['defence']}: "
                                       f"{c['rounds_skipped']}" for c in skipped) + "."]
    if errors:
        lines += ["", "Cells that failed: " + "; ".join(
            f"{c['attack']} x {c['defence']}: {c['error']}" for c in errors) + "."]
    return "\n".join(lines) + "\n"


def reading(d: dict[str, Any], cell: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """Sentences computed from the cells (so they cannot go stale when the matrix is rerun)."""
    ok = {k: c for k, c in cell.items() if "error" not in c}
    out = []
    losses = []
    for a in d["attacks"]:
        if a == "none":
            continue
        drops = [(ok[("none", df)]["final_accuracy"] - ok[(a, df)]["final_accuracy"], df)
                 for df in d["defences"] if (a, df) in ok and ("none", df) in ok]
        if drops:
            worst = max(x for x, _ in drops)
            # Accuracies move in steps of 1/360: equal drops are ties, all named.
            tied = [df for x, df in drops if f"{x:.3f}" == f"{worst:.3f}"]
            fedavg = {df: x for x, df in drops}.get("none")
            losses.append(f"{a} {worst:.3f} (" + ", ".join(f"`{df}`" for df in tied)
                          + (f"; plain FedAvg {fedavg:.3f})"
                             if fedavg is not None and "none" not in tied else ")"))
    if losses:
        out.append("Largest accuracy loss against the same defence without an attack, per "
                   "attack: " + "; ".join(losses) + ".")
    asr = {df: c["backdoor_success_rate"] for (a, df), c in ok.items() if a == "backdoor"}
    if asr:
        held = [f"`{df}`" for df in d["defences"] if asr.get(df, 0) >= 0.5]
        stopped = [f"`{df}`" for df in d["defences"] if df in asr and asr[df] < 0.05]
        out.append("The backdoor succeeds (rate >= 0.5) against "
                   + (", ".join(held) or "no defence") + "; it is stopped (rate < 0.05) by "
                   + (", ".join(stopped) or "no defence") + ".")
    bad = set(d["setup"].get("malicious_clients", []))
    caught = []
    for a in d["attacks"]:
        c = ok.get((a, "anomaly"))
        if c is None or "anomaly" not in c or not bad:
            continue
        q = set(c["anomaly"].get("quarantined", []))
        caught.append(f"{a} {len(q & bad)} of {len(bad)} malicious and {len(q - bad)} honest")
    if caught:
        out.append("The anomaly detector had quarantined, by the last round: "
                   + "; ".join(caught) + ".")
    return [" ".join(out)] if out else []


def update_doc(d: dict[str, Any]) -> None:
    """Replace the section under ``HEADING`` (up to the next ``## `` heading)."""
    replace_doc_section(DOC, HEADING, markdown(d))
    print(f"updated {DOC}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attacks", nargs="+", choices=list(ATTACKS), default=list(ATTACKS))
    ap.add_argument("--defences", nargs="+", default=None,
                    help="a subset of the defences (default: all that exist)")
    ap.add_argument("--doc-only", action="store_true",
                    help="regenerate docs/security.md from the existing JSON")
    args = ap.parse_args()
    if args.doc_only:
        update_doc(json.loads((RESULTS / "security_matrix.json").read_text()))
        return
    torch.set_num_threads(1)
    all_defences = defences()
    chosen = args.defences or list(all_defences)
    unknown = sorted(set(chosen) - set(all_defences))
    if unknown:
        ap.error(f"unknown defences {unknown}; available: {', '.join(all_defences)}")
    train, test = fd.load_digits()
    fed = fd.partition(train, fd.IID(), CLIENTS, args.seed, test=test, name="digits")
    cells = []
    for a in args.attacks:
        for name in chosen:
            try:
                cell = run_cell(ATTACKS[a], all_defences[name], fed, args,
                                probe_norms=(a, name) == ("none", "none"))
            except Exception as exc:  # a broken cell is reported, the matrix goes on
                cell = {"error": f"{type(exc).__name__}: {exc}"}
            cells.append({"attack": a, "defence": name, **cell})
            shown = cell.get("final_accuracy", cell.get("error"))
            print(f"{a:>10} x {name:<14} {shown}", flush=True)
    malicious = round(FRACTION * CLIENTS)
    payload = {
        "command": "python benchmarks/security_matrix.py --rounds "
                   f"{args.rounds} --epochs {args.epochs} --seed {args.seed}"
                   + (f" --attacks {' '.join(args.attacks)}"
                      if args.attacks != list(ATTACKS) else "")
                   + (f" --defences {' '.join(chosen)}" if args.defences else ""),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "setup": {"dataset": "digits", "train_samples": len(train), "test_samples": len(test),
                  "clients": CLIENTS, "partition": "iid", "fraction": FRACTION,
                  "malicious": malicious, "seed": args.seed, "rounds": args.rounds,
                  "epochs": args.epochs, "lr": 0.1, "batch_size": 16, "model": "MLP 64-64-10",
                  "f": F, "clip": CLIP, "root_samples": ROOT_SAMPLES,
                  "alie_z": alie_z_max(CLIENTS, malicious),
                  "malicious_clients": sorted(choose_malicious(fed.client_ids, FRACTION,
                                                               args.seed))},
        "attacks": {a: (ATTACKS[a].describe() if ATTACKS[a] is not None else None)
                    for a in args.attacks},
        "defences": chosen,
        "cells": cells,
    }
    print(f"results in {save('security_matrix', payload)}")
    update_doc(payload)


if __name__ == "__main__":
    main()
