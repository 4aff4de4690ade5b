"""FedProx's proximal term (Li et al., 2020, "Federated Optimization in Heterogeneous
Networks", MLSys).

Each client minimises ``F_k(w) + mu/2 * ||w - w_global||^2``; the trainer adds the value
returned here to its loss, and autograd supplies the gradient ``mu * (w - w_global)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

__all__ = ["proximal_term", "proximal_term_flat"]


def _check_mu(mu: float) -> float:
    mu = float(mu)
    if not math.isfinite(mu) or mu < 0:
        raise ValueError(f"mu must be a finite number >= 0, got {mu!r}")
    return mu


def proximal_term(
    params: Iterable[torch.Tensor], global_params: Iterable[torch.Tensor], mu: float
) -> torch.Tensor:
    """``mu/2 * sum_i ||params[i] - global_params[i]||^2`` as a differentiable scalar.

    ``params`` are the model's live parameters (e.g. ``model.parameters()``),
    ``global_params`` the matching tensors of the global model (treated as constants by
    the caller, e.g. detached). Uses multi-tensor (``_foreach``) kernels, the ones
    ``torch.optim`` uses, so there is no per-layer kernel launch loop.
    """
    mu = _check_mu(mu)
    local, ref = list(params), list(global_params)
    if not local:
        raise ValueError("params is empty")
    if len(local) != len(ref):
        raise ValueError(f"got {len(local)} params but {len(ref)} global params")
    for i, (p, g) in enumerate(zip(local, ref, strict=True)):
        if p.shape != g.shape:
            raise ValueError(
                f"param {i} has shape {tuple(p.shape)}, global param has {tuple(g.shape)}"
            )
    if mu == 0.0:
        # Keeps the term out of the graph entirely when FedProx degenerates to FedAvg.
        return local[0].new_zeros(())
    diffs = torch._foreach_sub(local, ref)
    norms = torch._foreach_norm(diffs)
    return 0.5 * mu * torch.stack(norms).square().sum()


def proximal_term_flat(w: torch.Tensor, w_global: torch.Tensor, mu: float) -> torch.Tensor:
    """``mu/2 * ||w - w_global||^2`` for two flat vectors (or any two same-shape tensors)."""
    mu = _check_mu(mu)
    if w.shape != w_global.shape:
        raise ValueError(f"w has shape {tuple(w.shape)}, w_global has {tuple(w_global.shape)}")
    diff = w - w_global
    return 0.5 * mu * (diff * diff).sum()
