"""Rényi-DP accounting for the (distributed) Skellam mechanism.

Agarwal, Kairouz and Liu 2021, "The Skellam Mechanism for Differentially Private Federated
Learning" (NeurIPS): adding ``Sk(mu)`` (the difference of two independent Poisson(mu/2)
variables, variance ``mu``) to every coordinate of an integer vector whose L1 and L2
sensitivities are ``Delta_1`` and ``Delta_2`` satisfies (alpha, eps(alpha))-RDP for every
real alpha > 1 with

    eps(alpha) = alpha * Delta_2^2 / (2 mu)
                 + min( ((2 alpha - 1) * Delta_2^2 + 6 Delta_1) / (4 mu^2),
                        3 Delta_1 / (2 mu) )

(their multi-dimensional Skellam RDP bound, in the integer domain: sensitivities and ``mu``
are in units of the integer grid). The first term is exactly the Gaussian mechanism's RDP with
``sigma^2 = mu``; the second vanishes as ``mu`` grows. Because ``Sk(a) + Sk(b) = Sk(a + b)``
exactly (sums of independent Poissons are Poisson), ``n`` clients each adding ``Sk(mu / n)``
give exactly ``Sk(mu)`` on the sum: unlike the distributed discrete Gaussian (Kairouz, Liu and
Steinke 2021) there is no inflation term for the distributed version.

Subsampling. dp-accounting has no Skellam event, so Poisson subsampling with rate ``q`` is
accounted with the general upper bound of Zhu and Wang 2019 ("Poisson Subsampled Rényi
Differential Privacy", ICML), valid for *any* mechanism at integer orders (the accounting of
the Skellam paper's own experiments):

    eps_q(alpha) <= 1/(alpha-1) * log( (1-q)^(alpha-1) (alpha q - q + 1)
                      + C(alpha,2) q^2 (1-q)^(alpha-2) e^{eps(2)}
                      + 3 sum_{l=3}^{alpha} C(alpha,l) (1-q)^(alpha-l) q^l e^{(l-1) eps(l)} )

and the minimum of that and the un-amplified ``eps(alpha)`` is used (both are valid bounds).
It is looser than the exact subsampled-Gaussian analysis DP-FedAvg uses (it equals it at
alpha = 2 and exceeds it at higher orders, the factor 3), so at the same epsilon Skellam needs
somewhat more noise, the more so the larger ``q`` (benchmarks/skellam.py).
Rounds compose by adding RDP at each order; the conversion to (epsilon, delta) is
dp-accounting's ``compute_epsilon`` (Canonne, Kamath and Steinke 2020, Prop. 12).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# Integer orders only: the Zhu-Wang bound is stated for integer alpha.
RDP_ORDERS: tuple[int, ...] = (*range(2, 65), 72, 80, 96, 112, 128, 160, 192, 256)


def skellam_rdp(alpha: float | np.ndarray, l1: float, l2: float, mu: float) -> np.ndarray:
    """RDP of adding ``Sk(mu)`` per coordinate to an integer query with L1/L2 sensitivities
    ``l1``/``l2`` (Agarwal, Kairouz and Liu 2021), at order(s) ``alpha > 1``."""
    a = np.asarray(alpha, dtype=np.float64)
    if np.any(a <= 1):
        raise ValueError("RDP orders must be > 1")
    if not (mu > 0 and math.isfinite(mu)):
        raise ValueError(f"Skellam variance mu must be a positive finite number, got {mu}")
    if l1 < 0 or l2 < 0:
        raise ValueError(f"sensitivities must be >= 0, got l1={l1}, l2={l2}")
    gaussian = a * l2 ** 2 / (2 * mu)
    extra = np.minimum(((2 * a - 1) * l2 ** 2 + 6 * l1) / (4 * mu ** 2), 3 * l1 / (2 * mu))
    return gaussian + extra


def poisson_subsampled_rdp(alpha: int, q: float, eps: Any) -> float:
    """Zhu and Wang 2019, general upper bound: RDP at integer order ``alpha`` of a mechanism
    with RDP function ``eps`` run on a Poisson subsample with rate ``q``; the un-amplified
    bound when it is smaller (and exactly ``eps(alpha)`` for ``q == 1``)."""
    alpha = int(alpha)
    if alpha < 2:
        raise ValueError(f"the subsampling bound needs an integer order >= 2, got {alpha}")
    if not 0 < q <= 1:
        raise ValueError(f"sampling rate q must be in (0, 1], got {q}")
    plain = float(eps(alpha))
    if q == 1:
        return plain
    from scipy import special  # on first use: a client that never subsamples skips scipy

    log1q, logq = math.log1p(-q), math.log(q)
    logs = [(alpha - 1) * log1q + math.log(alpha * q - q + 1),
            math.log(special.comb(alpha, 2)) + 2 * logq + (alpha - 2) * log1q + float(eps(2))]
    if alpha >= 3:
        ls = np.arange(3, alpha + 1)
        log_comb = (special.gammaln(alpha + 1) - special.gammaln(ls + 1)
                    - special.gammaln(alpha - ls + 1))
        eps_l = np.asarray(eps(ls), dtype=np.float64)
        terms = math.log(3) + log_comb + (alpha - ls) * log1q + ls * logq + (ls - 1) * eps_l
        logs.extend(terms.tolist())
    amplified = float(special.logsumexp(logs)) / (alpha - 1)
    return min(amplified, plain)


@dataclass(frozen=True)
class SkellamRound:
    """One release: Skellam variance ``mu`` (integer units) on a query with sensitivities
    ``l1``/``l2`` (integer units), on a Poisson subsample with rate ``q`` (1: no
    amplification)."""

    l1: float
    l2: float
    mu: float
    q: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.q <= 1:
            raise ValueError(f"sampling rate q must be in (0, 1], got {self.q}")
        skellam_rdp(2, self.l1, self.l2, self.mu)  # validates

    def rdp(self, orders: Sequence[int] = RDP_ORDERS) -> np.ndarray:
        def eps(a: Any) -> Any:
            return skellam_rdp(a, self.l1, self.l2, self.mu)

        return np.array([poisson_subsampled_rdp(a, self.q, eps) for a in orders])


class SkellamAccountant:
    """Composes Skellam rounds (RDP adds up over rounds) and converts to (epsilon, delta)."""

    def __init__(self, orders: Sequence[int] = RDP_ORDERS) -> None:
        if any(int(a) != a or a < 2 for a in orders):
            raise ValueError("orders must be integers >= 2")
        self.orders = tuple(int(a) for a in orders)
        self._counts: dict[SkellamRound, int] = {}
        self._cache: dict[SkellamRound, np.ndarray] = {}

    @property
    def steps(self) -> int:
        return sum(self._counts.values())

    def record(self, release: SkellamRound, count: int = 1) -> None:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self._counts[release] = self._counts.get(release, 0) + count

    def _per_round(self, release: SkellamRound) -> np.ndarray:
        if release not in self._cache:
            self._cache[release] = release.rdp(self.orders)
        return self._cache[release]

    def rdp(self) -> np.ndarray:
        total = np.zeros(len(self.orders))
        for release, count in self._counts.items():
            total += count * self._per_round(release)
        return total

    def epsilon(self, delta: float, extra: Sequence[tuple[SkellamRound, int]] = ()) -> float:
        """Epsilon at ``delta`` after the recorded rounds (plus hypothetical ``extra`` ones)."""
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        total = self.rdp()
        for release, count in extra:
            total = total + count * self._per_round(release)
        if not total.any():
            return 0.0
        # Imported here: dp-accounting costs a process about 1 s of start-up (scipy.signal).
        from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

        eps, _ = compute_epsilon(self.orders, total.tolist(), delta)
        return float(eps)

    def state_dict(self) -> dict[str, Any]:
        return {"orders": list(self.orders),
                "rounds": [{**asdict(r), "count": c} for r, c in self._counts.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.orders = tuple(int(a) for a in state["orders"])
        self._counts, self._cache = {}, {}
        for item in state["rounds"]:
            item = dict(item)
            count = int(item.pop("count"))
            self.record(SkellamRound(**item), count)


def skellam_epsilon(l1: float, l2: float, mu: float, rounds: int, delta: float,
                    q: float = 1.0) -> float:
    """Epsilon of ``rounds`` Skellam releases (Poisson rate ``q``) at ``delta``."""
    acc = SkellamAccountant()
    acc.record(SkellamRound(l1, l2, mu, q), rounds)
    return acc.epsilon(delta)


def calibrate_skellam_mu(target_epsilon: float, delta: float, rounds: int, *,
                         l1: float, l2: float, q: float = 1.0) -> float:
    """The smallest Skellam variance ``mu`` (to 0.1% relative) whose ``rounds`` releases cost
    at most ``target_epsilon`` at ``delta``; eps is decreasing in ``mu``, so bisection."""
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be a positive finite number, got {target_epsilon}")
    if l2 <= 0:
        raise ValueError(f"l2 sensitivity must be > 0, got {l2}")

    def eps(mu: float) -> float:
        return skellam_epsilon(l1, l2, mu, rounds, delta, q)

    lo, hi = 1e-6 * l2 ** 2, l2 ** 2
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 4
        if hi > 1e30:
            raise ValueError(f"no Skellam variance reaches epsilon {target_epsilon}")
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi
