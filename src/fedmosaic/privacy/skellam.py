"""The distributed Skellam mechanism: integer noise that secure aggregation can sum.

Agarwal, Kairouz and Liu 2021, "The Skellam Mechanism for Differentially Private Federated
Learning" (NeurIPS), Algorithm 1. Every client, on its own device:

1. clips its update ``x`` to L2 norm ``c``;
2. scales it by ``gamma`` (integer levels per unit) and applies a random rotation
   ``U = H D / sqrt(d')`` (randomized Hadamard transform: ``D`` random signs from a public seed
   shared by everyone, ``H`` the Walsh-Hadamard matrix, ``d'`` the dimension padded to a power
   of two), which spreads the vector's energy evenly over the coordinates so that the sum's
   coordinates are small (the modular-clipping bound below);
3. rounds to integers by *conditional* randomized rounding (Kairouz, Liu and Steinke 2021,
   "The Distributed Discrete Gaussian Mechanism for Federated Learning with Secure
   Aggregation", ICML, Theorem 1): each coordinate is rounded up with probability equal to its
   fractional part, and the rounding is redrawn until the L2 norm is at most
   ``Delta_2 = min(gamma c + sqrt(d'), sqrt((gamma c)^2 + d'/4
   + sqrt(2 ln(1/beta)) (gamma c + sqrt(d')/2)))``, which a single draw meets with probability
   at least ``1 - beta``. ``Delta_2`` and ``Delta_1 = Delta_2 * min(sqrt(d'), Delta_2)`` (an
   integer vector has ``||v||_1 <= ||v||_2^2``) are the sensitivities the accountant uses;
4. adds its share ``Sk(mu / m)`` of the Skellam noise to every coordinate (``m`` =
   ``min_contributors``), so that any ``m`` shares sum to exactly ``Sk(mu)``;
5. submits the result mod ``2^bits`` to SecAgg+.

The server unmasks the sum mod ``2^bits``, reads it as signed integers, divides by ``gamma``
and applies the inverse rotation ``D H / sqrt(d')``. Privacy comes from the integer noise
alone; the modular wrap-around, the unscaling and the rotation are post-processing.

Modular clipping. The sum must not wrap around mod ``2^bits``. For a sum of at most ``n``
client vectors, coordinate ``j`` of the sum is ``signal_j + rounding_j + noise_j`` with
``|rounding_j| < n`` (each rounding moves a coordinate by less than one level),
``noise_j ~ Sk(n * mu / m)``, and, with the rotation, ``signal_j = (U gamma sum_i x_i)_j``,
where ``||gamma sum_i x_i|| <= n gamma c``; for inputs chosen independently of the public
signs ``D``, Hoeffding's inequality gives ``P(|signal_j| >= a) <= 2 exp(-a^2 d' / (2 (n gamma
c)^2))``, and the Chernoff bound for the Skellam law (log-MGF ``v (cosh s - 1)``) gives
``P(|noise_j| >= b) <= 2 exp(-(b asinh(b/v) - sqrt(v^2 + b^2) + v))``. A union bound over the
``d'`` coordinates bounds the probability that any coordinate wraps. Without the rotation the
signal is bounded deterministically by ``n * Delta_2``. :meth:`SkellamMechanism.wrap_probability`
returns this bound and the mechanism refuses a configuration whose bound exceeds
``max_wrap_probability``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fedmosaic.privacy.secagg.crypto import reduce_mod, ring_dtype
from fedmosaic.privacy.skellam_accountant import SkellamRound

# A coordinate wider than 2^53 cannot be held exactly in float64 during scaling.
_MAX_EXACT = float(1 << 53)
_MAX_ROUNDING_TRIES = 1000
# NumPy's Poisson sampler refuses lam above ~9.2e18; stay well below.
_MAX_POISSON_LAM = 1e18


def padded_dim(dim: int) -> int:
    """The smallest power of two >= ``dim`` (the Hadamard transform's length)."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    return 1 << (dim - 1).bit_length()


def fwht(x: np.ndarray) -> np.ndarray:
    """Orthonormal fast Walsh-Hadamard transform of a float vector whose length is a power of
    two (a new array); it is its own inverse."""
    y = np.array(x, dtype=np.float64)
    n = y.shape[0]
    if n & (n - 1):
        raise ValueError(f"length must be a power of two, got {n}")
    h = 1
    while h < n:
        v = y.reshape(-1, 2, h)
        a = v[:, 0, :].copy()
        v[:, 0, :] += v[:, 1, :]
        v[:, 1, :] = a - v[:, 1, :]
        h *= 2
    y /= math.sqrt(n)
    return y


def rounded_l2_bound(scaled_clip: float, dprime: int, beta: float) -> float:
    """``Delta_2``: the L2 norm of a vector of norm at most ``scaled_clip`` in ``dprime``
    coordinates after conditional randomized rounding at ``beta`` (Kairouz, Liu and Steinke
    2021, Theorem 1): ``scaled_clip + sqrt(d')`` always holds (each coordinate moves by less
    than 1); with ``beta > 0`` the tighter bound holds for a single draw with probability at
    least ``1 - beta`` and conditional rounding redraws until it does."""
    bound = scaled_clip + math.sqrt(dprime)
    if beta > 0:
        squared = (scaled_clip ** 2 + dprime / 4
                   + math.sqrt(2 * math.log(1 / beta)) * (scaled_clip + math.sqrt(dprime) / 2))
        bound = min(bound, math.sqrt(squared))
    return bound


def skellam_tail(b: float, variance: float) -> float:
    """Chernoff bound on ``P(|Z| >= b)`` for ``Z ~ Sk(variance)``: ``log E e^{sZ} = v (cosh s -
    1)``, minimised over ``s`` at ``sinh s = b / v``."""
    if b <= 0:
        return 1.0
    if variance <= 0:
        return 0.0
    y = b / variance
    exponent = b * math.asinh(y) - variance * (math.sqrt(1 + y * y) - 1)
    return min(1.0, 2 * math.exp(-exponent))


@dataclass(frozen=True)
class SkellamMechanism:
    """Client-side encoding and server-side decoding of the distributed Skellam mechanism.

    ``clip`` is the L2 clip ``c`` (float units), ``gamma`` the scale (integer levels per unit),
    ``mu`` the Skellam variance on the sum in integer units, ``min_contributors`` the number of
    shares ``m`` that together carry ``Sk(mu)`` (each client adds ``Sk(mu / m)``),
    ``max_clients`` the most vectors ``n`` one sum may hold (the modular-clipping bound is
    designed for it), ``bits`` the SecAgg ring, ``beta`` the conditional-rounding parameter
    (0: plain randomized rounding with the deterministic bound), ``rotation`` the randomized
    Hadamard transform with public seed ``rotation_seed`` (fresh signs each round).
    """

    dim: int
    clip: float
    gamma: float
    mu: float
    min_contributors: int
    max_clients: int
    bits: int = 32
    beta: float = math.exp(-0.5)
    rotation: bool = True
    rotation_seed: int = 0
    max_wrap_probability: float = 1e-9
    _dprime: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a positive finite number, got {self.clip}")
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"gamma must be a positive finite number, got {self.gamma}")
        if not (math.isfinite(self.mu) and self.mu > 0):
            raise ValueError(f"mu (Skellam variance) must be a positive finite number, "
                             f"got {self.mu}")
        if self.min_contributors < 1:
            raise ValueError(f"min_contributors must be >= 1, got {self.min_contributors}")
        if self.max_clients < self.min_contributors:
            raise ValueError(f"max_clients ({self.max_clients}) must be >= min_contributors "
                             f"({self.min_contributors})")
        if not 2 <= self.bits <= 64:
            raise ValueError(f"bits must be in [2, 64], got {self.bits}")
        if not 0 <= self.beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {self.beta}")
        if not 0 < self.max_wrap_probability < 1:
            raise ValueError(f"max_wrap_probability must be in (0, 1), got "
                             f"{self.max_wrap_probability}")
        object.__setattr__(self, "_dprime", padded_dim(self.dim) if self.rotation else self.dim)
        if self.gamma * self.clip + math.sqrt(self._dprime) >= _MAX_EXACT:
            raise ValueError(f"gamma * clip = {self.gamma * self.clip:g} is too large for exact "
                             "float64 rounding (must stay below 2^53)")
        if self.max_clients * self.share_mu / 2 > _MAX_POISSON_LAM:
            raise ValueError(f"Skellam variance {self.mu:g} is too large to sample exactly; use "
                             "a smaller gamma (the noise scales with gamma^2)")
        p = self.wrap_probability()
        if p > self.max_wrap_probability:
            safe = max_gamma(self.dim, self.clip, self.mu / self.gamma ** 2, self.bits,
                             self.max_clients, self.min_contributors, beta=self.beta,
                             rotation=self.rotation,
                             max_wrap_probability=self.max_wrap_probability)
            raise ValueError(
                f"modular clipping: the sum of {self.max_clients} clients' Skellam-noised "
                f"vectors may wrap around mod 2^{self.bits} with probability up to {p:.3g} > "
                f"{self.max_wrap_probability:g}; use more bits, a smaller gamma, fewer clients "
                f"or less noise (largest safe gamma for these settings: {safe:.6g})")

    # -- parameters ---------------------------------------------------------------------------
    @property
    def encoded_dim(self) -> int:
        """``d'``: coordinates each client submits (``dim`` padded to a power of two when
        rotating)."""
        return self._dprime

    @property
    def share_mu(self) -> float:
        """The Skellam variance each client adds: ``mu / min_contributors``."""
        return self.mu / self.min_contributors

    @property
    def l2_sensitivity(self) -> float:
        """``Delta_2``: the L2 norm bound of one client's rounded integer vector (Kairouz, Liu
        and Steinke 2021, Theorem 1 with conditional rounding at ``beta``)."""
        return rounded_l2_bound(self.gamma * self.clip, self._dprime, self.beta)

    @property
    def l1_sensitivity(self) -> float:
        """``Delta_1 = Delta_2 * min(sqrt(d'), Delta_2)``: Cauchy-Schwarz, and ``||v||_1 <=
        ||v||_2^2`` for integer vectors."""
        l2 = self.l2_sensitivity
        return l2 * min(math.sqrt(self._dprime), l2)

    def release(self, q: float = 1.0) -> SkellamRound:
        """One round for the accountant (sensitivities and ``mu`` in integer units)."""
        return SkellamRound(self.l1_sensitivity, self.l2_sensitivity, self.mu, q)

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise per coordinate of the decoded sum (float units),
        with exactly ``min_contributors`` shares."""
        return math.sqrt(self.mu) / self.gamma

    def wrap_probability(self) -> float:
        """Upper bound on the probability that any coordinate of a sum of ``max_clients``
        encodings wraps around mod ``2^bits`` (module docstring)."""
        return _wrap_bound(self._dprime, self.gamma * self.clip, self.l2_sensitivity,
                           self.max_clients * self.share_mu, self.bits, self.max_clients,
                           self.rotation)

    # -- client side ----------------------------------------------------------------------------
    def signs(self, round_num: int) -> np.ndarray:
        """The public random signs ``D`` of round ``round_num`` (same for every client)."""
        rng = np.random.default_rng(np.random.SeedSequence([self.rotation_seed, round_num,
                                                            0x5CE11A]))
        return rng.integers(0, 2, self._dprime).astype(np.float64) * 2 - 1

    def rotate(self, x: np.ndarray, round_num: int) -> np.ndarray:
        """``U x`` (x padded with zeros to ``d'``); the identity without rotation."""
        if not self.rotation:
            return np.array(x, dtype=np.float64)
        padded = np.zeros(self._dprime)
        padded[: self.dim] = x
        return fwht(padded * self.signs(round_num))

    def unrotate(self, y: np.ndarray, round_num: int) -> np.ndarray:
        """``U^T y`` truncated to ``dim``: the inverse rotation."""
        if not self.rotation:
            return np.asarray(y, dtype=np.float64)
        return (fwht(y) * self.signs(round_num))[: self.dim]

    def round_to_integers(self, values: np.ndarray, rng: np.random.Generator,
                          round_num: int) -> np.ndarray:
        """Steps 1-3: clip, scale, rotate and conditionally round; int64, L2 norm at most
        :attr:`l2_sensitivity`, before any noise."""
        x = np.asarray(values, dtype=np.float64).reshape(-1)
        if x.shape[0] != self.dim:
            raise ValueError(f"expected a vector of {self.dim} values, got {x.shape[0]}")
        if not np.isfinite(x).all():
            raise ValueError("cannot encode NaN or infinite values")
        norm = float(np.linalg.norm(x))
        if norm > self.clip:
            x = x * (self.clip / norm)
        y = self.rotate(x * self.gamma, round_num)
        floor = np.floor(y)
        frac = y - floor
        bound_sq = self.l2_sensitivity ** 2
        for _ in range(_MAX_ROUNDING_TRIES):
            rounded = floor + (rng.random(y.shape) < frac)
            if float(np.dot(rounded, rounded)) <= bound_sq:
                return rounded.astype(np.int64)
        raise RuntimeError(  # probability <= beta^1000: a broken random source, not bad luck
            f"conditional rounding did not meet the norm bound in {_MAX_ROUNDING_TRIES} tries")

    def noise_share(self, rng: np.random.Generator) -> np.ndarray:
        """Step 4: this client's ``Sk(mu / m)`` per coordinate, the difference of two
        Poisson(mu / 2m) draws (exact integers: no floating-point noise to attack)."""
        lam = self.share_mu / 2
        return (rng.poisson(lam, self._dprime) - rng.poisson(lam, self._dprime)).astype(np.int64)

    def encode(self, values: np.ndarray, rng: np.random.Generator,
               round_num: int) -> np.ndarray:
        """One client's submission: its rounded vector plus its noise share, mod ``2^bits``
        (ring dtype). ``rng`` must be the client's private noise source."""
        q = self.round_to_integers(values, rng, round_num) + self.noise_share(rng)
        return reduce_mod(q.view(np.uint64), self.bits).astype(ring_dtype(self.bits))

    # -- server side ------------------------------------------------------------------------------
    def to_signed(self, total: np.ndarray) -> np.ndarray:
        """The unmasked sum mod ``2^bits`` read as signed integers (int64)."""
        residues = np.asarray(total).astype(np.uint64) & np.uint64((1 << self.bits) - 1)
        if self.bits == 64:
            return residues.view(np.int64).copy()
        signed = residues.astype(np.int64)
        signed[signed >= (1 << (self.bits - 1))] -= 1 << self.bits
        return signed

    def decode(self, total: np.ndarray, round_num: int) -> np.ndarray:
        """The float sum (length ``dim``): signed, divided by ``gamma``, rotated back."""
        if np.shape(total) != (self._dprime,):
            raise ValueError(f"expected a sum of {self._dprime} coordinates, "
                             f"got shape {np.shape(total)}")
        return self.unrotate(self.to_signed(total).astype(np.float64) / self.gamma, round_num)

    def describe(self) -> dict[str, float | int | bool]:
        return {"mechanism": "skellam", "clip": self.clip, "gamma": self.gamma, "mu": self.mu,
                "share_mu": self.share_mu, "min_contributors": self.min_contributors,
                "max_clients": self.max_clients, "bits": self.bits, "beta": self.beta,
                "rotation": "randomized Hadamard" if self.rotation else "none",
                "encoded_dim": self._dprime, "l2_sensitivity": self.l2_sensitivity,
                "l1_sensitivity": self.l1_sensitivity,
                "wrap_probability_bound": self.wrap_probability()}


def _wrap_bound(dprime: int, scaled_clip: float, l2: float, noise_var: float, bits: int,
                n: int, rotation: bool) -> float:
    """Union bound over ``dprime`` coordinates on a wrap of the sum of ``n`` encodings."""
    room = (1 << (bits - 1)) - 1 - n  # |rounding_j| < n
    if room <= 0:
        return 1.0
    if not rotation:
        return min(1.0, dprime * skellam_tail(room - n * l2, noise_var))
    spread = n * scaled_clip
    # Any split a + b = room is a valid bound; take the best of a grid.
    best = 1.0
    for a in np.linspace(0.0, room, 257)[1:-1]:
        signal = 2 * math.exp(-(a * a) * dprime / (2 * spread * spread)) if spread > 0 else 0.0
        best = min(best, dprime * (min(1.0, signal) + skellam_tail(room - a, noise_var)))
    # The deterministic signal bound can be better for a very small n * Delta_2.
    best = min(best, dprime * skellam_tail(room - n * l2, noise_var))
    return min(1.0, best)


def max_gamma(dim: int, clip: float, noise_var_float: float, bits: int, max_clients: int,
              min_contributors: int, *, beta: float = math.exp(-0.5), rotation: bool = True,
              max_wrap_probability: float = 1e-9) -> float:
    """The largest ``gamma`` whose modular-clipping bound holds, for a fixed noise variance
    ``noise_var_float`` on the sum in *float* units (``mu = gamma^2 * noise_var_float``); 0 if
    none does. A finer grid (larger gamma) means less rounding error relative to the clip."""
    dprime = padded_dim(dim) if rotation else dim

    def ok(gamma: float) -> bool:
        c = gamma * clip
        l2 = rounded_l2_bound(c, dprime, beta)
        var = max_clients * gamma * gamma * noise_var_float / min_contributors
        if var / 2 > _MAX_POISSON_LAM or c + math.sqrt(dprime) >= _MAX_EXACT:
            return False
        return _wrap_bound(dprime, c, l2, var, bits, max_clients, rotation) \
            <= max_wrap_probability

    lo, hi = 0.0, 1.0
    while ok(hi):
        lo, hi = hi, hi * 2
        if hi * clip > _MAX_EXACT / 4:
            return lo
    if lo == 0.0:
        lo = hi
        while not ok(lo):
            lo /= 2
            if lo < 1e-12:
                return 0.0
        hi = lo * 2
    while hi / lo > 1.0001:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo
