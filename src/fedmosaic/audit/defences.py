"""What stands between a client's update and the gradient-leakage attacker (the server).

Each defence says how a client transforms its update before upload (``apply``), how many
clients' updates the server sees summed (``clients``) and whether the attacker knows which
coordinates were kept (``support_visible``):

- ``NoDefence``: the server sees the plain update.
- ``GaussianNoise``: clip to L2 norm ``clip`` and add N(0, (z * clip)^2) per coordinate on the
  client -- the mechanism of :class:`fedmosaic.privacy.local_dp.LocalDP`, which it calls.
  ``clip=None`` clips at the update's own norm (clipping is then a no-op and the noise is
  ``z`` times the update's norm: z is a pure noise-to-signal ratio).
- ``TopK``: keep the ``keep`` fraction of coordinates of largest magnitude, zero the rest
  (gradient pruning, the defence Zhu et al. 2019 evaluate); the server sees which survived.
- ``SecureAggregation``: the server sees only the sum of ``clients`` single-sample updates
  (what SecAgg+ reveals: :mod:`fedmosaic.privacy.secagg`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedmosaic.audit.errors import AuditError

DEFENCE_NAMES = ("none", "dp", "topk", "secagg")
# Noise multipliers from "negligible next to the update" to "several times the update's
# norm on every coordinate" (labels survive far more noise than inputs).
DEFAULT_NOISE = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
DEFAULT_KEEP = (0.3, 0.1, 0.03, 0.01)
DEFAULT_SECAGG_CLIENTS = (2, 4, 8)


@dataclass(frozen=True)
class NoDefence:
    """The plain update."""

    kind = "none"
    clients = 1
    support_visible = False

    @property
    def label(self) -> str:
        return "none"

    def params(self) -> dict[str, Any]:
        return {}

    def apply(self, delta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return delta


@dataclass(frozen=True)
class GaussianNoise:
    """Local DP on the client: clip to ``clip`` (None: the update's norm), add N(0, (z*clip)^2)."""

    noise_multiplier: float
    clip: float | None = None
    kind = "dp"
    clients = 1
    support_visible = False

    def __post_init__(self) -> None:
        z = self.noise_multiplier
        if not (isinstance(z, (int, float)) and math.isfinite(z) and z > 0):
            raise AuditError(f"dp noise multiplier must be a finite number > 0, got {z!r}")
        if self.clip is not None and not (math.isfinite(self.clip) and self.clip > 0):
            raise AuditError(f"dp clip must be a finite number > 0, got {self.clip!r}")

    @property
    def label(self) -> str:
        clip = "" if self.clip is None else f", S={self.clip:g}"
        return f"dp z={self.noise_multiplier:g}{clip}"

    def params(self) -> dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier,
                "clip": "update norm" if self.clip is None else self.clip}

    def apply(self, delta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        from fedmosaic.privacy.local_dp import LocalDP

        clip = self.clip if self.clip is not None else float(torch.linalg.vector_norm(delta))
        if not clip > 0:  # an all-zero update: any positive clip leaves it unchanged
            clip = 1.0
        return LocalDP(clip=clip, noise_multiplier=float(self.noise_multiplier)).apply(
            delta, generator)


@dataclass(frozen=True)
class TopK:
    """Keep the ``keep`` fraction (at least one) of coordinates with the largest magnitude."""

    keep: float
    kind = "topk"
    clients = 1
    support_visible = True

    def __post_init__(self) -> None:
        if not (isinstance(self.keep, (int, float)) and 0 < self.keep <= 1):
            raise AuditError(f"topk keep fraction must be in (0, 1], got {self.keep!r}")

    @property
    def label(self) -> str:
        return f"topk keep={self.keep:g}"

    def params(self) -> dict[str, Any]:
        return {"keep": self.keep}

    def apply(self, delta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        k = max(1, math.ceil(self.keep * delta.numel()))
        out = torch.zeros_like(delta)
        idx = delta.abs().topk(k).indices
        out[idx] = delta[idx]
        return out


@dataclass(frozen=True)
class SecureAggregation:
    """The server sees only the sum of ``clients`` clients' single-sample updates."""

    clients: int
    kind = "secagg"
    support_visible = False

    def __post_init__(self) -> None:
        if not (isinstance(self.clients, int) and self.clients >= 2):
            raise AuditError(f"secagg needs clients >= 2 (one client's sum is its update), "
                             f"got {self.clients!r}")

    @property
    def label(self) -> str:
        return f"secagg K={self.clients}"

    def params(self) -> dict[str, Any]:
        return {"clients": self.clients}

    def apply(self, delta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return delta


Defence = NoDefence | GaussianNoise | TopK | SecureAggregation


def expand_defences(
    names: Iterable[str],
    *,
    noise_multipliers: Sequence[float] = DEFAULT_NOISE,
    keep_fractions: Sequence[float] = DEFAULT_KEEP,
    secagg_clients: Sequence[int] = DEFAULT_SECAGG_CLIENTS,
    clip: float | None = None,
) -> list[Defence]:
    """Defences by name, each name expanded over its grid (``dp`` over ``noise_multipliers``,
    ``topk`` over ``keep_fractions``, ``secagg`` over ``secagg_clients``)."""
    out: list[Defence] = []
    seen: set[str] = set()
    for name in names:
        if name not in DEFENCE_NAMES:
            raise AuditError(f"unknown defence {name!r}; allowed: {', '.join(DEFENCE_NAMES)}")
        if name in seen:
            continue
        seen.add(name)
        grid: list[Defence]
        if name == "none":
            grid = [NoDefence()]
        elif name == "dp":
            grid = [GaussianNoise(float(z), clip) for z in noise_multipliers]
        elif name == "topk":
            grid = [TopK(float(p)) for p in keep_fractions]
        else:
            grid = [SecureAggregation(int(k)) for k in secagg_clients]
        if not grid:
            raise AuditError(f"defence {name!r} was asked for with an empty grid")
        out.extend(grid)
    if not out:
        raise AuditError(f"no defences given; allowed: {', '.join(DEFENCE_NAMES)}")
    return out
