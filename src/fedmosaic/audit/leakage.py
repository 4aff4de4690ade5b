"""``leakage_audit``: attack a user's own model and data with DLG, iDLG and (for a fully
connected first layer) the analytic inversion, with no defence and with each defence, and
report how much of the data the server could reconstruct."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from fedmosaic.audit.attacks import analytic_inversion, check_analytic, idlg_label, invert
from fedmosaic.audit.defences import (
    DEFAULT_KEEP,
    DEFAULT_NOISE,
    DEFAULT_SECAGG_CLIENTS,
    DEFENCE_NAMES,
    Defence,
    GaussianNoise,
    NoDefence,
    SecureAggregation,
    TopK,
    expand_defences,
)
from fedmosaic.audit.errors import AuditError
from fedmosaic.audit.metrics import above_chance_p_value, match_to_truth, per_sample_mse, psnr
from fedmosaic.audit.report import AttackResult, LeakageReport, recommend_noise
from fedmosaic.audit.target import UpdateModel
from fedmosaic.train import TorchTrainer
from fedmosaic.train.base import Dataset

ATTACKS = ("dlg", "idlg", "analytic")
_DEFENCE_TYPES = (NoDefence, GaussianNoise, TopK, SecureAggregation)


def _resolve_defences(defences: Iterable[str | Defence], noise: Sequence[float],
                      keep: Sequence[float], clients: Sequence[int],
                      clip: float | None) -> list[Defence]:
    out: list[Defence] = []
    for d in defences:
        if isinstance(d, str):
            out += expand_defences([d], noise_multipliers=noise, keep_fractions=keep,
                                   secagg_clients=clients, clip=clip)
        elif isinstance(d, _DEFENCE_TYPES):
            out.append(d)
        else:
            raise AuditError(f"defence {d!r} is neither a name ({', '.join(DEFENCE_NAMES)}) "
                             "nor a fedmosaic.audit defence object")
    if not out:
        raise AuditError(f"no defences given; allowed: {', '.join(DEFENCE_NAMES)}")
    return out


def _check_data(data: Dataset, samples: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = getattr(data, "x", None), getattr(data, "y", None)
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise AuditError("data must have numpy arrays x (features) and y (labels), e.g. a "
                         "fedmosaic.data.ArrayDataset")
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
        raise AuditError(f"data must have x of shape (n, *features) and y of shape (n,), got "
                         f"{x.shape} and {y.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise AuditError(f"the features must be floating point for DLG to optimise them, got "
                         f"{x.dtype}")
    if not np.isfinite(x).all():
        raise AuditError("the features contain NaN or infinite values")
    if not (isinstance(samples, int) and samples >= 1):
        raise AuditError(f"samples must be an integer >= 1, got {samples!r}")
    if samples > len(x):
        raise AuditError(f"samples={samples} but the data set has only {len(x)} samples")
    return x.astype(np.float32, copy=False), y.astype(np.int64, copy=False)


def leakage_audit(
    model: TorchTrainer | Callable[[], nn.Module],
    data: Dataset,
    *,
    samples: int = 8,
    label_samples: int = 200,
    defences: Iterable[str | Defence] = DEFENCE_NAMES,
    attacks: Sequence[str] | None = None,
    lr: float | None = None,
    local_steps: int = 1,
    batch_size: int = 1,
    iterations: int = 300,
    restarts: int = 4,
    seed: int = 0,
    weights: torch.Tensor | None = None,
    noise_multipliers: Sequence[float] = DEFAULT_NOISE,
    keep_fractions: Sequence[float] = DEFAULT_KEEP,
    secagg_clients: Sequence[int] = DEFAULT_SECAGG_CLIENTS,
    clip: float | None = None,
    data_name: str = "data",
) -> LeakageReport:
    """Reconstruct a client's data from its updates with DLG and iDLG, undefended and with
    each defence, and report MSE, PSNR and label accuracy.

    ``model``: a ``TorchTrainer`` (its learning rate unless ``lr`` is given) or a
    ``model_fn`` (a cross-entropy ``TorchTrainer`` with plain SGD is built around it).
    ``data``: the client's data (an ``ArrayDataset``); ``samples`` of them, drawn with
    ``seed``, are attacked. iDLG's label rule costs no optimisation, so its label accuracy is
    measured on ``label_samples`` samples (at least ``samples``, at most the data set): with
    few samples a label test cannot tell chance from a small leak. Each client update is
    ``local_steps`` full-batch SGD steps on ``batch_size`` samples from ``weights``
    (default: the model's seeded initial weights).
    ``defences``: names (``none``, ``dp``, ``topk``, ``secagg``, each expanded over
    ``noise_multipliers``, ``keep_fractions``, ``secagg_clients``; ``clip`` is the DP clip,
    None for each update's own norm) or defence objects from ``fedmosaic.audit``.
    ``attacks``: names from ``ATTACKS``; None runs DLG, iDLG and, where the model's first
    layer is fully connected with a bias, the analytic inversion (asking for ``analytic``
    on another model is an error). iDLG runs only where the observed update comes from a
    single sample.
    """
    trainer = model if isinstance(model, TorchTrainer) else _trainer_for(model, lr)
    lr = float(lr if lr is not None else trainer.lr)
    explicit = attacks is not None
    attacks = list(ATTACKS) if attacks is None else list(attacks)
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        what = f"unknown attack(s) {unknown}" if unknown else "no attacks given"
        raise AuditError(f"{what}; allowed: {', '.join(ATTACKS)}")
    for name, value, low in (("iterations", iterations, 1), ("restarts", restarts, 1),
                             ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if not (isinstance(value, int) and value >= low):
            raise AuditError(f"{name} must be an integer >= {low}, got {value!r}")
    x_all, y_all = _check_data(data, samples)
    if not (isinstance(label_samples, int) and label_samples >= 1):
        raise AuditError(f"label_samples must be an integer >= 1, got {label_samples!r}")
    label_samples = min(max(label_samples, samples), len(x_all))
    chosen = _resolve_defences(defences, noise_multipliers, keep_fractions, secagg_clients,
                               clip)
    for d in chosen:
        if d.clients * batch_size > samples:
            raise AuditError(f"defence '{d.label}' sums {d.clients} client update(s) of "
                             f"{batch_size} sample(s): it needs samples >= "
                             f"{d.clients * batch_size}, got {samples}")
    if weights is None:
        weights = trainer.initial_weights(seed)
        weights_desc = f"freshly initialised, seed {seed}"
    else:
        weights_desc = "given by the caller"
    target = UpdateModel(trainer, weights, lr=lr, local_steps=local_steps)
    num_classes = target.probe(x_all)
    if int(y_all.min()) < 0 or int(y_all.max()) >= num_classes:
        raise AuditError(f"labels must lie in [0, {num_classes}) for a model with "
                         f"{num_classes} outputs, got [{int(y_all.min())}, {int(y_all.max())}]")
    lo, hi = float(x_all.min()), float(x_all.max())
    if not hi > lo:
        raise AuditError("every feature value is the same: there is nothing to reconstruct")
    notes: list[str] = []
    if "analytic" in attacks:
        try:
            check_analytic(target, torch.from_numpy(x_all[:1]))
        except AuditError as exc:
            if explicit:
                raise
            attacks.remove("analytic")
            notes.append(f"the analytic attack was not run: {exc}")
    data_range = hi - lo
    # The attacked samples come first; iDLG's label accuracy also uses the rest.
    order = np.random.default_rng(seed).choice(len(x_all), size=label_samples, replace=False)
    x_true, y_true = torch.from_numpy(x_all[order]), torch.from_numpy(y_all[order])
    mean_input = torch.from_numpy(x_all.mean(0, dtype=np.float64)).to(torch.float32)
    prior_mse = per_sample_mse(mean_input.expand_as(x_true[:samples]), x_true[:samples])
    prior = {"mse": float(prior_mse.mean()), "psnr": float(psnr(prior_mse, data_range).mean()),
             "chance_accuracy": 1.0 / num_classes}

    audit = _Audit(target, x_true, y_true, samples, prior_mse, lo, hi, batch_size, iterations,
                   restarts, seed)
    results: list[AttackResult] = []
    for pos, defence in enumerate(chosen):
        for attack in attacks:
            if attack == "idlg" and defence.clients * batch_size != 1:
                note = ("iDLG's label rule needs an update from a single sample: it is not "
                        "run where an update covers several samples (batches, secure sums)")
                if note not in notes:
                    notes.append(note)
                continue
            results.append(audit.run(defence, pos, attack))
    if local_steps > 1 and "idlg" in attacks:
        notes.append(f"iDLG's label rule is exact for one step; here it reads the sum of "
                     f"{local_steps} steps' gradients, where it is a heuristic")
    if "analytic" in attacks:
        notes.append("the analytic attack reads inputs off the first layer's gradient "
                     "(x = dL/dW[i,:] / dL/db[i]): exact for an update from one sample, for "
                     "any number of local steps; its labels are iDLG's rule's")
        if any(d.clients * batch_size > 1 for d in chosen):
            notes.append("where an update covers several samples (batches, secure sums) the "
                         "analytic attack's rows are mixtures of the samples, exact only for "
                         "a sample that alone activates a first-layer unit; it recovers no "
                         "labels there (label accuracy 0 by construction)")
    notes.append("central DP (DP-FedAvg) adds its noise on the server after seeing each "
                 "clipped update, so it does not protect against this attacker; the 'dp' rows "
                 "are local DP (LocalDP), where each client noises its own update")
    return LeakageReport(
        model={"name": type(trainer.model).__name__, "parameters": target.numel},
        data={"name": data_name, "size": len(x_all), "feature_shape": list(x_all.shape[1:]),
              "num_classes": num_classes, "min": lo, "max": hi, "data_range": data_range},
        settings={"samples": samples, "label_samples": label_samples, "lr": lr,
                  "local_steps": local_steps,
                  "batch_size": batch_size, "iterations": iterations, "restarts": restarts,
                  "seed": seed, "weights": weights_desc, "attacks": list(attacks),
                  "defences": [d.label for d in chosen]},
        prior=prior, results=results, recommendation=recommend_noise(results), notes=notes)


def _trainer_for(model_fn: Callable[[], nn.Module], lr: float | None) -> TorchTrainer:
    if not callable(model_fn):
        raise AuditError(f"model must be a TorchTrainer or a callable building an nn.Module, "
                         f"got {type(model_fn).__name__}")
    try:
        return TorchTrainer(model_fn, "cross_entropy", lr=lr if lr is not None else 0.05)
    except AuditError:
        raise
    except Exception as exc:
        raise AuditError(f"could not build a trainer from the model function: {exc}") from exc


class _Audit:
    """Runs one (defence, attack) over every group of audited samples."""

    def __init__(self, target: UpdateModel, x_true: torch.Tensor, y_true: torch.Tensor,
                 samples: int, prior_mse: torch.Tensor, lo: float, hi: float, batch_size: int,
                 iterations: int, restarts: int, seed: int) -> None:
        self.target, self.prior_mse = target, prior_mse
        self.x_label, self.y_label = x_true, y_true  # every sample iDLG's labels are read from
        self.x_true, self.y_true = x_true[:samples], y_true[:samples]  # the attacked ones
        self.lo, self.hi, self.batch_size = lo, hi, batch_size
        self.iterations, self.restarts, self.seed = iterations, restarts, seed
        self._updates: dict[tuple[int, ...], torch.Tensor] = {}
        self._labels_right: dict[int, int] = {}
        # The attacker knows the range of valid inputs (the data format) and starts its dummy
        # inputs near the middle of it; from the papers' N(0, 1), L-BFGS stalls in poor local
        # minima of ReLU networks more often (restarts recover, at a cost).
        self.init = ((lo + hi) / 2, (hi - lo) / 10)

    def _update(self, idx: tuple[int, ...]) -> torch.Tensor:
        # The same client trains on the same samples under every defence: compute it once.
        if idx not in self._updates:
            i = list(idx)
            self._updates[idx] = self.target.client_update(
                self.x_label[i].numpy(), self.y_label[i].numpy(), seed=self.seed)
        return self._updates[idx]

    def _observed(self, defence: Defence, pos: int, group: int) -> torch.Tensor:
        """What the server sees of group ``group``: the defended updates of its clients,
        summed (one client unless the defence is a secure sum)."""
        per_group = defence.clients * self.batch_size
        observed_delta = torch.zeros(self.target.spec.numel)
        for k in range(defence.clients):
            a = group * per_group + k * self.batch_size
            delta = self._update(tuple(range(a, a + self.batch_size)))
            # Client-side randomness (DP noise) is seeded per (run, defence, group, client).
            gen = torch.Generator().manual_seed(
                ((self.seed * 1009 + pos) * 1009 + group) * 1009 + k)
            observed_delta += defence.apply(delta, gen)
        return self.target.observe(observed_delta)

    def _idlg_labels(self, defence: Defence, pos: int) -> int:
        """How many of the label samples iDLG's rule labels right (one-sample updates)."""
        if pos not in self._labels_right:  # iDLG and the analytic attack share the rule
            self._labels_right[pos] = sum(
                idlg_label(self.target, self._observed(defence, pos, i)) == int(y)
                for i, y in enumerate(self.y_label))
        return self._labels_right[pos]

    def run(self, defence: Defence, pos: int, attack: str) -> AttackResult:
        per_group = defence.clients * self.batch_size
        groups = len(self.x_true) // per_group
        mses, correct, losses = [], 0, []
        for g in range(groups):
            start = g * per_group
            observed = self._observed(defence, pos, g)
            mask = observed != 0 if defence.support_visible else None
            labels = None
            if attack == "idlg":
                labels = torch.tensor([[idlg_label(self.target, observed)]])
            if attack == "analytic":
                rec = analytic_inversion(self.target, observed, clients=defence.clients,
                                         batch=self.batch_size,
                                         feature_shape=tuple(self.x_true.shape[1:]), mask=mask,
                                         fill=self.init[0], data_range=self.hi - self.lo)
            else:
                rec = invert(self.target, observed, clients=defence.clients,
                             batch=self.batch_size, feature_shape=tuple(self.x_true.shape[1:]),
                             labels=labels, mask=mask, iterations=self.iterations,
                             restarts=self.restarts, seed=self.seed * 7919 + g, init=self.init)
            true_x = self.x_true[start:start + per_group]
            true_y = self.y_true[start:start + per_group]
            rec_x = rec.x.reshape(per_group, *true_x.shape[1:]).clamp(self.lo, self.hi)
            rec_y = rec.labels.reshape(per_group)
            perm = match_to_truth(rec_x, true_x)
            mses.append(per_sample_mse(rec_x[perm], true_x))
            correct += int((rec_y[perm] == true_y).sum())
            losses.append(rec.loss)
        mse = torch.cat(mses)
        n = len(mse)
        data_range = self.hi - self.lo
        psnrs = psnr(mse, data_range)
        leaked = int((mse < self.prior_mse[:n]).sum())
        label_n = n
        if attack == "idlg" or (attack == "analytic" and per_group == 1
                                and self.target.output_layer() is not None):
            # The analytic attack recovers inputs only; with one sample per update the
            # attacker reads the label with iDLG's rule.
            correct, label_n = self._idlg_labels(defence, pos), len(self.y_label)
        return AttackResult(
            defence=defence.label, defence_kind=defence.kind, defence_params=defence.params(),
            attack=attack, samples=n, mse=float(mse.mean()), psnr=float(psnrs.mean()),
            best_psnr=float(psnrs.max()), label_accuracy=correct / label_n,
            label_samples=label_n,
            label_p_value=above_chance_p_value(correct, label_n, self.target.num_classes),
            leaked_samples=leaked, matching_loss=float(np.median(losses)))

