"""Gradient-inversion attacks: DLG and iDLG.

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
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from fedmosaic.audit.errors import AuditError
from fedmosaic.audit.target import UpdateModel

# Relative matching loss at which restarting stops: the gradient is matched to 1e-4.
CONVERGED = 1e-8


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
