"""Local differential privacy: each client privatises its own update before upload, so the
server (and anyone on the wire) never sees an un-noised update; and the Laplace mechanism for
released scalar statistics.

Local DP needs no trusted server but far more noise than central DP (each report is noised,
not just the sum). The unit is one client's report in one round; over several rounds the
per-report guarantees compose (the report's ``rounds`` composition is computed with the RDP
accountant for the Gaussian mechanism, by basic composition for Laplace).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedmosaic.privacy.randomness import NoiseSource, as_noise_source

MECHANISMS = ("gaussian", "laplace")


@dataclass(frozen=True)
class LocalDP:
    """A client stage: clip the update, then add noise, on the client.

    ``mechanism="gaussian"``: clip to L2 norm ``clip`` and add N(0, (noise_multiplier*clip)^2)
    to every coordinate; any two clipped updates are at most ``2*clip`` apart in L2.
    ``mechanism="laplace"``: clip to L1 norm ``clip`` and add Laplace noise of scale
    ``2*clip/epsilon`` per coordinate, which makes each report ``epsilon``-DP (pure DP; the
    L1 distance between two clipped updates is at most ``2*clip``).
    """

    clip: float
    mechanism: str = "gaussian"
    noise_multiplier: float | None = None
    epsilon: float | None = None

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"LocalDP mechanism must be one of {MECHANISMS}, "
                             f"got {self.mechanism!r}")
        if not self.clip > 0:
            raise ValueError(f"LocalDP clip must be > 0, got {self.clip}")
        if self.mechanism == "gaussian":
            if self.noise_multiplier is None or not self.noise_multiplier > 0:
                raise ValueError("LocalDP gaussian needs noise_multiplier > 0")
            if self.epsilon is not None:
                raise ValueError("LocalDP gaussian takes noise_multiplier, not epsilon")
        else:
            if self.epsilon is None or not self.epsilon > 0:
                raise ValueError("LocalDP laplace needs epsilon > 0")
            if self.noise_multiplier is not None:
                raise ValueError("LocalDP laplace takes epsilon, not noise_multiplier")

    def apply(self, delta: torch.Tensor,
              noise: NoiseSource | torch.Generator) -> torch.Tensor:
        """The privatised update (a new tensor), with noise drawn from ``noise``: the client's
        ``SecureNoise`` in a deployment, seeded noise in a simulation (a bare
        ``torch.Generator`` is taken as seeded noise)."""
        source = as_noise_source(noise)
        if self.mechanism == "gaussian":
            norm = float(torch.linalg.vector_norm(delta))
            clipped = delta if norm <= self.clip else delta * (self.clip / norm)
            assert self.noise_multiplier is not None
            return clipped + source.gaussian(delta.shape, self.noise_multiplier * self.clip,
                                             delta.dtype).to(delta.device)
        norm1 = float(delta.abs().sum())
        clipped = delta if norm1 <= self.clip else delta * (self.clip / norm1)
        assert self.epsilon is not None
        scale = 2 * self.clip / self.epsilon
        return clipped + source.laplace(delta.shape, scale, delta.dtype).to(delta.device)

    def guarantee(self, rounds: int, delta: float = 1e-5) -> dict[str, Any]:
        """What one client's reports over ``rounds`` rounds guarantee."""
        if self.mechanism == "laplace":
            assert self.epsilon is not None
            return {"unit": "one client's report", "mechanism": "laplace",
                    "epsilon_per_round": self.epsilon,
                    "epsilon_total": self.epsilon * rounds, "delta": 0.0,
                    "composition": "basic", "rounds": rounds}
        from fedmosaic.privacy.accountant import epsilon_for

        assert self.noise_multiplier is not None
        # Sensitivity 2*clip with noise std z*clip: a Gaussian with multiplier z/2.
        z = self.noise_multiplier / 2
        return {"unit": "one client's report", "mechanism": "gaussian",
                "epsilon_per_round": epsilon_for(z, 1, "none", delta=delta),
                "epsilon_total": epsilon_for(z, max(rounds, 1), "none", delta=delta),
                "delta": delta, "composition": "RDP", "rounds": rounds}


@dataclass(frozen=True)
class DistributedNoiseShare:
    """A client stage for distributed DP: clip to L2 norm ``clip`` and add this client's share
    N(0, noise_std^2) of the noise, so that a secure sum of at least ``min_contributors``
    updates carries the full noise and no party ever sees an un-noised sum.

    With total noise ``z * clip`` wanted on the sum, each client adds
    ``noise_std = z * clip / sqrt(min_contributors)``: the variances of independent Gaussian
    shares add up (the idea of distributed noise generation, Dwork et al. 2006, "Our Data,
    Ourselves"; used with secure aggregation by Kairouz et al. 2021, "The Distributed Discrete
    Gaussian Mechanism for Federated Learning with Secure Aggregation").
    """

    clip: float
    noise_std: float

    def __post_init__(self) -> None:
        if not self.clip > 0:
            raise ValueError(f"clip must be > 0, got {self.clip}")
        if not self.noise_std > 0:
            raise ValueError(f"noise_std must be > 0, got {self.noise_std}")

    def apply(self, delta: torch.Tensor,
              noise: NoiseSource | torch.Generator) -> torch.Tensor:
        """The clipped update plus this client's noise share, drawn from ``noise`` (the
        client's ``SecureNoise`` in a deployment: the server must not be able to regenerate
        the share and subtract it)."""
        source = as_noise_source(noise)
        norm = float(torch.linalg.vector_norm(delta))
        clipped = delta if norm <= self.clip else delta * (self.clip / norm)
        return clipped + source.gaussian(delta.shape, self.noise_std,
                                         delta.dtype).to(delta.device)


def laplace_mechanism(value: float | np.ndarray, sensitivity: float, epsilon: float,
                      rng: np.random.Generator | NoiseSource) -> float | np.ndarray:
    """Release ``value`` with epsilon-DP: add Laplace noise of scale sensitivity/epsilon
    (Dwork, McSherry, Nissim and Smith 2006). ``sensitivity`` is the L1 sensitivity. ``rng``
    is a NumPy generator or a ``NoiseSource`` (whose generator is used): pass ``SecureNoise()``
    for a release that must not be reproducible by anyone else."""
    if isinstance(rng, NoiseSource):
        rng = rng.numpy()
    if not (sensitivity > 0 and math.isfinite(sensitivity)):
        raise ValueError(f"sensitivity must be a finite number > 0, got {sensitivity}")
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon}")
    scale = sensitivity / epsilon
    noisy = np.asarray(value, dtype=np.float64) + rng.laplace(0.0, scale, np.shape(value))
    return float(noisy) if np.ndim(value) == 0 else noisy
