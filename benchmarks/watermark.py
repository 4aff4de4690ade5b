"""Model-theft protection (issue #6): WAFFLE watermark and per-client fingerprints under a
thief's fine-tuning.

For each task, three federated runs with the same seed: plain FedAvg, FedAvg with the WAFFLE
stage (Tekgul et al. 2021), and WAFFLE plus per-client fingerprints. Then a thief steals the
final watermarked model and fine-tunes it for 5 epochs of plain SGD on data it has: the
first half of the test split under a seeded permutation (the "thief half"); test accuracy is
measured on the other half. After each epoch we record the thief's test accuracy, the
watermark accuracy and the ownership check's p-value. The same fine-tuning of the plain
model gives the false-claim baseline (an unmarked model's agreement with the triggers). In
the fingerprint run, the thief is the fourth client, leaking the final global model as
fingerprinted for it; we trace it among all clients after every epoch.

Tasks: digits (MLP 64-64-10, 10 IID clients, 40 rounds, all clients per round) and
Fashion-MNIST (SmallCNN, 100 clients Dirichlet(0.5), 10 per round, 30 rounds); both 1 local
epoch of SGD (lr 0.05, batch 32). Accuracy figures only: they do not depend on load.

Run: .venv/bin/python benchmarks/watermark.py [--tasks digits fashion_mnist]
Writes benchmarks/results/watermark.json and regenerates the watermark section of
docs/security.md (``--doc-only`` regenerates it from the existing JSON).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, machine, replace_doc_section, save

import fedmosaic as fm
from fedmosaic import data as fd
from fedmosaic.models import MLP, SmallCNN
from fedmosaic.train.base import FitConfig
from fedmosaic.watermark import (
    ClientFingerprint,
    TriggerSpec,
    WaffleStage,
    WatermarkKey,
    chance_tail,
    trace,
    verify_watermark,
)
from fedmosaic.watermark.verify import DEFAULT_THRESHOLD

DOC = Path(__file__).resolve().parent.parent / "docs" / "security.md"
HEADING = "## Model-theft protection (watermarks and fingerprints)"
THIEF_EPOCHS = 5
THIEF_LR = 0.05
STRENGTH = 0.01
# A fixed, published key: this is a benchmark, and its figures must be reproducible. A real
# deployment draws its key with `fedmosaic watermark keygen`.
KEY = WatermarkKey(bytes.fromhex("5eed" * 16))

TASKS: dict[str, dict[str, Any]] = {
    "digits": {
        "title": "digits, MLP 64-64-10, 10 IID clients, all per round, 40 rounds",
        "rounds": 40, "clients": 10, "per_round": None, "partition": "iid",
        "model": lambda: MLP(64, [64], 10),
    },
    "fashion_mnist": {
        "title": "Fashion-MNIST, SmallCNN, 100 clients Dirichlet(0.5), 10 per round, 30 rounds",
        "rounds": 30, "clients": 100, "per_round": 10, "partition": "dirichlet",
        "model": SmallCNN,
    },
}


def load(name: str, seed: int) -> fd.FederatedDataset:
    if name == "digits":
        train, test = fd.load_digits(seed=seed)
        part: Any = fd.IID()
    else:
        train, test = fd.load_fashion_mnist()
        part = fd.Dirichlet(alpha=0.5)
    return fd.partition(train, part, TASKS[name]["clients"], seed, test=test, name=name)


def split_test(test: fd.ArrayDataset, seed: int) -> tuple[fd.ArrayDataset, fd.ArrayDataset]:
    perm = np.random.default_rng(seed).permutation(len(test))
    half = len(test) // 2
    return test.subset(perm[:half]), test.subset(perm[half:])


def fine_tune(
    trainer: fm.TorchTrainer, weights: torch.Tensor, thief: fd.ArrayDataset,
    held_out: fd.ArrayDataset, probe: Callable[[torch.Tensor], dict[str, Any]],
) -> list[dict[str, Any]]:
    """The thief's 5 epochs; one row per epoch (epoch 0: the stolen model as is)."""
    rows = []
    for epoch in range(THIEF_EPOCHS + 1):
        if epoch:
            cfg = FitConfig(round=10_000 + epoch, epochs=1, lr=THIEF_LR, batch_size=32,
                            seed=epoch)
            weights = trainer.fit(weights, thief, cfg).weights
        rows.append({"epoch": epoch,
                     "test_accuracy": trainer.evaluate(weights, held_out)["accuracy"],
                     **probe(weights)})
    return rows


