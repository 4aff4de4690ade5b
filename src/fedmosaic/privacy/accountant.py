"""Privacy accounting for differentially private federated training.

A :class:`PrivacyAccountant` records the mechanisms a run applies (rounds of a subsampled
Gaussian mechanism, Laplace-noised scalar releases) and reports the cumulative
``(epsilon, delta)`` guarantee. The arithmetic is Google's ``dp-accounting`` library; this
module chooses the events, validates parameters, keeps the record as plain data for
checkpoints, and adds noise calibration and a budget check.

Two accountants are offered:

* ``"rdp"``: Rényi differential privacy (Mironov, 2017, "Rényi Differential Privacy",
  CSF), the moments accountant of Abadi et al. (2016, "Deep Learning with Differential
  Privacy", CCS) in RDP form, with the sampled-Gaussian RDP of Mironov, Talwar and Zhang
  (2019, "Rényi Differential Privacy of the Sampled Gaussian Mechanism") and, for
  fixed-size sampling without replacement, Wang, Balle and Kasiviswanathan (2019,
  "Subsampled Rényi Differential Privacy and Analytical Moments Accountant", AISTATS).
  dp-accounting converts RDP to ``(epsilon, delta)`` with the improved bound of Canonne,
  Kamath and Steinke (2020, "The Discrete Gaussian for Differential Privacy", Prop. 12).
* ``"pld"``: privacy loss distributions composed numerically (Koskela, Jälkö and Honkela,
  2020, "Computing Tight Differential Privacy Guarantees Using FFT", AISTATS), discretised
  with the connect-the-dots method of Doroshenko, Ghazi, Kamath, Kumar and Manurangsi
  (2022, "Connect the Dots: Tighter Discrete Approximations of Privacy Loss
  Distributions", PoPETs). Tighter than RDP (about 2.38 instead of 2.60 for the classic
  DP-SGD MNIST setting), slower to build, and still a pessimistic (valid) estimate. The
  discretisation interval is dp-accounting's default, ``1e-4``: on that setting it gives
  2.38169, against 2.38160 with a five times finer ``2e-5`` (and 2.3905 with ``1e-3``).

Reproducing published figures. Papers from 2016 to 2019 converted RDP to ``(epsilon,
delta)`` with the classic bound ``epsilon = min_alpha rdp(alpha) + log(1/delta) / (alpha -
1)`` (Mironov, 2017, Prop. 3; the moments accountant of Abadi et al., 2016, Thm. 2;
TF-Privacy's ``get_privacy_spent`` before 2020), over their own grid of orders. The RDP
accountant takes ``conversion="classic"`` and ``orders`` (a named grid from
``ORDER_GRIDS`` or any sequence of orders > 1) for that: TF-Privacy's published 3.01 for
DP-SGD on MNIST (q = 256/60000, z = 1.1, 60 epochs, delta = 1e-5) is ``conversion="classic",
orders="tf_privacy"`` (2.597 with today's conversion); McMahan et al. (2018)'s Table 1 is
``conversion="classic", orders="moments_accountant"`` (the integer orders 2..33, i.e. the
moments ``lambda`` = 1..32 of Abadi et al.). :meth:`PrivacyAccountant.report` gives the RDP
(both conversions) and PLD epsilons of the same history side by side.

dp-accounting (0.4 - 0.6) over-estimates the sampled Gaussian's RDP at fractional orders
(its series for a fractional order sums more terms than the integral has; exact at integer
orders): +7.4% at order 1.1, +4.0% at 1.5 for q = 0.01, z = 1, against a 40-digit numerical
integral that Opacus matches to 1e-8. The error is on the safe side (epsilon too large) and
matters only where the optimal order is low, i.e. epsilon far above any useful budget: 160.12
instead of Opacus's 154.38 (+3.7%) for q = 0.01, z = 1, 10^6 rounds, delta = 10^-6.6; 170.1
instead of 134.5 (+26%) for q = 0.1, z = 1, 10^4 rounds, delta = 1e-5; +0.06% at epsilon 7.9.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from dp_accounting import dp_event
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
    from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

__all__ = [
    "ACCOUNTANTS",
    "CONVERSIONS",
    "NEIGHBORING_RELATIONS",
    "ORDER_GRIDS",
    "SAMPLING_SCHEMES",
    "PrivacyAccountant",
    "PrivacyBudget",
    "UnsupportedAccountingError",
    "calibrate_noise_multiplier",
    "epsilon_for",
]

ACCOUNTANTS = ("rdp", "pld")
# RDP -> (epsilon, delta): "improved" is dp-accounting's (Canonne, Kamath and Steinke, 2020,
# Prop. 12); "classic" is Mironov (2017), Prop. 3, as published figures before 2020 used it.
CONVERSIONS = ("improved", "classic")
# Named grids of RDP orders, to reproduce the figures computed with them.
ORDER_GRIDS: dict[str, tuple[float, ...]] = {
    # dp-accounting's default (the default here): 1.1 .. 10.9 by 0.1, 11 .. 63, 128 .. 1024.
    # (Spelled out, equal to rdp_privacy_accountant.DEFAULT_RDP_ORDERS: a test checks it.)
    "dp_accounting": tuple([1 + x / 10.0 for x in range(1, 100)]
                           + [float(a) for a in range(11, 64)] + [128.0, 256.0, 512.0, 1024.0]),
    # TF-Privacy's compute_dp_sgd_privacy (2019): 1.1 .. 10.9 by 0.1, then 12 .. 63.
    "tf_privacy": tuple([1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in
                                                                   range(12, 64)]),
    # The moments accountant of Abadi et al. (2016): moments lambda = 1..32, RDP order
    # alpha = lambda + 1.
    "moments_accountant": tuple(float(a) for a in range(2, 34)),
}
_DEFAULT_ORDERS = "dp_accounting"
NEIGHBORING_RELATIONS = ("add_remove", "replace_one")
SAMPLING_SCHEMES = ("poisson", "fixed", "none")



# dp-accounting is imported on first use, not with this module: it pulls in scipy.signal
# (about 1 s of CPU), which every client and server process would pay at start-up even when
# it accounts for nothing.
def _dp_event() -> Any:
    from dp_accounting import dp_event

    return dp_event


def _rdp() -> Any:
    from dp_accounting.rdp import rdp_privacy_accountant

    return rdp_privacy_accountant


def _pld_accountant() -> Any:
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    return PLDAccountant


def _relation(name: str) -> Any:
    import dp_accounting

    return {"add_remove": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
            "replace_one": dp_accounting.NeighboringRelation.REPLACE_ONE}[name]

# What dp-accounting (0.4 - 0.6) cannot account for, and what to use instead. Support is
# always checked against the library itself; these only make the error message useful.
_HINTS = {
    ("rdp", "replace_one", "poisson"): (
        "Poisson sampling under replace-one needs neighboring='add_remove' with the RDP "
        "accountant, or accountant='pld'"
    ),
    ("rdp", "add_remove", "fixed"): (
        "fixed-size sampling without replacement is analysed under replace-one only "
        "(Wang et al., 2019): use neighboring='replace_one'"
    ),
    ("pld", "add_remove", "fixed"): (
        "the PLD accountant has no sampling-without-replacement analysis: use "
        "accountant='rdp' with neighboring='replace_one'"
    ),
    ("pld", "replace_one", "fixed"): (
        "the PLD accountant has no sampling-without-replacement analysis: use "
        "accountant='rdp' with neighboring='replace_one'"
    ),
    ("pld", "replace_one", "laplace"): (
        "the PLD accountant handles the Laplace mechanism under add/remove only: use "
        "neighboring='add_remove' or accountant='rdp'"
    ),
}

# Search range of calibrate_noise_multiplier.
_MIN_NOISE = 1e-3
_MAX_NOISE = 1e4
_MAX_CALIBRATION_EVALS = 200

# dp-accounting's default PLD discretization (the PLD accountant's own figure).
PLD_INTERVAL = 1e-4
# The side-by-side PLD figure of ``report`` is skipped (with the reason) below this noise
# multiplier, where building the PLD takes from seconds to minutes and epsilon is in the tens
# to hundreds anyway.
REPORT_PLD_MIN_NOISE = 0.3
_STATE_VERSION = 2  # 2 adds conversion and orders; version 1 states use the defaults


class UnsupportedAccountingError(ValueError):
    """dp-accounting cannot account for this mechanism with this accountant and relation."""


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        options = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be one of {options}; got {value!r}")
    return value


def _positive_finite(name: str, value: object) -> float:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(out) or out <= 0:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    return out


def _integer(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def _resolve_orders(orders: object) -> tuple[str | None, tuple[float, ...]]:
    """(grid name or None, sorted distinct orders) for ``orders``: None (the default grid),
    a name from ``ORDER_GRIDS``, or a sequence of finite orders > 1."""
    if orders is None:
        orders = _DEFAULT_ORDERS
    if isinstance(orders, str):
        if orders not in ORDER_GRIDS:
            names = ", ".join(repr(n) for n in ORDER_GRIDS)
            raise ValueError(f"orders must be one of {names} or a sequence of RDP orders > 1; "
                             f"got {orders!r}")
        return orders, ORDER_GRIDS[orders]
    try:
        values = list(orders)  # type: ignore[call-overload]
    except TypeError:
        raise ValueError(f"orders must be a grid name or a sequence of RDP orders > 1; "
                         f"got {orders!r}") from None
    if not values:
        raise ValueError("orders must hold at least one RDP order > 1")
    out = []
    for a in values:
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not math.isfinite(a) \
                or a <= 1:
            raise ValueError(f"every RDP order must be a finite number > 1; got {a!r}")
        out.append(float(a))
    grid = tuple(sorted(set(out)))
    named = next((n for n, g in ORDER_GRIDS.items() if g == grid), None)
    return named, grid


def _classic_epsilon(orders: np.ndarray, rdp: np.ndarray, delta: float) -> tuple[float, float]:
    """(epsilon, optimal order) by the classic conversion (Mironov, 2017, Prop. 3):
    ``min_alpha rdp(alpha) + log(1/delta) / (alpha - 1)``."""
    with np.errstate(invalid="ignore"):
        eps = rdp + math.log(1 / delta) / (orders - 1)
    eps = np.where(np.isnan(eps), np.inf, eps)
    i = int(np.argmin(eps))
    return max(0.0, float(eps[i])), float(orders[i])


def _classic_delta(orders: np.ndarray, rdp: np.ndarray, epsilon: float) -> float:
    """The classic conversion solved for delta: ``min_alpha exp((alpha - 1)(rdp - eps))``."""
    with np.errstate(invalid="ignore", over="ignore"):
        log_delta = (orders - 1) * (rdp - epsilon)
    log_delta = np.where(np.isnan(log_delta), np.inf, log_delta)
    return float(min(1.0, math.exp(min(0.0, float(np.min(log_delta))))))


def _check_delta(delta: object) -> float:
    d = _positive_finite("delta", delta)
    if d >= 1:
        raise ValueError(f"delta must be in (0, 1); got {delta!r}")
    return d


@dataclass(frozen=True)
class _Record:
    """``count`` consecutive applications of one mechanism, as plain data."""

    mechanism: str  # "gaussian" or "laplace"
    noise: float  # noise multiplier (Gaussian) or Laplace scale / L1 sensitivity
    sampling: str | None = None  # Gaussian only: "poisson", "fixed" or "none"
    rate: float | None = None  # poisson only
    population: int | None = None  # fixed only
    sample_size: int | None = None  # fixed only
    count: int = 1

    def key(self) -> _Record:
        """The mechanism without its count (a hashable identity of the mechanism)."""
        return self if self.count == 1 else dataclasses.replace(self, count=1)

    def inclusion_rate(self) -> float | None:
        """Probability that a given record/client takes part (None for Laplace)."""
        if self.sampling == "poisson":
            return self.rate
        if self.sampling == "fixed":
            assert self.population is not None and self.sample_size is not None
            return self.sample_size / self.population
        if self.sampling == "none":
            return 1.0
        return None

    def single_event(self) -> dp_event.DpEvent:
        """The dp-accounting event of one application."""
        if self.mechanism == "laplace":
            return _dp_event().LaplaceDpEvent(noise_multiplier=self.noise)
        gaussian = _dp_event().GaussianDpEvent(noise_multiplier=self.noise)
        if self.sampling == "poisson":
            assert self.rate is not None
            return _dp_event().PoissonSampledDpEvent(sampling_probability=self.rate,
                                                  event=gaussian)
        if self.sampling == "fixed":
            assert self.population is not None and self.sample_size is not None
            return _dp_event().SampledWithoutReplacementDpEvent(
                source_dataset_size=self.population, sample_size=self.sample_size,
                event=gaussian)
        return gaussian

    def event(self) -> dp_event.DpEvent:
        """The dp-accounting event of all ``count`` applications."""
        single = self.single_event()
        return single if self.count == 1 else _dp_event().SelfComposedDpEvent(single, self.count)

    def describe(self) -> str:
        if self.mechanism == "laplace":
            return f"the Laplace mechanism (scale/sensitivity {self.noise:g})"
        if self.sampling == "poisson":
            return f"a Poisson-subsampled Gaussian mechanism (rate {self.rate:g})"
        if self.sampling == "fixed":
            return (f"a Gaussian mechanism on a fixed-size sample without replacement "
                    f"({self.sample_size} of {self.population})")
        return "a Gaussian mechanism without sampling"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> _Record:
        mechanism = _choice("event mechanism", data.get("mechanism"), ("gaussian", "laplace"))
        count = _integer("event count", data.get("count"), 1)
        if mechanism == "laplace":
            return _laplace_record(data.get("noise"), count)
        return _gaussian_record(data.get("noise"), data.get("sampling"), data.get("rate"),
                                data.get("population"), data.get("sample_size"), count)


def _gaussian_record(noise_multiplier: object, sampling: object, rate: object,
                     population: object, sample_size: object, count: int) -> _Record:
    noise = _positive_finite("noise_multiplier", noise_multiplier)
    scheme = _choice("sampling", sampling, SAMPLING_SCHEMES)
    if scheme == "poisson":
        if rate is None:
            raise ValueError("sampling='poisson' needs rate, the per-round inclusion "
                             "probability in (0, 1]")
        q = _positive_finite("rate", rate)
        if q > 1:
            raise ValueError(f"rate must be in (0, 1]; got {rate!r}")
        if population is not None or sample_size is not None:
            raise ValueError("population and sample_size are for sampling='fixed' only; "
                             "sampling='poisson' takes rate")
        return _Record("gaussian", noise, "poisson", rate=q, count=count)
    if scheme == "fixed":
        if rate is not None:
            raise ValueError("sampling='fixed' takes population and sample_size, not rate")
        if population is None or sample_size is None:
            raise ValueError("sampling='fixed' needs population and sample_size")
        n = _integer("population", population, 1)
        m = _integer("sample_size", sample_size, 1)
        if m > n:
            raise ValueError(f"sample_size ({m}) must not exceed population ({n})")
        return _Record("gaussian", noise, "fixed", population=n, sample_size=m, count=count)
    if rate is not None or population is not None or sample_size is not None:
        raise ValueError("sampling='none' (every client, every round) takes no rate, "
                         "population or sample_size")
    return _Record("gaussian", noise, "none", count=count)


def _laplace_record(scale_over_sensitivity: object, count: int) -> _Record:
    return _Record("laplace", _positive_finite("scale_over_sensitivity",
                                               scale_over_sensitivity), count=count)


class PrivacyAccountant:
    """Cumulative ``(epsilon, delta)`` of a run's mechanisms, computed with dp-accounting.

    ``accountant`` is ``"rdp"`` (Mironov, 2017; the moments accountant of Abadi et al.,
    2016) or ``"pld"`` (Koskela et al., 2020; Doroshenko et al., 2022). ``neighboring`` is
    ``"add_remove"`` (a client is added or removed: the usual user-level DP of McMahan et
    al., 2018) or ``"replace_one"`` (one client's data is replaced; the population size
    is public).

    Supported combinations are those of dp-accounting: Poisson sampling with RDP needs
    add/remove, fixed-size sampling needs RDP with replace-one, and PLD's Laplace needs
    add/remove. Anything else raises :class:`UnsupportedAccountingError` when recorded.

    The history is kept as plain data: runs of identical consecutive mechanisms with a
    count. Composition is commutative, so epsilon and delta are computed from the total
    count of each distinct mechanism (in order of first use), each composed as one
    ``SelfComposedDpEvent``. The numbers are therefore a function of the history alone,
    not of when they were asked for, and an accountant restored from :meth:`state_dict`
    reports bit-for-bit the same values. Costs: RDP keeps each distinct mechanism's RDP
    curve, so a query is cheap; PLD rebuilds its distribution (about 0.4 s per distinct
    subsampled Gaussian at dp-accounting's default discretisation) whenever the history
    has changed since the last query.
    """

    def __init__(self, accountant: str = "rdp", neighboring: str = "add_remove", *,
                 conversion: str = "improved",
                 orders: str | Sequence[float] | None = None) -> None:
        self._kind = _choice("accountant", accountant, ACCOUNTANTS)
        self._neighboring = _choice("neighboring", neighboring, NEIGHBORING_RELATIONS)
        self._conversion = _choice("conversion", conversion, CONVERSIONS)
        self._orders_name, self._orders = _resolve_orders(orders)
        if self._kind == "pld" and (self._conversion != "improved"
                                    or self._orders_name != _DEFAULT_ORDERS):
            raise ValueError("conversion and orders configure the RDP accountant; "
                             "accountant='pld' composes privacy loss distributions and takes "
                             "neither (use accountant='rdp', or report() for both)")
        self._relation = _relation(self._neighboring)
        # Never composed into: only asked whether they support an event.
        self._checkers = {kind: self._new_backend(kind) for kind in ACCOUNTANTS}
        self._records: list[_Record] = []
        # RDP of one application of a mechanism, per grid of orders.
        self._rdp_curves: dict[tuple[_Record, tuple[float, ...]], np.ndarray] = {}
        # One PLD per discretization interval, rebuilt when the history changes.
        self._pld_cache: dict[float, tuple[tuple[tuple[_Record, int], ...], PLDAccountant]] = {}

    def _new_backend(self, kind: str) -> RdpAccountant | PLDAccountant:
        if kind == "rdp":
            return _rdp().RdpAccountant(neighboring_relation=self._relation)
        return _pld_accountant()(neighboring_relation=self._relation)

    # -- configuration -------------------------------------------------------------------

    @property
    def accountant(self) -> str:
        """``"rdp"`` or ``"pld"``."""
        return self._kind

    @property
    def neighboring(self) -> str:
        """``"add_remove"`` or ``"replace_one"``."""
        return self._neighboring

    @property
    def conversion(self) -> str:
        """The RDP-to-(epsilon, delta) conversion: ``"improved"`` or ``"classic"``."""
        return self._conversion

    @property
    def orders(self) -> tuple[float, ...]:
        """The RDP orders epsilon is minimised over (sorted)."""
        return self._orders

    def _orders_label(self) -> str | list[float]:
        return self._orders_name if self._orders_name is not None else list(self._orders)

    # -- recording -----------------------------------------------------------------------

    def record_gaussian_round(self, noise_multiplier: float, sampling: str,
                              rate: float | None = None, *, population: int | None = None,
                              sample_size: int | None = None, count: int = 1) -> None:
        """Record ``count`` rounds of a (subsampled) Gaussian mechanism.

        ``sampling`` says how a round's participants were chosen:

        * ``"poisson"``: each client independently with probability ``rate``
          (``PoissonSampledDpEvent``; Abadi et al., 2016; McMahan et al., 2018).
        * ``"fixed"``: ``sample_size`` distinct clients uniformly out of ``population``
          (``SampledWithoutReplacementDpEvent``; Wang et al., 2019). dp-accounting
          analyses this for RDP under replace-one only.
        * ``"none"``: every client, every round (a plain ``GaussianDpEvent``).

        ``noise_multiplier`` is the noise standard deviation over the L2 sensitivity of the
        noised sum (see the module docstring) and must be > 0: without noise epsilon is
        infinite. Raises ``ValueError`` on bad parameters and
        :class:`UnsupportedAccountingError` when dp-accounting cannot account for the
        mechanism with this accountant and neighbouring relation.
        """
        count = _integer("count", count, 1)
        self._add(_gaussian_record(noise_multiplier, sampling, rate, population, sample_size,
                                   count))

    def record_laplace(self, scale_over_sensitivity: float, count: int = 1) -> None:
        """Record ``count`` releases of the Laplace mechanism (``LaplaceDpEvent``).

        For scalar (or low-dimensional) statistics released with Laplace noise of scale
        ``b`` on a quantity of L1 sensitivity ``s``: pass ``b / s``. Each release alone is
        ``s / b``-DP. Supported by the RDP accountant, and by the PLD accountant under
        add/remove.
        """
        count = _integer("count", count, 1)
        self._add(_laplace_record(scale_over_sensitivity, count))

    def _unsupported(self, record: _Record, kind: str) -> str | None:
        """Why accountant ``kind`` cannot account for ``record`` (None when it can)."""
        if self._checkers[kind].supports(record.single_event()):
            return None
        key = (kind, self._neighboring,
               record.mechanism if record.mechanism == "laplace" else record.sampling)
        hint = _HINTS.get(key, "dp-accounting does not support this combination")
        return (f"cannot account for {record.describe()} with accountant={kind!r} and "
                f"neighboring={self._neighboring!r}: {hint}")

    def _check_supported(self, record: _Record) -> None:
        reason = self._unsupported(record, self._kind)
        if reason is not None:
            raise UnsupportedAccountingError(reason)

    def _add(self, record: _Record) -> None:
        self._check_supported(record)
        if self._records and self._records[-1].key() == record.key():
            last = self._records[-1]
            self._records[-1] = dataclasses.replace(last, count=last.count + record.count)
        else:
            self._records.append(record)

    # -- evaluation ----------------------------------------------------------------------

    def _totals(self) -> tuple[tuple[_Record, int], ...]:
        """Total count of each distinct mechanism, in order of first use."""
        totals: dict[_Record, int] = {}
        for record in self._records:
            key = record.key()
            totals[key] = totals.get(key, 0) + record.count
        return tuple(totals.items())

    def _rdp_total(self) -> tuple[np.ndarray, np.ndarray]:
        """(orders, RDP of the whole history at each order): sum of count x one
        application's RDP, as dp-accounting's RdpAccountant composes it."""
        total = None
        for key, count in self._totals():
            curve = self._rdp_curves.get((key, self._orders))
            if curve is None:
                single = _rdp().RdpAccountant(orders=list(self._orders),
                                       neighboring_relation=self._relation)
                single.compose(key.single_event())
                curve = self._rdp_curves[(key, self._orders)] = np.asarray(single.rdp, float)
            total = count * curve if total is None else total + count * curve
        assert total is not None
        return np.asarray(self._orders, float), total

    def _rdp_epsilon(self, delta: float, conversion: str) -> tuple[float, float]:
        """(epsilon, optimal order) of the RDP curve with ``conversion``."""
        orders, total = self._rdp_total()
        if conversion == "classic":
            return _classic_epsilon(orders, total, delta)
        eps, order = _rdp().compute_epsilon(orders, total, delta)
        return float(eps), (math.nan if order is None else float(order))

    def _pld(self, interval: float = PLD_INTERVAL) -> PLDAccountant:
        totals = self._totals()
        cached = self._pld_cache.get(interval)
        if cached is not None and cached[0] == totals:
            return cached[1]
        backend = _pld_accountant()(neighboring_relation=self._relation,
                                value_discretization_interval=interval)
        for key, count in totals:
            backend.compose(_dp_event().SelfComposedDpEvent(key.single_event(), count))
        self._pld_cache[interval] = (totals, backend)
        return backend

    # -- queries -------------------------------------------------------------------------

    def epsilon(self, delta: float) -> float:
        """The smallest epsilon such that everything recorded is ``(epsilon, delta)``-DP
        (0.0 before anything is recorded)."""
        delta = _check_delta(delta)
        if not self._records:
            return 0.0
        if self._kind == "rdp":
            return self._rdp_epsilon(delta, self._conversion)[0]
        return float(self._pld().get_epsilon(delta))

    def delta(self, epsilon: float) -> float:
        """The smallest delta such that everything recorded is ``(epsilon, delta)``-DP
        (0.0 before anything is recorded)."""
        try:
            eps = float(epsilon)
        except (TypeError, ValueError):
            raise ValueError(f"epsilon must be a finite number >= 0; got {epsilon!r}") from None
        if not math.isfinite(eps) or eps < 0:
            raise ValueError(f"epsilon must be a finite number >= 0; got {epsilon!r}")
        if not self._records:
            return 0.0
        if self._kind == "rdp":
            orders, total = self._rdp_total()
            if self._conversion == "classic":
                return _classic_delta(orders, total, eps)
            return float(_rdp().compute_delta(orders, total, eps)[0])
        return float(self._pld().get_delta(eps))

    def report(self, delta: float, *, pld: bool = True) -> dict[str, Any]:
        """Epsilon at ``delta`` by every accountant that supports the history, side by side
        (JSON-friendly), for a run's guarantees or a comparison with a paper.

        ``epsilon`` is this accountant's figure (the one budgets and stops use). ``rdp`` and
        ``rdp_classic`` are the RDP epsilons with the improved and the classic conversion
        over this accountant's orders (``orders``; the optimal order of each in
        ``rdp_order``, ``rdp_classic_order``); ``pld`` is the PLD epsilon (about 0.6 s per
        distinct subsampled Gaussian at z = 1, 1.4 s at z = 0.5; skipped, with the reason,
        below z = ``REPORT_PLD_MIN_NOISE`` unless this is the PLD accountant; ``pld=False``
        skips it). A
        figure is None where that accountant cannot account for a recorded mechanism (the
        reason is in ``unsupported``) or was skipped.
        """
        delta = _check_delta(delta)
        out: dict[str, Any] = {
            "delta": delta, "accountant": self._kind, "epsilon": self.epsilon(delta),
            "rdp": None, "rdp_order": None, "rdp_classic": None, "rdp_classic_order": None,
            "orders": self._orders_label(), "pld": None, "unsupported": {}}
        empty = not self._records
        for kind in ("rdp", "pld"):
            reason = next((r for r in (self._unsupported(key, kind) for key, _ in
                                       self._totals()) if r is not None), None)
            if reason is not None:
                out["unsupported"][kind] = reason
                continue
            if kind == "pld" and not pld:
                continue
            if kind == "pld":
                if empty:
                    out["pld"] = 0.0
                elif self._kind == "pld":
                    out["pld"] = out["epsilon"]
                elif min(self._gaussian_noises(), default=math.inf) < REPORT_PLD_MIN_NOISE:
                    # Its support grows like 1/z^2: 0.6 s at z = 1, 1.4 s at z = 0.5,
                    # 14 s at z = 0.1, minutes below.
                    out["unsupported"]["pld"] = (
                        f"skipped: a noise multiplier below {REPORT_PLD_MIN_NOISE} makes the "
                        "PLD too costly to build for a side-by-side figure; accountant = "
                        "'pld' computes it")
                else:
                    out["pld"] = float(self._pld().get_epsilon(delta))
                continue
            for conversion, name in (("improved", "rdp"), ("classic", "rdp_classic")):
                eps, order = (0.0, None) if empty else self._rdp_epsilon(delta, conversion)
                out[name], out[f"{name}_order"] = eps, order
        return out

    def _gaussian_noises(self) -> list[float]:
        return [r.noise for r in self._records if r.mechanism == "gaussian"]

    @property
    def steps(self) -> int:
        """Gaussian rounds recorded so far (Laplace releases are not rounds)."""
        return sum(r.count for r in self._records if r.mechanism == "gaussian")

    @property
    def laplace_releases(self) -> int:
        """Laplace releases recorded so far."""
        return sum(r.count for r in self._records if r.mechanism == "laplace")

    def as_dp_event(self) -> dp_event.DpEvent:
        """The history, in order, as one dp-accounting event (for other dp-accounting
        tools)."""
        if not self._records:
            return _dp_event().NoOpDpEvent()
        if len(self._records) == 1:
            return self._records[0].event()
        return _dp_event().ComposedDpEvent([r.event() for r in self._records])

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary: the assumptions behind the reported epsilon."""
        gaussian = [r for r in self._records if r.mechanism == "gaussian"]
        laplace = [r for r in self._records if r.mechanism == "laplace"]
        rates = {r.inclusion_rate() for r in gaussian}
        return {
            "accountant": self._kind,
            "neighboring": self._neighboring,
            **({"conversion": self._conversion, "orders": self._orders_label()}
               if self._kind == "rdp" else {}),
            "rounds": self.steps,
            "sampling": sorted({r.sampling for r in gaussian if r.sampling is not None}),
            "sampling_rates": sorted(q for q in rates if q is not None),
            "noise_multipliers": sorted({r.noise for r in gaussian}),
            "laplace_releases": self.laplace_releases,
            "laplace_scales": sorted({r.noise for r in laplace}),
        }

    # -- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain (JSON-serialisable) data from which :meth:`load_state_dict` restores this
        accountant exactly: the configuration and the recorded runs, in order."""
        return {
            "version": _STATE_VERSION,
            "accountant": self._kind,
            "neighboring": self._neighboring,
            "conversion": self._conversion,
            "orders": self._orders_label(),
            "events": [dataclasses.asdict(r) for r in self._records],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace this accountant's history by the one in ``state`` (from
        :meth:`state_dict`), replaying (and re-validating) the recorded runs.

        The accountant, neighbouring relation, conversion and orders in ``state`` must
        match this object's (use :meth:`from_state_dict` to restore without knowing them);
        a version-1 state (before conversions and orders) has the defaults. On an error
        the accountant is left unchanged.
        """
        conversion, (_, orders) = _state_options(state)
        for key, theirs, mine in (("accountant", state.get("accountant"), self._kind),
                                  ("neighboring", state.get("neighboring"), self._neighboring),
                                  ("conversion", conversion, self._conversion),
                                  ("orders", orders, self._orders)):
            if theirs != mine:
                raise ValueError(f"state has {key}={theirs!r} but this accountant "
                                 f"uses {mine!r}; use PrivacyAccountant.from_state_dict")
        events = state.get("events")
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            raise ValueError("state['events'] must be a list of dicts")
        replay = self._empty_like()
        for event in events:
            replay._add(_Record.from_dict(event))
        self._records = replay._records
        self._pld_cache = {}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PrivacyAccountant:
        """A new accountant restored from :meth:`state_dict` output."""
        conversion, (name, orders) = _state_options(state)
        out = cls(accountant=state.get("accountant"),  # type: ignore[arg-type]
                  neighboring=state.get("neighboring"),  # type: ignore[arg-type]
                  conversion=conversion, orders=name if name is not None else orders)
        out.load_state_dict(state)
        return out

    def _empty_like(self) -> PrivacyAccountant:
        return PrivacyAccountant(self._kind, self._neighboring, conversion=self._conversion,
                                 orders=self._orders_label())

    def copy(self) -> PrivacyAccountant:
        """An independent accountant with the same history (and so the same numbers)."""
        out = self._empty_like()
        out._records = list(self._records)
        # Shared on purpose: a curve depends only on the mechanism, the relation and the
        # orders (all part of its key or the same here), and is never modified in place.
        out._rdp_curves = self._rdp_curves
        return out

    def __repr__(self) -> str:
        options = ("" if self._kind == "pld" else
                   f"conversion={self._conversion!r}, orders={self._orders_name or 'custom'}, ")
        return (f"PrivacyAccountant(accountant={self._kind!r}, "
                f"neighboring={self._neighboring!r}, {options}steps={self.steps}, "
                f"laplace_releases={self.laplace_releases})")


