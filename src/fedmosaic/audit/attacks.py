"""Gradient-inversion attacks: DLG, iDLG and the analytic inversion of a first linear layer.

DLG (Zhu, Liu and Han 2019, "Deep Leakage from Gradients", NeurIPS): start from random dummy
inputs and dummy soft labels and optimise both with L-BFGS so that the gradient they produce
matches the observed one (squared L2 distance).

iDLG (Zhao, Mopuri and Bilen 2020, "iDLG: Improved Deep Leakage from Gradients"): for one
sample under cross-entropy, the gradient of the output layer's bias is ``softmax(z) - onehot(y)``,
negative only at the true label; without a bias, the output weight rows are
``(p_c - y_c) * a`` for the penultimate activation ``a``, whose entries are non-negative after
ReLU/sigmoid, so the true label's row is the one with a negative sum. With the label known,
only the input is optimised.

Both attacks start up to ``restarts`` times from seeded random points and keep the candidate
with the smallest matching loss: the attacker can evaluate that loss, so restarts only make it
stronger. L-BFGS often stalls in a poor local minimum of the
matching loss; a fresh start usually escapes it. Restarting stops once the relative matching
loss is below ``CONVERGED``.

Analytic inversion (Phong, Aono, Hayashi, Wang and Moriai 2017, "Privacy-Preserving Deep
Learning via Additively Homomorphic Encryption", Sec. 3.2; Geiping, Bauermeister, Dröge and
Moeller 2020, "Inverting Gradients -- How easy is it to break privacy in federated
learning?", NeurIPS, Sec. 3): when the model's first layer is fully connected with a bias,
``z = W x + b``, one sample's gradient is ``dL/dW[i,:] = dL/dz_i * x`` and
``dL/db[i] = dL/dz_i``, so ``x = (dL/dW[i,:]) / (dL/db[i])`` for every row ``i`` with
``dL/db[i] != 0``: no optimisation, no label, exact up to round-off. The update of one SGD
step is ``-lr`` times the gradient, which leaves the ratio unchanged; so does any number of
full-batch steps on one sample (each step's first-layer gradient is an outer product with the
same ``x``). With several samples per update (a batch, or a secure sum of several clients)
row ``i`` gives ``sum_j c_ij x_j / sum_j c_ij``: a mixture of the samples whose unit ``i``
is active, and the very sample only where one sample alone activates the unit.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from math import prod

import torch

from fedmosaic.audit.errors import AuditError
from fedmosaic.audit.target import UpdateModel

# Relative matching loss at which restarting stops: the gradient is matched to 1e-4.
CONVERGED = 1e-8
# Rows whose bias gradient is below this fraction of the largest are not divided by: in exact
# arithmetic they are 0 (a ReLU unit the sample leaves inactive), in float32 round-off.
ROW_FLOOR = 1e-6
# Two rows' ratios closer than this (RMS over the features, relative to the data range) are
# read as the same sample.
SAME_SAMPLE = 1e-3


@dataclass
class Reconstruction:
    """What an attack recovered: inputs ``(K, B, *features)``, labels ``(K, B)``, and the
    final relative matching loss ``||g' - g||^2 / ||g||^2`` over the matched coordinates."""

    x: torch.Tensor
    labels: torch.Tensor
    loss: float


def idlg_label(target: UpdateModel, observed: torch.Tensor) -> int:
    """The label of a single-sample update, read off the output layer's gradient (iDLG)."""
    layer = target.output_layer()
    if layer is None:
        raise AuditError("iDLG needs a model that ends in a linear layer with one output per "
                         "class (weight (C, h), optional bias (C,)); none was found")
    weight, bias = layer
    if bias is not None:
        return int(observed[bias].argmin())
    return int(target.weight_rows(observed, weight).sum(1).argmin())


def _matching_loss(target: UpdateModel, x: torch.Tensor, probs: torch.Tensor,
                   observed: torch.Tensor, mask: torch.Tensor | None,
                   scale: float) -> torch.Tensor:
    diff = target.simulate(x, probs) - observed
    if mask is not None:
        diff = diff[mask]
    # Divided by ||g||^2 (a constant) only to keep L-BFGS's tolerances scale-free.
    return diff.pow(2).sum() / scale


