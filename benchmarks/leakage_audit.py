"""Gradient-leakage audit (issue #6): how much of a client's data DLG and iDLG reconstruct
from its update, undefended and under each defence; and (issue #20, ``--analytic``) the
analytic inversion of a fully connected first layer against the same defences.

Tasks: digits (MLP 64-64-10, the peer-task model; every defence over its default grid) and
Fashion-MNIST (SmallCNN, undefended only: see ``TASKS``). The attacked model is the freshly
initialised one (seed 0); each client update is one SGD step (lr 0.05) on one sample, except
under secure aggregation, where the server sees the sum of K such updates. Quality figures
only (MSE, PSNR, label accuracy): they do not depend on load, and no timing is published.

Run: .venv/bin/python benchmarks/leakage_audit.py [--tasks digits fashion_mnist]
Writes benchmarks/results/leakage_audit.json and regenerates the gradient-leakage section of
docs/security.md (``--doc-only`` regenerates it from the existing JSON).

``--analytic`` runs only the analytic attack (Phong et al. 2017; Geiping et al. 2020, Sec. 3;
no optimisation, so on many more samples: ``ANALYTIC``) on digits (MLP 64-64-10) and
Fashion-MNIST (MLP 784-64-10: the CNN has no fully connected first layer), every defence,
plus updates of several samples and of several local steps; it stores them under
``"analytic"`` in the same JSON, leaving the DLG/iDLG figures as they are.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, machine, replace_doc_section, save

from fedmosaic import data as fd
from fedmosaic.audit import leakage_audit
from fedmosaic.audit.report import CRITERION
from fedmosaic.models import build_model

DOC = Path(__file__).resolve().parent.parent / "docs" / "security.md"
HEADING = "## Gradient-leakage audit"
LR = 0.05

# name -> (data loader, model_fn, audit keyword arguments). The CNN gets the undefended
# attacks only: they already stall there (see the section's text), so a defence could only
# look better than it is.
TASKS: dict[str, dict[str, Any]] = {
    "digits": {
        "title": "digits, MLP 64-64-10",
        "data": lambda: fd.load_digits(seed=0)[0],
        "model": partial(build_model, "mlp", (64,), 10, hidden=(64,)),
        "audit": {"samples": 8, "defences": ["none", "dp", "topk", "secagg"],
                  "attacks": ["dlg", "idlg"]},
    },
    "fashion_mnist": {
        "title": "Fashion-MNIST, SmallCNN",
        "data": lambda: fd.load_fashion_mnist(limit_train=2000)[0],
        "model": partial(build_model, "cnn", (1, 28, 28), 10),
        "audit": {"samples": 4, "defences": ["none"], "attacks": ["dlg", "idlg"]},
    },
}

# The analytic attack: name -> (title, data loader, model_fn, samples). Each task runs every
# defence on one-sample updates, then undefended updates of several samples or steps.
ANALYTIC: dict[str, dict[str, Any]] = {
    "digits": {
        "title": "digits, MLP 64-64-10",
        "data": lambda: fd.load_digits(seed=0)[0],
        "model": partial(build_model, "mlp", (64,), 10, hidden=(64,)),
        "samples": 64,
    },
    "fashion_mnist": {
        "title": "Fashion-MNIST, MLP 784-64-10",
        "data": lambda: fd.load_fashion_mnist(limit_train=2000)[0],
        "model": partial(build_model, "mlp", (1, 28, 28), 10, hidden=(64,)),
        "samples": 32,
    },
}
ANALYTIC_BATCHES = (2, 4, 8)
ANALYTIC_STEPS = 3


def run_task(name: str, seed: int, iterations: int, restarts: int) -> dict[str, Any]:
    task = TASKS[name]
    report = leakage_audit(task["model"], task["data"](), lr=LR, seed=seed,
                           iterations=iterations, restarts=restarts, data_name=task["title"],
                           **task["audit"])
    print(report.to_markdown())
    return report.to_dict()


def run_analytic(name: str, seed: int) -> dict[str, Any]:
    """Every defence on one-sample updates, then undefended batches and local steps."""
    task = ANALYTIC[name]
    data, n = task["data"](), task["samples"]
    common = {"lr": LR, "seed": seed, "attacks": ["analytic"], "data_name": task["title"]}
    out: dict[str, Any] = {"defences": leakage_audit(task["model"], data, samples=n,
                                                     **common).to_dict()}
    for b in ANALYTIC_BATCHES:
        out[f"batch {b}"] = leakage_audit(task["model"], data, samples=n, batch_size=b,
                                          defences=["none"], **common).to_dict()
    out[f"{ANALYTIC_STEPS} local steps"] = leakage_audit(
        task["model"], data, samples=n, local_steps=ANALYTIC_STEPS, defences=["none"],
        **common).to_dict()
    for label, r in out.items():
        print(f"{name}, {label}: " + "; ".join(
            f"{x['defence']}: {x['leaked_samples']}/{x['samples']}, PSNR {x['psnr']:.1f}"
            for x in r["results"]))
    return out


def _table(r: dict[str, Any]) -> list[str]:
    lines = ["| defence | attack | MSE | PSNR (dB) | best PSNR (dB) | label accuracy (samples) "
             "| inputs beating the baseline | verdict |",
             "|---|---|--:|--:|--:|--:|--:|---|"]
    for x in r["results"]:
        verdict = "fails" if x["failed"] else "**leaks**"
        lines.append(f"| {x['defence']} | {x['attack']} | {x['mse']:.4f} | {x['psnr']:.1f} | "
                     f"{x['best_psnr']:.1f} | {x['label_accuracy']:.2f} ({x['label_samples']}) | "
                     f"{x['leaked_samples']}/{x['samples']} | {verdict} |")
    return lines


def _row(r: dict[str, Any], defence: str, attack: str) -> dict[str, Any] | None:
    return next((x for x in r["results"] if x["defence"] == defence and x["attack"] == attack),
                None)


def _findings(r: dict[str, Any]) -> list[str]:
    """Sentences about one task, every number read from its results."""
    out = []
    none_dlg, none_idlg = _row(r, "none", "dlg"), _row(r, "none", "idlg")
    if none_dlg and none_idlg:
        out.append(
            f"Undefended, DLG reconstructs {none_dlg['leaked_samples']} of "
            f"{none_dlg['samples']} inputs better than the baseline guess (mean MSE "
            f"{none_dlg['mse']:.4f}, mean PSNR {none_dlg['psnr']:.1f} dB) and iDLG "
            f"{none_idlg['leaked_samples']} (mean PSNR {none_idlg['psnr']:.1f} dB); iDLG's "
            f"labels are {none_idlg['label_accuracy']:.0%} right (of "
            f"{none_idlg['label_samples']}), DLG's {none_dlg['label_accuracy']:.0%} (of "
            f"{none_dlg['label_samples']}).")
    rec = r["recommendation"]
    if rec["tested"]:
        out.append("Recommendation: " + rec["text"])
    topk = [x for x in r["results"] if x["defence_kind"] == "topk"]
    if topk:
        safe = sorted({x["defence_params"]["keep"] for x in topk
                       if all(y["leaked_samples"] == 0 for y in topk
                              if y["defence"] == x["defence"])}, reverse=True)
        lo, hi = (f(x["label_accuracy"] for x in topk) for f in (min, max))
        labels = f"{lo:.0%}" if lo == hi else f"between {lo:.0%} and {hi:.0%}"
        out.append(
            "Top-k pruning: " + (f"no input beats the baseline at keep fractions "
                                 f"{', '.join(f'{p:g}' for p in safe)}" if safe else
                                 "some inputs beat the baseline at every tested keep fraction")
            + f"; label accuracy is {labels} over the tested fractions.")
    secagg = [x for x in r["results"] if x["defence_kind"] == "secagg"]
    if secagg:
        parts = [f"K = {x['defence_params']['clients']}: {x['leaked_samples']}/{x['samples']} "
                 f"inputs, PSNR {x['psnr']:.1f} dB, labels {x['label_accuracy']:.0%}"
                 for x in secagg]
        out.append("Secure aggregation (DLG on the sum of K single-sample updates, matched "
                   "to the K samples by least-MSE assignment): " + "; ".join(parts) + ".")
    return out


def render(d: dict[str, Any]) -> str:
    m = d["machine"]
    lines = [
        HEADING, "",
        "`fedmosaic audit leakage EXPERIMENT.toml` (or `fedmosaic.audit.leakage_audit(model_fn "
        "or trainer, data)`) mounts gradient-inversion attacks against the user's own "
        "model and data and reports, with no defence and with each defence, how well the "
        "client's inputs and labels come back: DLG (Zhu, Liu and Han 2019) optimises dummy "
        "inputs and soft labels with L-BFGS until their gradient matches the observed one; "
        "iDLG (Zhao, Mopuri and Bilen 2020) first reads a single sample's label off the sign "
        "of the output layer's gradient, then optimises the input only; for a model whose first "
        "layer is fully connected with a bias, the analytic attack (Phong et al. 2017; Geiping "
        "et al. 2020, Sec. 3) reads the input off that layer's gradient, x = dL/dW[i,:] / "
        "dL/db[i] (see below). The report (`report.json`"
        ", `report.md`) gives per defence and attack the mean MSE and PSNR of the "
        "reconstructed inputs and the label accuracy, and recommends a local-DP noise "
        "multiplier.",
        "",
        "Threat model: the honest-but-curious server. It holds the global weights it sent and "
        "the learning rate and number of local steps it asked for, and sees each upload "
        "`delta = local - global`; after one full-batch step of plain SGD, `-delta / lr` is the "
        "client's gradient, the target of the attacks. For several local steps the attacker "
        "unrolls that many differentiable SGD steps on its dummy data and matches their sum "
        "(Geiping et al. 2020's multi-step setting); iDLG's label rule is exact only for one "
        "sample and one step. The model is evaluated with `torch.func.functional_call` on the "
        "project's flat `ParamSpec` vectors, so any `model_fn` works; models the attack cannot "
        "differentiate twice with respect to the input (rounding, embeddings of integer "
        "tokens), dropout (the attacker cannot reproduce the masks), losses other than "
        "cross-entropy and local optimizers other than plain SGD are refused with an error.",
        "",
        "Defences: local DP (`dp`: the client clips its update to L2 norm S and adds "
        "N(0, (z S)^2) per coordinate, calling `LocalDP`; by default S is the update's own "
        "norm, so z is the noise-to-signal ratio); top-k pruning (`topk`: keep the largest "
        "fraction p of coordinates; the attacker matches only the coordinates it sees); secure "
        "aggregation (`secagg`: the server sees only the sum of K clients' single-sample "
        "updates; DLG attacks it as a batch of K and reconstructions are matched to the true "
        "samples by least-MSE assignment). Central DP (DP-FedAvg) is not in the list: its noise "
        "is added after the server has seen each clipped update, so it does nothing against "
        "this attacker.",
        "",
        "Metrics: reconstructions are clipped to the data's range (the attacker knows the "
        "input format); MSE and PSNR (`10 log10(range^2 / MSE)`, range = max - min of the "
        "client's features, 1 for these data sets scaled to [0, 1]; capped at 100 dB for "
        "exact recoveries) are per sample, then averaged. The baseline is the data set's mean "
        f"input used as the guess for every sample. Criterion: {CRITERION}. The recommended "
        "noise multiplier is the smallest tested one at which every attack fails.",
        "",
        f"Command: `{d['command']}`",
        "",
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
        + (f"GPU {m['cuda']}" if m.get("cuda") else "no GPU")
        + f", torch {m.get('torch', '?')}, Python {m.get('python', '?')}, measured "
        f"{d['date'][:10]}. Reconstruction quality only (deterministic for a seed, torch "
        "version and thread count; no timings).",
    ]
    for name, r in d["tasks"].items():
        s, p = r["settings"], r["prior"]
        lines += [
            "", f"### {TASKS[name]['title'] if name in TASKS else name}", "",
            f"{s['samples']} samples of the training split, {r['model']['parameters']:,} "
            f"parameters, weights {s['weights']}; one update per sample (lr {s['lr']:g}, "
            f"{s['local_steps']} step); L-BFGS with up to {s['restarts']} starts of "
            f"{s['iterations']} iterations. Baseline (mean input): MSE {p['mse']:.4f}, PSNR "
            f"{p['psnr']:.1f} dB; chance label accuracy {p['chance_accuracy']:.2f}.",
            "",
        ]
        lines += _table(r)
        lines += [""] + [f"- {f}" for f in _findings(r)]
    cnn = d["tasks"].get("fashion_mnist")
    dlg = _row(cnn, "none", "dlg") if cnn else None
    # Only said when the optimiser really stalled there (matching loss far from converged).
    if cnn and dlg and dlg["matching_loss"] > 1e-4:
        lines += [
            "",
            f"On the ReLU/max-pool SmallCNN, even undefended reconstructions are poor "
            f"(DLG: mean PSNR {dlg['psnr']:.1f} dB against "
            f"{cnn['prior']['psnr']:.1f} dB for the mean image): L-BFGS gradient matching "
            "stalls in poor local minima there (the relative matching loss stays at "
            f"{dlg['matching_loss']:.2g}, median over samples, against 1e-8 for a converged "
            "match). That is a failure of the optimiser, not evidence that the CNN's updates "
            "are safe: stronger attacks (cosine matching with a total-variation prior and "
            "Adam, Geiping et al. 2020) reconstruct images from such networks. Only the "
            "undefended attacks are run on it for that reason: defended rows could only look "
            "safer than they are.",
        ]
    if d.get("analytic"):
        lines += _analytic_section(d)
    lines += [
        "",
        "Limits: the audit measures three specific attacks, so \"fails\" is a lower bound on "
        "what a stronger attacker recovers, and the recommended noise is an empirical "
        "threshold for them, not a differential-privacy guarantee (for that, see the privacy "
        "accounting of LocalDP and DP-FedAvg). DLG's label accuracy is measured on the few "
        "attacked samples, where the test flags labels only when they are clearly above "
        "chance; iDLG's label rule needs no optimisation and is measured on many more.",
    ]
    return "\n".join(lines) + "\n"


def _inputs_safe_z(results: list[dict[str, Any]], attack: str) -> float | None:
    """The smallest tested DP noise multiplier from which on no input beats the baseline."""
    zs = sorted((x["defence_params"]["noise_multiplier"], x["leaked_samples"])
                for x in results if x["defence_kind"] == "dp" and x["attack"] == attack)
    return next((z for i, (z, _) in enumerate(zs) if all(n == 0 for _, n in zs[i:])), None)


def _z(z: float | None) -> str:
    return "no tested z" if z is None else f"z = {z:g}"


def _analytic_section(d: dict[str, Any]) -> list[str]:
    a = d["analytic"]
    m = a["machine"]
    lines = [
        "", "### Analytic inversion of a fully connected first layer", "",
        "For a first layer z = W x + b, one sample's gradient is dL/dW[i,:] = dL/dz_i x and "
        "dL/db[i] = dL/dz_i, so x = dL/dW[i,:] / dL/db[i] for every row with dL/db[i] != 0 "
        "(Phong et al. 2017, Sec. 3.2; Geiping et al. 2020, Sec. 3). The attack "
        "(`attacks=[\"analytic\"]`, run by default where it applies) takes the least-squares "
        "combination of all usable rows, sum_i b_i W_i / sum_i b_i^2: exact for an update from "
        "one sample, for any learning rate and any number of full-batch local steps (each "
        "step's first-layer gradient is an outer product with the same x), with no "
        "optimisation and no label. With several samples per update (a batch, or a secure sum "
        "of K clients) row i gives sum_j c_ij x_j / sum_j c_ij, a mixture of the samples that "
        "activate unit i; a ReLU unit activated by one sample alone gives that sample exactly, "
        "and the attack takes rows whose ratios coincide as one sample. Labels: iDLG's rule "
        "for one-sample updates, none (accuracy 0) otherwise. Models whose first layer is not "
        "fully connected with a bias (the SmallCNN) are refused; the attack checks on a known "
        "input that the layer it found really acts on the raw input first.",
        "",
        f"Command: `{a['command']}` ({m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch "
        f"{m.get('torch', '?')}, measured {a['date'][:10]}; reconstruction quality only). Same "
        f"attacker and defences as above, lr {LR:g}, seed-0 initial weights; more samples than "
        "for DLG, since the attack needs no optimisation. Fashion-MNIST is not in it where "
        "its files were missing on the measuring machine (`--tasks digits fashion_mnist` "
        "adds it, with an MLP 784-64-10: the SmallCNN has no fully connected first layer).",
    ]
    for name, runs in a["tasks"].items():
        r = runs["defences"]
        s, p = r["settings"], r["prior"]
        title = ANALYTIC[name]["title"] if name in ANALYTIC else name
        lines += [
            "", f"#### {title} (analytic)", "",
            f"{s['samples']} samples, {r['model']['parameters']:,} parameters. Baseline (mean "
            f"input): MSE {p['mse']:.4f}, PSNR {p['psnr']:.1f} dB.", "",
        ]
        lines += _table(r)
        extra = ["", "| update | MSE | PSNR (dB) | best PSNR (dB) | inputs beating the "
                 "baseline |", "|---|--:|--:|--:|--:|"]
        for label, run in runs.items():
            if label == "defences":
                continue
            (x,) = run["results"]
            extra.append(f"| undefended, {label} | {x['mse']:.4f} | {x['psnr']:.1f} | "
                         f"{x['best_psnr']:.1f} | {x['leaked_samples']}/{x['samples']} |")
        lines += extra
        lines += [""] + [f"- {f}" for f in _analytic_findings(name, runs, d)]
    return lines


def _analytic_findings(name: str, runs: dict[str, Any], d: dict[str, Any]) -> list[str]:
    """Sentences about the analytic attack on one task, every number read from the results."""
    r = runs["defences"]
    out = []
    none = _row(r, "none", "analytic")
    if none:
        out.append(f"Undefended: {none['leaked_samples']} of {none['samples']} inputs beat the "
                   f"baseline, mean PSNR {none['psnr']:.1f} dB (100 dB is the cap for an "
                   f"exact recovery), median fit residual {none['matching_loss']:.1g}.")
    z = _inputs_safe_z(r["results"], "analytic")
    if z is not None:
        text = (f"Local DP: from z = {z:g} on no input is closer to its sample than the mean "
                "image")
        main = d["tasks"].get(name)
        if main:
            dlg = _inputs_safe_z(main["results"], "dlg")
            idlg = _inputs_safe_z(main["results"], "idlg")
            if dlg is not None or idlg is not None:
                text += (f" (DLG: {_z(dlg)}, iDLG: {_z(idlg)}, on "
                         f"{main['settings']['samples']} samples above)")
        text += (". The attack is more fragile to noise than gradient matching: it reads one "
                 "layer's gradient, while DLG matches every layer's, and it clips its noisy "
                 "estimate to the data range instead of shrinking it towards the data.")
        out.append(text)
    secagg = [x for x in r["results"] if x["defence_kind"] == "secagg"]
    if secagg:
        out.append("Secure aggregation does not stop it on this ReLU MLP: " + "; ".join(
            f"K = {x['defence_params']['clients']}: {x['leaked_samples']}/{x['samples']} "
            f"inputs beat the baseline, best PSNR {x['best_psnr']:.1f} dB" for x in secagg)
            + ". Units that only one of the K clients activates give that client's input "
            "exactly from the sum; the labels are not recovered.")
    return out


def update_doc(d: dict[str, Any]) -> None:
    """Replace the gradient-leakage section of docs/security.md (up to the next heading)."""
    replace_doc_section(DOC, HEADING, render(d))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--restarts", type=int, default=4)
    ap.add_argument("--doc-only", action="store_true",
                    help="regenerate the docs/security.md section from the existing JSON")
    ap.add_argument("--analytic", action="store_true",
                    help="run only the analytic attack (tasks: ANALYTIC) and store it next to "
                         "the existing DLG/iDLG results")
    args = ap.parse_args()
    if args.doc_only:
        update_doc(json.loads((RESULTS / "leakage_audit.json").read_text()))
        return
    torch.set_num_threads(1)
    if args.analytic:
        tasks = [t for t in args.tasks if t in ANALYTIC]
        existing = json.loads((RESULTS / "leakage_audit.json").read_text())
        existing["analytic"] = {
            "command": f"python benchmarks/leakage_audit.py --analytic --tasks "
                       f"{' '.join(tasks)} --seed {args.seed}",
            "machine": machine(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "tasks": {name: run_analytic(name, args.seed) for name in tasks},
        }
        print(f"results in {save('leakage_audit', existing)}")
        update_doc(existing)
        print(f"section regenerated in {DOC}")
        return
    previous = RESULTS / "leakage_audit.json"
    analytic = json.loads(previous.read_text()).get("analytic") if previous.exists() else None
    payload = {
        "command": f"python benchmarks/leakage_audit.py --tasks {' '.join(args.tasks)} "
                   f"--seed {args.seed} --iterations {args.iterations} "
                   f"--restarts {args.restarts}",
        "machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "tasks": {name: run_task(name, args.seed, args.iterations, args.restarts)
                  for name in args.tasks},
        # Measured by its own command (--analytic): kept across a rerun of DLG/iDLG.
        **({"analytic": analytic} if analytic else {}),
    }
    print(f"results in {save('leakage_audit', payload)}")
    update_doc(payload)
    print(f"section regenerated in {DOC}")


if __name__ == "__main__":
    main()