def _state_options(state: object) -> tuple[str, tuple[str | None, tuple[float, ...]]]:
    """Validate a state's version; its (conversion, resolved orders)."""
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict from state_dict(); got {type(state)}")
    version = state.get("version")
    if version not in (1, _STATE_VERSION):
        raise ValueError(f"unknown accountant state version {version!r}")
    if version == 1:
        return "improved", _resolve_orders(None)
    conversion = _choice("state conversion", state.get("conversion"), CONVERSIONS)
    return conversion, _resolve_orders(state.get("orders"))


def epsilon_for(noise_multiplier: float, steps: int, sampling: str, rate: float | None = None,
                *, population: int | None = None, sample_size: int | None = None,
                delta: float, accountant: str = "rdp",
                neighboring: str = "add_remove", conversion: str = "improved",
                orders: str | Sequence[float] | None = None) -> float:
    """Epsilon at ``delta`` after ``steps`` identical rounds of a (subsampled) Gaussian.

    E.g. ``epsilon_for(1.1, 14062, "poisson", 256 / 60000, delta=1e-5)`` is about 2.597
    (the DP-SGD MNIST setting of Abadi et al., 2016, with dp-accounting's RDP), about
    2.38 with ``accountant="pld"``, and 3.008 with ``conversion="classic",
    orders="tf_privacy"`` (TF-Privacy's published 3.01).
    """
    steps = _integer("steps", steps, 1)
    acc = PrivacyAccountant(accountant, neighboring, conversion=conversion, orders=orders)
    acc.record_gaussian_round(noise_multiplier, sampling, rate, population=population,
                              sample_size=sample_size, count=steps)
    return acc.epsilon(delta)


def calibrate_noise_multiplier(target_epsilon: float, delta: float, steps: int,
                               sampling: str, rate: float | None = None, *,
                               population: int | None = None, sample_size: int | None = None,
                               accountant: str = "rdp", neighboring: str = "add_remove",
                               tolerance: float = 0.01, conversion: str = "improved",
                               orders: str | Sequence[float] | None = None) -> float:
    """The smallest noise multiplier, to relative ``tolerance``, whose epsilon at ``delta``
    after ``steps`` rounds is at most ``target_epsilon``.

    Bisection on a log scale over ``[1e-3, 1e4]``; the result ``z`` always meets the target
    and ``z / (1 + tolerance)`` does not. If even ``1e-3`` meets it, ``1e-3`` is returned
    (the target is then met by essentially no noise). Raises ``ValueError`` if even a
    noise multiplier of ``1e4`` does not meet the target, and
    :class:`UnsupportedAccountingError` for a combination dp-accounting cannot handle.
    """
    target = _positive_finite("target_epsilon", target_epsilon)
    delta = _check_delta(delta)
    tol = _positive_finite("tolerance", tolerance)
    steps = _integer("steps", steps, 1)
    PrivacyAccountant(accountant, neighboring, conversion=conversion, orders=orders)  # checks

    def eps(z: float) -> float:
        e = epsilon_for(z, steps, sampling, rate, population=population,
                        sample_size=sample_size, delta=delta, accountant=accountant,
                        neighboring=neighboring, conversion=conversion, orders=orders)
        return math.inf if math.isnan(e) else e

    evals = 0
    z = 1.0
    if eps(z) <= target:
        hi = z
        while True:  # walk down until the target is missed
            lo = max(hi / 2.0, _MIN_NOISE)
            evals += 1
            if eps(lo) > target:
                break
            if lo <= _MIN_NOISE:
                return _MIN_NOISE
            hi = lo
    else:
        lo = z
        while True:  # walk up until the target is met
            hi = min(lo * 2.0, _MAX_NOISE)
            evals += 1
            e_hi = eps(hi)
            if e_hi <= target:
                break
            if hi >= _MAX_NOISE:
                raise ValueError(
                    f"target_epsilon={target_epsilon} at delta={delta} after {steps} steps "
                    f"is not met even with noise_multiplier={_MAX_NOISE:g} "
                    f"(epsilon {e_hi:.4g}); raise the target, or take fewer steps or a "
                    "lower sampling rate")
            lo = hi
    # Invariant: eps(lo) > target >= eps(hi).
    while hi / lo > 1.0 + tol and evals < _MAX_CALIBRATION_EVALS:
        mid = math.sqrt(lo * hi)
        evals += 1
        if eps(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True)