def invert(
    target: UpdateModel,
    observed: torch.Tensor,
    *,
    clients: int,
    batch: int,
    feature_shape: tuple[int, ...],
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    iterations: int = 300,
    restarts: int = 4,
    seed: int = 0,
    init: tuple[float, float] = (0.0, 1.0),
) -> Reconstruction:
    """Gradient matching with L-BFGS: DLG when ``labels`` is None (dummy soft labels are
    optimised too), iDLG's second stage when the labels are given.

    ``observed`` is the pseudo-gradient; ``mask`` restricts the match to coordinates the
    attacker saw (a pruned update's support). Dummy inputs start at N(``init[0]``,
    ``init[1]**2``): N(0, 1) in the papers.
    """
    c = target.num_classes
    scale = float(observed[mask].pow(2).sum() if mask is not None else observed.pow(2).sum())
    scale = scale if scale > 0 and math.isfinite(scale) else 1.0
    fixed = (None if labels is None else
             torch.nn.functional.one_hot(labels, c).to(observed.device, torch.float32))
    best: Reconstruction | None = None
    for r in range(restarts):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + r)
        # Drawn on the CPU (the same start on every device), then moved to the model's.
        x = torch.randn((clients, batch, *feature_shape), generator=gen) * init[1] + init[0]
        logits = torch.randn((clients, batch, c), generator=gen)
        x, logits = x.to(observed.device), logits.to(observed.device)
        rec = _lbfgs(target, observed, mask, scale, x, logits if fixed is None else None,
                     fixed, iterations)
        if best is None or rec.loss < best.loss:
            best = rec
        if best.loss <= CONVERGED:
            break  # an (almost) exact gradient match: another start cannot do better
    assert best is not None
    return best


def _lbfgs(target: UpdateModel, observed: torch.Tensor, mask: torch.Tensor | None,
           scale: float, x: torch.Tensor, logits: torch.Tensor | None,
           fixed: torch.Tensor | None, iterations: int) -> Reconstruction:
    """One L-BFGS run from (x, logits); the iterate with the smallest loss it evaluated."""
    x.requires_grad_(True)
    params = [x]
    if logits is not None:
        logits.requires_grad_(True)
        params.append(logits)
    # L-BFGS as in both papers; the strong-Wolfe line search keeps it from diverging.
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=iterations, history_size=100,
                            tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")
    best: dict[str, object] = {
        "loss": math.inf, "x": x.detach().clone(),
        "probs": logits.detach().softmax(-1) if logits is not None else fixed}

    def closure() -> torch.Tensor:
        opt.zero_grad()
        probs = logits.softmax(-1) if logits is not None else fixed
        assert probs is not None
        loss = _matching_loss(target, x, probs, observed, mask, scale)
        value = float(loss)
        if not math.isfinite(value):
            return loss.detach()  # a diverged probe: the line search backs off
        if value < best["loss"]:  # type: ignore[operator]
            best.update(loss=value, x=x.detach().clone(), probs=probs.detach().clone())
        loss.backward()
        return loss

    with warnings.catch_warnings():
        # L-BFGS warns when a step makes no progress; the best iterate is kept regardless.
        warnings.simplefilter("ignore", UserWarning)
        opt.step(closure)
    probs = best["probs"]
    assert isinstance(probs, torch.Tensor)
    x_best = best["x"]
    assert isinstance(x_best, torch.Tensor)
    return Reconstruction(x_best.cpu(), probs.argmax(-1).cpu(), float(best["loss"]))


def _first_layer(target: UpdateModel, features: int) -> tuple[slice, slice]:
    where = target.first_layer(features)
    if where is None:
        raise AuditError("the analytic attack needs a model whose first layer is fully "
                         f"connected with a bias (weight (h, {features}), bias (h,) as the "
                         "first entries of its ParamSpec); this model has none: use dlg/idlg")
    return where


def analytic_inversion(
    target: UpdateModel,
    observed: torch.Tensor,
    *,
    clients: int,
    batch: int,
    feature_shape: tuple[int, ...],
    mask: torch.Tensor | None = None,
    fill: float = 0.0,
    data_range: float = 1.0,
) -> Reconstruction:
    """Read the inputs off a fully connected first layer's gradient (Phong et al. 2017;
    Geiping et al. 2020, Sec. 3): ``x = dL/dW[i,:] / dL/db[i]``.

    For one sample per update (``clients * batch == 1``) the estimate is the least-squares
    combination of all usable rows, ``sum_i b_i W_i / sum_i b_i^2`` (``b`` the bias and
    ``W`` the weight gradient): equal to every single row's ratio for an exact update, and
    the noise-averaging choice for a noised one. For ``n > 1`` samples per update, rows
    whose ratios coincide (within ``SAME_SAMPLE`` of the data range) are taken as one
    sample, largest groups first, then the remaining rows by the size of ``b_i``; missing
    candidates are ``fill``. ``mask`` (a pruned update's support) restricts the rows to those
    whose bias survived; pruned weight entries count as 0 (they were the smallest).

    ``loss`` is the relative residual of the fit, ``sum_i min_k ||W_i - b_i x_k||^2 /
    sum_i ||W_i||^2`` over the usable rows (0 for an exact single-sample update; 1 when no
    row is usable). Labels are not recovered (-1): the audit reads single-sample labels with
    :func:`idlg_label`. Raises :class:`AuditError` when the model has no fully connected
    first layer with a bias.
    """
    n, d = clients * batch, prod(feature_shape)
    w_at, b_at = _first_layer(target, d)
    w = observed[w_at].detach().double().cpu().view(-1, d)
    b = observed[b_at].detach().double().cpu()
    usable = b.abs() > ROW_FLOOR * float(b.abs().max()) if bool(b.any()) else b != 0
    if mask is not None:
        usable &= mask[b_at].cpu()
    w, b = w[usable], b[usable]
    guesses: list[torch.Tensor] = []
    if len(b) and n == 1:
        guesses.append((b[:, None] * w).sum(0) / b.pow(2).sum())
    elif len(b):
        ratios = w / b[:, None]
        near = torch.cdist(ratios, ratios) / math.sqrt(d) < SAME_SAMPLE * data_range
        support = near.sum(1).double()
        # Largest group first; ties (e.g. all singletons) by the row's weight b_i^2.
        order = sorted(range(len(b)), key=lambda i: (-float(support[i]), -float(b[i] ** 2)))
        taken = torch.zeros(len(b), dtype=torch.bool)
        for i in order:
            if len(guesses) == n:
                break
            if taken[i]:
                continue
            members = near[i] & ~taken
            bm = b[members]
            guesses.append((bm[:, None] * w[members]).sum(0) / bm.pow(2).sum())
            taken |= near[i]
    if guesses:
        fits = torch.stack([(w - b[:, None] * g).pow(2).sum(1) for g in guesses])
        loss = float(fits.min(0).values.sum() / w.pow(2).sum().clamp_min(1e-300))
    else:
        loss = 1.0
    while len(guesses) < n:
        guesses.append(torch.full((d,), float(fill), dtype=torch.float64))
    x = torch.stack(guesses).to(torch.float32).view(clients, batch, *feature_shape)
    labels = torch.full((clients, batch), -1, dtype=torch.long)
    return Reconstruction(x, labels, loss)


def check_analytic(target: UpdateModel, sample: torch.Tensor) -> None:
    """Refuse, with an error naming the problem, a model on which the analytic attack is not
    exact: its first ParamSpec entries look like a linear layer with a bias but do not act on
    the raw input first (e.g. a parameter-free normalisation, or another layer, comes first).

    The check runs the attacker's own simulation on one real ``sample`` (shape
    ``(1, *features)``) and requires the attack to return that sample.
    """
    _first_layer(target, prod(sample.shape[1:]))
    x = sample.to(target.device, torch.float32).unsqueeze(0)
    probs = torch.full((1, 1, target.num_classes), 1.0 / target.num_classes,
                       device=target.device)
    probs[..., 0] += 0.5  # any label works; not uniform, so the gradient is not zero
    probs /= probs.sum(-1, keepdim=True)
    observed = target.simulate(x, probs).detach()
    rec = analytic_inversion(target, observed, clients=1, batch=1,
                             feature_shape=tuple(sample.shape[1:]))
    scale = float(x.abs().max()) or 1.0
    err = float((rec.x.to(x.device) - x).abs().max())
    if not err <= 1e-3 * scale:
        raise AuditError("the model's first ParamSpec entries have the shapes of a fully "
                         "connected layer with a bias, but the analytic attack does not "
                         f"recover a known input through them (max error {err:.3g}): that "
                         "layer is not applied to the raw input first; use dlg/idlg")
