"""Model poisoning: malicious clients upload a crafted update instead of their honest one."""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import torch

from fedmosaic.attacks.base import Attack, RoundView, check_positive
from fedmosaic.core.errors import ConfigError


@dataclass(frozen=True)
class SignFlip(Attack):
    """Sign flipping: upload ``-scale * delta``, the honest update reversed (the
    "sign-flipping" Byzantine behaviour of Li et al. 2019, "RSA: Byzantine-Robust Stochastic
    Aggregation Methods for Distributed Learning from Heterogeneous Datasets", and
    Karimireddy et al. 2021). ``scale = 1`` is the plain reversal."""

    scale: float = 1.0

    name = "sign_flip"
    poisons_updates = True

    def __post_init__(self) -> None:
        check_positive("scale", self.scale)

    def craft_update(self, delta: torch.Tensor, view: RoundView) -> torch.Tensor:
        return delta * -self.scale


@dataclass(frozen=True)
class GaussianNoise(Attack):
    """Gaussian attack: upload ``N(0, std^2 I)`` noise in place of the update (Blanchard et
    al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent").
    The noise is drawn from the client's round seed, so runs are reproducible."""

    std: float = 1.0

    name = "gaussian"
    poisons_updates = True

    def __post_init__(self) -> None:
        check_positive("std", self.std)

    def craft_update(self, delta: torch.Tensor, view: RoundView) -> torch.Tensor:
        noise = torch.randn(delta.shape, generator=view.generator, dtype=torch.float32)
        return (noise * self.std).to(delta.device)


def alie_z_max(n: int, m: int) -> float:
    """Baruch et al.'s largest undetected shift, in benign standard deviations.

    With ``n`` clients of which ``m`` are malicious, the attackers need
    ``s = floor(n/2 + 1) - m`` benign clients on their side to win a majority, and choose the
    ``z`` for which ``s`` of the ``n - m`` benign values are expected to lie further from the
    mean: ``z_max = Phi^-1((n - s) / n)``. For n = 50, m = 12: s = 14, z_max = 0.5828.
    """
    for key, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "an integer")
    if n < 2:
        raise ConfigError("n", n, "an integer >= 2 (clients in the round)")
    if not 1 <= m <= n // 2:
        raise ConfigError("m", m, f"an integer in [1, {n // 2}]: ALIE assumes a malicious "
                                  f"minority, s = floor(n/2 + 1) - m >= 1")
    s = n // 2 + 1 - m
    return NormalDist().inv_cdf((n - s) / n)


@dataclass(frozen=True)
class ALIE(Attack):
    """A Little Is Enough (Baruch et al. 2019, "A Little Is Enough: Circumventing Defenses
    For Distributed Learning").

    Every malicious client uploads ``mean - z * std``, per coordinate, of the round's benign
    updates: a shift small enough to stay inside the spread that median- and distance-based
    rules accept, applied consistently across coordinates. ``z`` defaults to
    :func:`alie_z_max` of the round's ``n`` selected and ``m`` malicious clients. Here the
    attackers are omniscient (they see the benign updates); the paper estimates the same
    statistics from the attackers' own honest updates, which in IID settings are close.
    """

    z: float | None = None

    name = "alie"
    poisons_updates = True
    omniscient = True
    min_benign = 2

    def __post_init__(self) -> None:
        if self.z is not None:
            check_positive("z", self.z)

    def z_for(self, n: int, m: int) -> float:
        """The shift in a round with ``n`` selected clients, ``m`` of them malicious."""
        if self.z is not None:
            return float(self.z)
        # A sampled cohort may hold a malicious majority (s <= 0, an infinite z_max): the
        # attackers then need no benign ally, and use the largest finite shift, s = 1.
        return alie_z_max(n, min(m, n // 2))

    def craft_update(self, delta: torch.Tensor, view: RoundView) -> torch.Tensor:
        if view.benign_mean is None or view.benign_std is None:
            raise ValueError("ALIE needs the round's benign mean and standard deviation")
        crafted = view.benign_mean - self.z_for(view.n, view.m) * view.benign_std
        return crafted.to(dtype=torch.float32, device=delta.device)


@dataclass(frozen=True)
class IPM(Attack):
    """Inner Product Manipulation (Xie et al. 2020, "Fall of Empires: Breaking Byzantine-
    tolerant SGD by Inner Product Manipulation").

    Every malicious client uploads ``-epsilon * mean`` of the round's benign updates. A small
    ``epsilon`` targets median- and Krum-style rules: the identical malicious points sit
    close to the benign ones, so those rules keep selecting or leaning towards them. Against
    the plain mean the aggregate's inner product with the benign mean turns negative only
    when ``epsilon > (n - m) / m`` (4 for 20% attackers). The default 0.5 is the small-
    ``epsilon`` regime.
    """

    epsilon: float = 0.5

    name = "ipm"
    poisons_updates = True
    omniscient = True
    min_benign = 1

    def __post_init__(self) -> None:
        check_positive("epsilon", self.epsilon)

    def craft_update(self, delta: torch.Tensor, view: RoundView) -> torch.Tensor:
        if view.benign_mean is None:
            raise ValueError("IPM needs the round's benign mean")
        return (view.benign_mean * -self.epsilon).to(dtype=torch.float32, device=delta.device)
