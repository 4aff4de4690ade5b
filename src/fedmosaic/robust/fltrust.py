"""FLTrust (Cao, Fang, Liu and Gong 2021, "FLTrust: Byzantine-robust Federated Learning via
Trust Bootstrapping", NDSS).

The server keeps a small clean root data set and, every round, trains the current global
model on it exactly as a client would; that server update ``g0`` bootstraps trust. Each
client gets the trust score ``TS_i = ReLU(cos(g_i, g0))``, its update is rescaled to the
norm of ``g0``, and the aggregate is ``sum_i TS_i * g_i * ||g0|| / ||g_i|| / sum_i TS_i``. A
client whose update points away from the server's (a sign flip) gets zero weight, and no
client can win influence by scaling its update.

The reference update comes from ``begin_round(round, global_weights)``, which the strategy
calls before aggregating: a bound trainer (``bind``) trains on the root data there. Without a
trainer, give the reference yourself with ``set_reference`` (tests, attack benchmarks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedmosaic.algorithms.aggregate import weighted_sum
from fedmosaic.core.errors import FedmosaicError
from fedmosaic.robust.base import (
    RobustAggregator,
    RobustPreconditionError,
    RobustResult,
    dot64,
)
from fedmosaic.train.base import Dataset, FitConfig, Trainer

SOURCE = "Cao et al. 2021"


class MissingReferenceError(FedmosaicError, RuntimeError):
    """FLTrust was asked to aggregate without the server's reference update for the round."""


class FLTrust(RobustAggregator):
    """FLTrust with the server's update trained on ``root_data`` by ``trainer``.

    ``epochs``, ``batch_size`` and ``lr`` are the local-training settings of the server's
    update (``None``: the trainer's own, as clients get them), ``seed`` seeds the root
    training of each round (derived per round, so runs are reproducible). Sample weights are
    ignored: trust comes from direction, not from a claimed count. Needs no assumption on
    ``f``; the root data must be clean and drawn like the clients' data (Cao et al.).
    A client's share is its normalised trust score; all shares are 0 when no client is
    trusted, and then the round's delta is zero (the model does not move).
    """

    name = "fltrust"

    def __init__(self, trainer: Trainer | None = None, root_data: Dataset | None = None, *,
                 epochs: int | None = None, batch_size: int | None = None,
                 lr: float | None = None, seed: int = 0) -> None:
        super().__init__(0)
        self.trainer: Trainer | None = None
        self.root_data: Dataset | None = None
        # Validates the settings once.
        FitConfig(round=0, epochs=epochs, batch_size=batch_size, lr=lr)
        self.epochs, self.batch_size, self.lr, self.seed = epochs, batch_size, lr, int(seed)
        self.reference: torch.Tensor | None = None
        if trainer is not None or root_data is not None:
            if trainer is None or root_data is None:
                raise ValueError("FLTrust needs both a trainer and the root data set, or neither "
                                 "(then call set_reference each round)")
            self.bind(trainer, root_data)

    def bind(self, trainer: Trainer, root_data: Dataset) -> FLTrust:
        """Train the server's reference update with ``trainer`` on ``root_data`` each round."""
        if len(root_data) == 0:
            raise ValueError("FLTrust's root data set is empty")
        self.trainer, self.root_data = trainer, root_data
        return self

    def set_reference(self, server_update: torch.Tensor) -> None:
        """Use ``server_update`` as this round's ``g0`` (instead of training one)."""
        if not isinstance(server_update, torch.Tensor) or server_update.dim() != 1 or \
                not bool(torch.isfinite(server_update).all()):
            raise ValueError("the reference update must be a finite 1-D tensor")
        self.reference = server_update.detach().to(torch.float32)

    def begin_round(self, round_num: int, global_weights: torch.Tensor) -> None:
        if self.trainer is None or self.root_data is None:
            return
        seed = int(np.random.SeedSequence([self.seed, round_num, 0xF1]).generate_state(1)[0])
        config = FitConfig(round=round_num, epochs=self.epochs, batch_size=self.batch_size,
                           lr=self.lr, seed=seed)
        trained = self.trainer.fit(global_weights, self.root_data, config).weights
        self.set_reference(trained.to(global_weights.device) - global_weights)

    def check(self, n: int) -> None:
        if not n >= 1:
            raise RobustPreconditionError(self.name, n, self.f, "n >= 1", SOURCE)

    def _aggregate(self, deltas: torch.Tensor, weights: torch.Tensor,
                   client_ids: Sequence[str]) -> RobustResult:
        g0 = self.reference
        if g0 is None:
            raise MissingReferenceError(
                "FLTrust needs the server's update for this round: bind(trainer, root_data) "
                "so that begin_round trains it, or call set_reference first")
        if g0.shape != deltas.shape[1:]:
            raise ValueError(f"the reference update has shape {tuple(g0.shape)}, the deltas "
                             f"{tuple(deltas.shape[1:])}")
        g0 = g0.to(deltas.device)
        ref_norm = float(torch.linalg.vector_norm(g0.to(torch.float64)))
        n = deltas.shape[0]
        norms = torch.linalg.vector_norm(deltas, dim=1).to(torch.float64)
        dots = dot64(deltas, g0)
        denom = norms * ref_norm
        cos = torch.where(denom > 0, dots / denom.clamp(min=1e-300), torch.zeros_like(dots))
        trust = cos.clamp(min=0.0)
        total = float(trust.sum())
        metrics = {"robust_zero_trust": float((trust == 0).sum()),
                   "robust_trust_mean": float(trust.mean())}
        if total == 0.0 or ref_norm == 0.0:
            zero = torch.zeros(n, dtype=torch.float64, device=deltas.device)
            return RobustResult(torch.zeros_like(deltas[0]), zero, metrics)
        shares = trust / total
        scale = torch.where(norms > 0, ref_norm / norms.clamp(min=1e-300),
                            torch.zeros_like(norms))
        delta = weighted_sum(deltas, shares * scale)
        return RobustResult(delta, shares, metrics)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "root_samples": None if self.root_data is None
                else len(self.root_data), "epochs": self.epochs,
                "batch_size": self.batch_size, "lr": self.lr}