class PrivacyBudget:
    """An ``(epsilon, delta)`` target for a run.

    A trainer asks :meth:`would_exceed` before each round and stops when the next round
    would overspend, so the released model stays within the budget (the stopping rule of
    DP-FedAvg deployments, McMahan et al., 2018).
    """

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", _positive_finite("epsilon", self.epsilon))
        object.__setattr__(self, "delta", _check_delta(self.delta))

    def spent(self, accountant: PrivacyAccountant) -> float:
        """Epsilon spent so far, at this budget's delta."""
        return accountant.epsilon(self.delta)

    def remaining(self, accountant: PrivacyAccountant) -> float:
        """Epsilon left (negative once overspent)."""
        return self.epsilon - self.spent(accountant)

    def is_exceeded(self, accountant: PrivacyAccountant) -> bool:
        """Whether what the accountant has recorded already overspends the budget."""
        return self.spent(accountant) > self.epsilon

    def would_exceed(self, accountant: PrivacyAccountant, noise_multiplier: float,
                     sampling: str, rate: float | None = None, *,
                     population: int | None = None, sample_size: int | None = None,
                     count: int = 1) -> bool:
        """Whether recording ``count`` (default one) more Gaussian rounds would push epsilon
        at this budget's delta above the budget. ``accountant`` is not changed: the round
        is recorded on a copy."""
        trial = accountant.copy()
        trial.record_gaussian_round(noise_multiplier, sampling, rate, population=population,
                                    sample_size=sample_size, count=count)
        return trial.epsilon(self.delta) > self.epsilon