def run_task(name: str, seed: int) -> dict[str, Any]:
    t = TASKS[name]
    fed = load(name, seed)
    thief, held_out = split_test(fed.test, seed)
    shape, classes = tuple(fed.feature_shape), fed.num_classes
    spec = TriggerSpec()

    def trainer() -> fm.TorchTrainer:
        return fm.TorchTrainer(t["model"], lr=0.05, batch_size=32)

    def strategy(**kw: Any) -> fm.FedAvg:
        return fm.FedAvg(clients_per_round=t["per_round"], **kw)

    def stage() -> WaffleStage:
        return WaffleStage(trainer(), KEY, input_shape=shape, num_classes=classes, spec=spec)

    def verdict(tr: fm.TorchTrainer, w: torch.Tensor) -> dict[str, Any]:
        v = verify_watermark(w, KEY, input_shape=shape, num_classes=classes, spec=spec,
                             trainer=tr)
        return {"watermark_accuracy": v.accuracy, "p_value": v.p_value, "owned": v.owned,
                "patterns_matched": v.patterns_matched, "num_patterns": v.num_patterns,
                "num_triggers": v.num_triggers}

    out: dict[str, Any] = {"title": t["title"], "rounds": t["rounds"], "num_classes": classes}
    runs: dict[str, fm.RunResult] = {}
    for label, kw in (("plain", {}), ("waffle", {"server_stages": [stage()]}),
                      ("waffle+fingerprint", {"server_stages": [stage()],
                                              "dispatch_transform": ClientFingerprint(
                                                  KEY, STRENGTH)})):
        tr = trainer()
        res = fm.simulate(tr, fed, strategy(**kw), t["rounds"], seed=seed)
        runs[label] = res
        row: dict[str, Any] = {"test_accuracy": res.final["test_accuracy"],
                               "held_out_accuracy": tr.evaluate(res.weights,
                                                                held_out)["accuracy"],
                               **verdict(tr, res.weights)}
        if label != "plain":
            row["retraining_epochs_total"] = sum(res.metric("watermark_epochs"))
            row["retraining_steps_total"] = sum(res.metric("watermark_steps"))
            row["watermark_accuracy_before_retraining"] = res.metric(
                "watermark_accuracy_before")
        out[label] = row
        print(f"{name} {label}: test accuracy {row['test_accuracy']:.4f}, watermark accuracy "
              f"{row['watermark_accuracy']:.2f}", flush=True)

    tr = trainer()
    out["thief_waffle"] = fine_tune(tr, runs["waffle"].weights, thief, held_out,
                                    lambda w: verdict(tr, w))
    out["thief_plain"] = fine_tune(tr, runs["plain"].weights, thief, held_out,
                                   lambda w: verdict(tr, w))
    fp = ClientFingerprint(KEY, STRENGTH)
    leaker = fed.client_ids[3]
    reference = runs["waffle+fingerprint"].weights

    def traced(w: torch.Tensor) -> dict[str, Any]:
        ranking = trace(w, reference, fed.client_ids, fp)
        rank = next(i for i, s in enumerate(ranking) if s.client_id == leaker) + 1
        others = [s.z for s in ranking if s.client_id != leaker]
        return {**verdict(tr, w), "leaker_rank": rank, "leaker_z": ranking[rank - 1].z,
                "leaker_p_value": ranking[rank - 1].p_value, "max_other_z": max(others)}

    out["leaker"] = leaker
    out["thief_fingerprint"] = fine_tune(tr, fp(leaker, reference), thief, held_out, traced)
    for r in out["thief_waffle"]:
        print(f"  epoch {r['epoch']}: thief test acc {r['test_accuracy']:.4f}, watermark acc "
              f"{r['watermark_accuracy']:.2f}", flush=True)
    return out


# ------------------------------------------------------------------------------ the doc


def _p(p: float) -> str:
    return "< 1e-300" if p == 0 else f"{p:.1e}" if p < 0.01 else f"{p:.2f}"


def render(d: dict[str, Any]) -> str:
    m = d["machine"]
    first = next(iter(d["tasks"].values()))
    k, n = first["num_classes"], first["thief_waffle"][0]["num_triggers"]
    patterns = first["thief_waffle"][0]["num_patterns"]
    threshold = d["threshold"]
    spec = d["trigger_spec"]
    lines = [
        HEADING, "",
        "A stolen model is proved the server's with a watermark, and traced to the client it "
        "was sent to with a fingerprint (`fedmosaic.watermark`; configuration: the "
        "`[watermark]` table in [configuration.md](configuration.md)). The model only ever "
        "goes to authenticated clients (#5); these two tools act after a leak.",
        "",
        "**WAFFLE watermark** (Tekgul et al. 2021, \"WAFFLE: Watermarking in Federated "
        "Learning\"). The server's secret key (at least 128 random bits, `fedmosaic watermark "
        "keygen`) generates a trigger set of WAFFLEPattern-style inputs: one random pattern per "
        "class (random positions at random intensities) plus Gaussian noise, "
        f"{spec['samples_per_pattern']} noisy copies per pattern, each labelled with its class; "
        f"{n} triggers for {k} classes. After every "
        "aggregation the `WaffleStage` (a server stage) re-trains the global model on the "
        "triggers with plain SGD until watermark accuracy reaches 0.98 or 100 epochs have run; "
        "rounds record `watermark_accuracy_before` (after aggregation), `watermark_accuracy`, "
        "`watermark_epochs` and `watermark_steps`. No client data is needed, and from round 2 "
        "on every model sent to clients is watermarked (round 1's too when the initial "
        "weights go through `WaffleStage.embed`, the paper's pre-training). It composes with "
        "every strategy and transport (FedAdam tested); under DP-FedAvg it is post-processing "
        "with a data-independent set, so the DP guarantee is unchanged.",
        "",
        "**Ownership check** (`verify_watermark`, `fedmosaic watermark verify MODEL.pt -e "
        "EXPERIMENT.toml`, exit status 0 when the watermark is present). The owner regenerates "
        "the triggers from the key and counts the suspect model's agreements with their labels. "
        "A model that never saw the triggers agrees with a label drawn uniformly from K classes "
        "with probability 1/K, so its count of n triggers is Binomial(n, 1/K). The verdict "
        f"reports the watermark accuracy, the threshold ({threshold} by default), the p-value "
        "P[Binomial(n, 1/K) >= observed] and the test's false-claim probability "
        f"P[Binomial(n, 1/K) >= threshold x n] ({_p(chance_tail(n, round(threshold * n), k))} "
        f"for {n} triggers, {k} classes and threshold {threshold}), computed exactly. Copies "
        "of one pattern are not independent trials, so "
        "it also counts patterns whose copies are mostly labelled right and gives the "
        "conservative per-pattern p-value P[Binomial(patterns, 1/K) >= matched] "
        f"({_p(chance_tail(patterns, patterns, k))} when all {patterns} patterns match).",
        "",
        "**Per-client fingerprints** (spread-spectrum marking, Cox et al. 1997). With "
        "`fingerprint = true`, client c receives `w + s * u_c`, where `u_c` is a +-1 vector "
        "derived from the key and the client id and `s` the strength (0.01). The client trains "
        "from what it received and uploads its delta relative to it, so the fingerprint never "
        "enters the aggregate (tested exactly). `trace(leaked, reference, candidates, "
        "fingerprint)` ranks candidates by `z_c = <leaked - reference, u_c> / ||leaked - "
        "reference||`, which for a client whose fingerprint is absent has mean 0 and variance "
        "1; the p-value is its normal tail times the number of candidates (Bonferroni). "
        "`reference` is the global model of the round the leak came from (the server keeps its "
        "checkpoints). Only `SequentialTransport` sends per-client weights; the server refuses "
        "the batched, Ray and SecAgg+ transports with a dispatch transform (they send one "
        "model to all), and the config refuses `fingerprint = true` with them.",
        "",
        "**Keys, logs and resume.** Runs record only the key's fingerprint (an HKDF-SHA256 "
        "output, in the stage's description and so in the resume identity: a resume with "
        "another key is refused). The key is never pickled, printed or checkpointed; the "
        "trigger set and retraining shuffles are pure functions of the key, round and epoch, so "
        "a resumed run regenerates them and ends bit-identical to an uninterrupted one "
        "(tested).",
        "",
        "### Measured: watermark and fingerprint under a thief's fine-tuning",
        "",
        f"Command: `.venv/bin/python {d['command'].removeprefix('python ')}`",
        "",
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
        + (f"GPU {m['cuda']}" if m.get("cuda") else "no GPU")
        + f", torch {m.get('torch', '?')}, Python {m.get('python', '?')}, measured "
        f"{d['date'][:10]}. Accuracy figures only (deterministic for a seed; no timings).",
        "",
        "Three federated runs per task with the same seed: plain FedAvg, FedAvg + WAFFLE, and "
        "FedAvg + WAFFLE + fingerprints (1 local epoch of SGD, lr 0.05, batch 32). The thief "
        f"then fine-tunes the stolen model for {THIEF_EPOCHS} epochs of SGD (lr {THIEF_LR}, "
        "batch 32) on half of the test split (a seeded permutation), and test accuracy is "
        "measured on the other half (\"held-out\"). The unmarked plain model, fine-tuned the "
        "same way, is the false-claim baseline. In the fingerprint run the thief is client "
        f"`{d['tasks'][next(iter(d['tasks']))]['leaker']}`, leaking the final global model as it "
        "was fingerprinted for it; it is traced among all clients after each epoch.",
        "",
    ]
    for t in d["tasks"].values():
        p, w, f = t["plain"], t["waffle"], t["waffle+fingerprint"]
        lines += [
            f"**{t['title']}**", "",
            "| run | test accuracy | watermark accuracy | ownership p-value | "
            "retraining epochs (all rounds) |",
            "|---|--:|--:|--:|--:|",
            f"| plain FedAvg | {p['test_accuracy']:.4f} | {p['watermark_accuracy']:.2f} | "
            f"{_p(p['p_value'])} | - |",
            f"| FedAvg + WAFFLE | {w['test_accuracy']:.4f} | {w['watermark_accuracy']:.2f} | "
            f"{_p(w['p_value'])} | {w['retraining_epochs_total']} |",
            f"| FedAvg + WAFFLE + fingerprints | {f['test_accuracy']:.4f} | "
            f"{f['watermark_accuracy']:.2f} | {_p(f['p_value'])} | "
            f"{f['retraining_epochs_total']} |",
            "",
            "| thief epoch | held-out accuracy (stolen WAFFLE model) | watermark accuracy | "
            "p-value | owned (patterns matched) | unmarked model: watermark accuracy (p-value) | "
            "fingerprinted leak: leaker's rank (z) | highest other z |",
            "|--:|--:|--:|--:|:-:|--:|--:|--:|",
        ]
        for a, b, c in zip(t["thief_waffle"], t["thief_plain"], t["thief_fingerprint"]):
            lines.append(
                f"| {a['epoch']} | {a['test_accuracy']:.4f} | {a['watermark_accuracy']:.2f} | "
                f"{_p(a['p_value'])} | {'yes' if a['owned'] else 'no'} ({a['patterns_matched']}/"
                f"{a['num_patterns']}) | "
                f"{b['watermark_accuracy']:.2f} ({_p(b['p_value'])}) | "
                f"{c['leaker_rank']} ({c['leaker_z']:.1f}) | {c['max_other_z']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def update_doc(d: dict[str, Any]) -> None:
    """Replace the watermark section of docs/security.md (up to the next ``## `` heading)."""
    replace_doc_section(DOC, HEADING, render(d))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--doc-only", action="store_true",
                    help="regenerate the docs/security.md section from the existing JSON")
    args = ap.parse_args()
    if args.doc_only:
        update_doc(json.loads((RESULTS / "watermark.json").read_text()))
        return
    torch.set_num_threads(1)
    payload = {
        "command": f"python benchmarks/watermark.py --tasks {' '.join(args.tasks)} "
                   f"--seed {args.seed}",
        "machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "key_fingerprint": KEY.fingerprint, "thief_epochs": THIEF_EPOCHS, "thief_lr": THIEF_LR,
        "fingerprint_strength": STRENGTH, "trigger_spec": TriggerSpec().to_dict(),
        "threshold": DEFAULT_THRESHOLD,
        "tasks": {name: run_task(name, args.seed) for name in args.tasks},
    }
    print(f"results in {save('watermark', payload)}")
    update_doc(payload)
    print(f"section regenerated in {DOC}")


if __name__ == "__main__":
    main()
