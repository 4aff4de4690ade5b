"""Per-client fingerprints: trace a leaked model back to the client it was sent to.

Spread-spectrum marking (Cox, Kilian, Leighton and Shamoon 1997, "Secure Spread Spectrum
Watermarking for Multimedia") applied to weights: client ``c`` receives ``w + s * u_c``,
where ``u_c`` is a pseudo-random +-1 vector derived from the server's key and the client id
and ``s`` is a small ``strength``. The client trains from what it received and uploads its
delta relative to it, so the fingerprint never enters the aggregate. A model leaked by ``c``,
even after further training, still correlates with ``u_c``; with ``r = leaked - reference``
(``reference``: the global weights sent that round, which the server keeps), the detector is
the correlation ``<r, u_c>``.

For a client whose direction is not in the model, ``u_c`` is independent of ``r``, so
``<r, u_c>`` has mean 0 and variance ``||r||^2`` exactly; ``z_c = <r, u_c> / ||r||`` is a
standard score (approximately normal by the central limit theorem over the weights) and its
one-sided tail, corrected for the number of candidates (Bonferroni), is the probability of
accusing a client by chance. The recipient's expected score is ``s * sqrt(D) / rms(r)``
(``D`` weights), so longer vectors and smaller drift trace more reliably.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedmosaic.core.errors import ConfigError, SpecMismatchError
from fedmosaic.watermark.keys import WatermarkKey

_PURPOSE = "client-fingerprint:"


class ClientFingerprint:
    """The per-client dispatch transform ``(client_id, weights) -> weights + s * u_c``
    (a ``DispatchTransform`` for ``FedAvg(dispatch_transform=...)``)."""

    def __init__(self, key: WatermarkKey, strength: float = 0.01) -> None:
        if not isinstance(key, WatermarkKey):
            raise ConfigError("watermark.key", type(key).__name__, "a WatermarkKey")
        if isinstance(strength, bool) or not isinstance(strength, int | float) or \
                not (0 < strength < 1 and math.isfinite(strength)):
            raise ConfigError("watermark.fingerprint_strength", strength, "a number in (0, 1)")
        self.key, self.strength = key, float(strength)

    def direction(self, client_id: str, numel: int) -> torch.Tensor:
        """The client's +-1 direction (float32, ``numel`` long), a pure function of the key."""
        if not isinstance(client_id, str) or not client_id:
            raise ConfigError("client_id", client_id, "a non-empty string")
        rng = np.random.default_rng(self.key.seed(_PURPOSE + client_id))
        signs = rng.integers(0, 2, size=numel, dtype=np.int8) * 2 - 1
        return torch.from_numpy(signs.astype(np.float32))

    def __call__(self, client_id: str, weights: torch.Tensor) -> torch.Tensor:
        if not isinstance(weights, torch.Tensor) or weights.ndim != 1:
            raise SpecMismatchError("fingerprinting needs a flat weight vector")
        u = self.direction(client_id, weights.numel()).to(weights.device, weights.dtype)
        return weights + self.strength * u

    def describe(self) -> dict[str, Any]:
        return {"fingerprint": "spread-spectrum +-1 per client (Cox et al. 1997)",
                "key_fingerprint": self.key.fingerprint, "strength": self.strength}

    def __repr__(self) -> str:
        return (f"ClientFingerprint(key_fingerprint={self.key.fingerprint}, "
                f"strength={self.strength})")


@dataclass(frozen=True)
class TraceScore:
    """One candidate's evidence: ``score`` estimates the share of the client's fingerprint
    still in the model (1 = intact, 0 = absent); ``z`` is the standard score and
    ``p_value`` the Bonferroni-corrected chance of a score this high without the mark."""

    client_id: str
    score: float
    z: float
    p_value: float


def trace(
    leaked: torch.Tensor,
    reference: torch.Tensor,
    candidates: Sequence[str],
    fingerprint: ClientFingerprint,
) -> list[TraceScore]:
    """Rank ``candidates`` by how strongly ``leaked`` carries their fingerprint, best first.

    ``reference`` is the un-fingerprinted global model the candidates were sent (the same
    round's weights); the best candidate is the likely source when its ``p_value`` is small.
    """
    for name, t in (("leaked", leaked), ("reference", reference)):
        if not isinstance(t, torch.Tensor) or t.ndim != 1:
            raise SpecMismatchError(f"{name} must be a flat weight vector")
        if not torch.isfinite(t).all():
            raise SpecMismatchError(f"{name} has non-finite values")
    if leaked.numel() != reference.numel():
        raise SpecMismatchError(f"leaked model has {leaked.numel()} weights, the reference "
                                f"{reference.numel()}")
    ids = list(candidates)
    if not ids or len(set(ids)) != len(ids):
        raise ConfigError("candidates", ids, "a non-empty list of distinct client ids")
    r = (leaked.detach().double().cpu() - reference.detach().double().cpu())
    norm = float(r.norm())
    d = r.numel()
    scores = []
    for cid in ids:
        corr = float(r @ fingerprint.direction(cid, d).double())
        z = corr / norm if norm > 0 else 0.0
        p = min(1.0, len(ids) * 0.5 * math.erfc(z / math.sqrt(2)))
        scores.append(TraceScore(cid, corr / (fingerprint.strength * d), z, p))
    return sorted(scores, key=lambda s: s.z, reverse=True)
