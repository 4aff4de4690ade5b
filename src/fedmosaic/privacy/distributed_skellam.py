"""DistributedSkellam: FedAvg with client-level DP from integer noise added by the clients.

The distributed Skellam mechanism (Agarwal, Kairouz and Liu 2021, "The Skellam Mechanism for
Differentially Private Federated Learning", NeurIPS) composed with FedAvg and SecAgg+, as
DP-FedAvg's distributed mode composes its Gaussian shares, but on the integers SecAgg+ sums:

* every sampled client clips its update to L2 norm ``clip``, scales, rotates, rounds and adds
  its ``Sk(mu / min_contributors)`` share on its own device (``SkellamMechanism.encode``, run
  by ``SecAggPlusTransport``, which takes the mechanism from :meth:`secagg_encoder`; over gRPC
  ``fedmosaic.net.secagg.SecAggRoundDriver`` sends its public parameters to the clients);
* the server learns only the SecAgg+ sum mod ``2^bits``; it decodes it (unscale, inverse
  rotation), divides by the *expected* number of clients (a fixed denominator, as in DP-FedAvg,
  McMahan et al. 2018) and applies the server optimizer;
* the accountant (``skellam_accountant``) records each released sum with the L1 and L2
  sensitivities *after rounding* and the Skellam variance actually present.

Two epsilons are reported. ``epsilon`` protects a client against anyone who sees the released
models but not who was sampled: with ``sampling="poisson"`` it includes amplification by
Poisson subsampling (Zhu and Wang 2019, general bound). ``epsilon_against_server`` is the
guarantee against the server, which runs the sampling and sees who took part in SecAgg+: no
amplification (``q = 1``), the neighbouring relation being one participant's update replaced by
zero (its noise share is still present). Both need at least ``min_contributors`` shares in every
unmasked sum; a sum with fewer (dropouts) is not applied to the model and is accounted with the
variance it actually carries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedmosaic.algorithms.aggregate import FedAvgAggregator
from fedmosaic.algorithms.strategy import ClientTask, FedAvg
from fedmosaic.core.errors import ConfigError, PrivacyBudgetExhausted
from fedmosaic.privacy.cohort import check_noise_settings, cohort_settings, dp_cohort
from fedmosaic.privacy.randomness import SecureNoise
from fedmosaic.privacy.skellam import SkellamMechanism, max_gamma, padded_dim, rounded_l2_bound
from fedmosaic.privacy.skellam_accountant import (
    SkellamAccountant,
    SkellamRound,
    calibrate_skellam_mu,
)


class DistributedSkellam(FedAvg):
    """FedAvg whose clients add distributed Skellam noise under SecAgg+ (run it with a
    ``SecAggPlusTransport``: the transport takes the client encoding from
    :meth:`secagg_encoder`; other transports are refused or fail the first round).

    Noise: ``noise_multiplier`` ``z`` (noise std on the sum ``z * clip`` in float units, so
    ``mu = (gamma z clip)^2``) or ``target_epsilon`` with ``rounds`` (``mu`` calibrated with the
    Skellam accountant, ``epsilon`` being the one against model observers). ``gamma`` defaults to
    the largest scale whose modular-clipping bound holds for ``max_clients`` (default: the whole
    population under Poisson sampling, the cohort under fixed sampling) at ``bits``.
    ``sampling="poisson"`` with ``rate`` (q) or ``"fixed"`` with ``clients_per_round`` (accounted
    without amplification). ``budget_epsilon`` stops the run before a round that would exceed it.
    ``secure_noise=True`` draws the cohort and the clients' ``FitConfig`` seeds from
    ``SecureNoise`` (the amplification by sampling needs a cohort nobody can predict from the
    run seed); the clients' Skellam noise itself is drawn in the transport
    (``SecAggPlusTransport(secure_noise=True)``).
    """

    name = "distributed-skellam"

    def __init__(
        self,
        *,
        clip: float,
        delta: float,
        min_contributors: int,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        rounds: int | None = None,
        budget_epsilon: float | None = None,
        sampling: str = "poisson",
        rate: float | None = None,
        clients_per_round: int | None = None,
        population: int | None = None,
        max_clients: int | None = None,
        bits: int = 32,
        gamma: float | None = None,
        beta: float = math.exp(-0.5),
        rotation: bool = True,
        rotation_seed: int = 0,
        max_wrap_probability: float = 1e-9,
        secure_noise: bool = False,
        min_updates: int = 0,
        **kwargs: Any,
    ) -> None:
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"clip must be a positive finite number, got {clip}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if min_contributors < 1:
            raise ValueError(f"min_contributors must be >= 1, got {min_contributors}")
        check_noise_settings(noise_multiplier, target_epsilon, rounds)
        if kwargs.get("weighting", "uniform") != "uniform":
            raise ValueError("DistributedSkellam sums unweighted clipped updates: weighting "
                             "must be 'uniform'")
        kwargs.pop("weighting", None)
        if kwargs.get("robust") is not None or kwargs.get("anomaly") is not None:
            raise ValueError("robust aggregation and anomaly detection need individual updates; "
                             "under SecAgg+ the server only sees the noised sum")
        super().__init__(weighting="uniform", min_updates=1,
                         **cohort_settings(sampling, rate, clients_per_round), **kwargs)
        if min_updates < 0:
            raise ValueError(f"min_updates must be >= 0, got {min_updates}")
        # A Poisson round may sample nobody; it then releases nothing.
        self.min_updates = min_updates
        self.aggregator = FedAvgAggregator(weighting="uniform")
        self.clip, self.delta = float(clip), float(delta)
        self.min_contributors = int(min_contributors)
        self.noise_multiplier, self.target_epsilon = noise_multiplier, target_epsilon
        self.planned_rounds = rounds
        self.budget_epsilon = budget_epsilon
        self.sampling, self.rate = sampling, rate
        self.dp_clients_per_round = clients_per_round
        self.population, self.max_clients = population, max_clients
        self.bits, self.gamma, self.beta = bits, gamma, beta
        self.rotation, self.rotation_seed = rotation, rotation_seed
        self.max_wrap_probability = max_wrap_probability
        self.secure_noise = bool(secure_noise)
        self._secure: SecureNoise | None = None  # keyed on first use
        self.mechanism: SkellamMechanism | None = None
        self.dim: int | None = None
        self.accountant = SkellamAccountant()  # against observers of the released models
        self.server_accountant = SkellamAccountant()  # against the server: no amplification
        self.noise_secure: bool | None = None
        self._encoded_rounds: set[int] = set()
        self._transport: Any = None
        self.run_seed = 0

    # -- the mechanism -------------------------------------------------------------------------
    @property
    def q(self) -> float:
        """The Poisson sampling rate the accountant amplifies by (1 under fixed sampling)."""
        return float(self.rate) if self.sampling == "poisson" else 1.0

    def expected_clients(self) -> float:
        """The fixed denominator: q * N (Poisson) or the cohort size (fixed)."""
        if self.sampling == "poisson":
            assert self.rate is not None and self.population is not None
            return self.rate * self.population
        assert self.dp_clients_per_round is not None
        return float(self.dp_clients_per_round)

    def _max_clients(self) -> int:
        if self.max_clients is not None:
            return int(self.max_clients)
        if self.sampling == "fixed":
            assert self.dp_clients_per_round is not None
            return int(self.dp_clients_per_round)
        if self.population is None:
            raise ValueError("DistributedSkellam needs the population size; give population=")
        return int(self.population)

    def build_mechanism(self, dim: int) -> SkellamMechanism:
        """Choose ``gamma`` and ``mu`` for a model of ``dim`` parameters (once per run)."""
        if self.mechanism is not None and self.dim == dim:
            return self.mechanism
        n = max(self._max_clients(), self.min_contributors)
        m = self.min_contributors
        dprime = padded_dim(dim) if self.rotation else dim

        def safe_gamma(var: float) -> float:
            if self.gamma is not None:
                return float(self.gamma)
            g = max_gamma(dim, self.clip, var, self.bits, n, m, beta=self.beta,
                          rotation=self.rotation,
                          max_wrap_probability=self.max_wrap_probability)
            if g <= 0:
                raise ConfigError(
                    "privacy.bits", self.bits,
                    f"enough bits for the sum of {n} clients' Skellam-noised vectors: no scale "
                    f"keeps the wrap-around probability below {self.max_wrap_probability:g}")
            return g

        def mu_for(gamma: float) -> float:
            if self.noise_multiplier is not None:
                return (gamma * self.noise_multiplier * self.clip) ** 2
            assert self.target_epsilon is not None and self.planned_rounds is not None
            l2 = rounded_l2_bound(gamma * self.clip, dprime, self.beta)
            return calibrate_skellam_mu(self.target_epsilon, self.delta, self.planned_rounds,
                                        l1=l2 * min(math.sqrt(dprime), l2), l2=l2, q=self.q)

        # Noise variance in float units (mu / gamma^2); start from z = 1 and iterate: more
        # noise leaves less room in the ring (smaller gamma), which raises the sensitivity
        # relative to the clip a little.
        var = (self.clip * (self.noise_multiplier or 1.0)) ** 2
        gamma = safe_gamma(var)
        for _ in range(20):
            var_new = mu_for(gamma) / gamma ** 2
            gamma_new = safe_gamma(var_new)
            var = var_new
            if gamma_new >= gamma * (1 - 1e-6):
                break
            gamma = gamma_new
        mechanism = None
        for _ in range(50):
            try:
                mechanism = SkellamMechanism(
                    dim=dim, clip=self.clip, gamma=gamma, mu=mu_for(gamma),
                    min_contributors=m, max_clients=n, bits=self.bits, beta=self.beta,
                    rotation=self.rotation, rotation_seed=self.rotation_seed,
                    max_wrap_probability=self.max_wrap_probability)
                break
            except ValueError:
                if self.gamma is not None:
                    raise
                gamma *= 0.98
        if mechanism is None:
            raise ConfigError("privacy.bits", self.bits,
                              "a configuration whose modular-clipping bound holds")
        self.mechanism, self.dim = mechanism, dim
        return mechanism

    def attach_secure_aggregation(self, transport: Any) -> None:
        """Called by ``SecAggPlusTransport`` when it adopts this strategy's encoder; without
        it no round is configured (clients would upload their updates in plaintext)."""
        self._transport = transport

    def secagg_encoder(self, round_num: int, *, dim: int,
                       noise_secure: bool) -> SkellamMechanism:
        """What ``SecAggPlusTransport`` runs on each client this round; refuses a round that
        would exceed the budget before any client encodes."""
        mechanism = self.build_mechanism(dim)
        if self.budget_epsilon is not None:
            after = self.accountant.epsilon(self.delta, [(mechanism.release(self.q), 1)])
            if after > self.budget_epsilon:
                raise PrivacyBudgetExhausted(
                    f"round {round_num} would exceed the budget epsilon={self.budget_epsilon} at "
                    f"delta={self.delta} (spent so far: {self._epsilon():.4f})")
        self.noise_secure = noise_secure if self.noise_secure is None else \
            (self.noise_secure and noise_secure)
        self._encoded_rounds.add(round_num)
        return mechanism

    # -- the round -------------------------------------------------------------------------------
    def configure_fit(
        self, round_num: int, available: Sequence[str], rng: np.random.Generator, *,
        run_seed: int, full_steps: Mapping[str, int] | None = None,
    ) -> list[ClientTask]:
        if self._transport is None:
            raise ConfigError(
                "transport", "a transport without the Skellam encoder",
                "SecAggPlusTransport: DistributedSkellam's clients encode and noise their "
                "updates inside SecAgg+ (any other transport would upload them in plaintext)")
        self.run_seed = run_seed
        if self.population is None:
            self.population = len(available)
        if self.secure_noise and self._secure is None:
            self._secure = SecureNoise()
        return dp_cohort(
            round_num, available, rng, run_seed=run_seed, sampling=self.sampling,
            rate=self.rate, stages=self.client_stages,
            fixed=lambda r: super(DistributedSkellam, self).configure_fit(
                round_num, available, r, run_seed=run_seed, full_steps=full_steps),
            fit_config=lambda rnd, seed: self.fit_config(rnd, seed=seed),
            secure=self._secure if self.secure_noise else None)

    def before_round(self, round_num: int, available: Sequence[str]) -> None:
        if self.population is None:
            self.population = len(available)
        if self.budget_epsilon is not None and self.mechanism is not None:
            after = self.accountant.epsilon(self.delta, [(self.mechanism.release(self.q), 1)])
            if after > self.budget_epsilon:
                raise PrivacyBudgetExhausted(
                    f"round {round_num} would exceed the budget epsilon={self.budget_epsilon} "
                    f"at delta={self.delta} (spent so far: {self._epsilon():.4f})")

    def _epsilon(self, accountant: SkellamAccountant | None = None) -> float:
        acc = self.accountant if accountant is None else accountant
        return acc.epsilon(self.delta) if acc.steps else 0.0

    def finish_round(
        self, round_num: int, weights: torch.Tensor, tally: Any
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        count = int(tally.count)
        if count > 0 and round_num not in self._encoded_rounds:
            raise ConfigError(
                "transport", "a transport without the Skellam encoder",
                "SecAggPlusTransport: DistributedSkellam's clients encode and noise their "
                "updates inside SecAgg+; this round's updates were summed without it")
        self._encoded_rounds.discard(round_num)
        metrics: dict[str, Any] = {}
        mech = self.mechanism
        if count > 0:
            assert mech is not None
            # The server saw a sum carrying min(count, m) * mu / m of Skellam variance.
            mu_seen = mech.share_mu * min(count, self.min_contributors)
            self.accountant.record(SkellamRound(mech.l1_sensitivity, mech.l2_sensitivity,
                                                mu_seen, self.q))
            self.server_accountant.record(SkellamRound(mech.l1_sensitivity,
                                                       mech.l2_sensitivity, mu_seen, 1.0))
        if count < self.min_contributors or tally.acc.weighted_sum is None:
            # Too few shares: under-noised, so not applied to the model (still accounted).
            metrics["dp_round_discarded"] = 1.0
            new_weights = weights
        else:
            assert mech is not None
            mean = tally.acc.weighted_sum.to(torch.float32).cpu() / self.expected_clients()
            new_weights = self.apply(weights, mean.to(weights.device))
            # Nominal (min_contributors shares), as DP-FedAvg reports it; each further
            # contributor adds its share on top.
            metrics["dp_noise_std_on_mean"] = mech.noise_std / self.expected_clients()
        metrics["dp_epsilon"] = self._epsilon()
        metrics["dp_epsilon_against_server"] = self._epsilon(self.server_accountant)
        metrics["dp_delta"] = self.delta
        return new_weights, metrics

    # -- state and reports ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "accountant": self.accountant.state_dict(),
                "server_accountant": self.server_accountant.state_dict(),
                "population": self.population, "dim": self.dim,
                "noise_secure": self.noise_secure}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.accountant.load_state_dict(state["accountant"])
        self.server_accountant.load_state_dict(state["server_accountant"])
        self.population = state["population"]
        self.noise_secure = state["noise_secure"]
        if state["dim"] is not None:
            self.build_mechanism(int(state["dim"]))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "strategy": self.name, "mechanism": "skellam",
                "clip": self.clip, "delta": self.delta,
                "noise_multiplier": self.noise_multiplier,
                "target_epsilon": self.target_epsilon, "planned_rounds": self.planned_rounds,
                "budget_epsilon": self.budget_epsilon, "sampling": self.sampling,
                "rate": self.rate, "dp_clients_per_round": self.dp_clients_per_round,
                "min_contributors": self.min_contributors, "max_clients": self.max_clients,
                "bits": self.bits, "gamma": self.gamma, "beta": self.beta,
                "rotation": self.rotation, "rotation_seed": self.rotation_seed,
                "max_wrap_probability": self.max_wrap_probability,
                **({"secure_noise": True} if self.secure_noise else {})}

    def guarantees(self) -> dict[str, Any]:
        mech = self.mechanism
        noise = ("deterministic noise: simulation only (seeded; whoever knows the seeds can "
                 "remove it)" if self.noise_secure is False else
                 "SecureNoise on each client (ChaCha20 keyed from os.urandom)"
                 if self.noise_secure else "not yet drawn")
        return {
            "differential_privacy": {
                "mechanism": "distributed Skellam (Agarwal, Kairouz and Liu 2021) on the "
                             "integers SecAgg+ sums",
                "unit": "client",
                "epsilon": self._epsilon(),
                "epsilon_against_server": self._epsilon(self.server_accountant),
                "delta": self.delta,
                "accountant": "Skellam RDP with post-rounding L1/L2 sensitivities; Poisson "
                              "subsampling by the general bound of Zhu and Wang 2019"
                              if self.sampling == "poisson" else
                              "Skellam RDP with post-rounding L1/L2 sensitivities, no "
                              "subsampling amplification",
                "neighboring": "one client's update replaced by zero (add/remove for the "
                               "sampling)",
                "sampling": (f"Poisson, q={self.rate} (amplification only against observers "
                             "who do not know the cohort; the server does)"
                             if self.sampling == "poisson" else
                             f"fixed size {self.dp_clients_per_round} of {self.population}"),
                "cohort": "SecureNoise (ChaCha20 keyed from os.urandom)" if self.secure_noise
                          else "derived from the run seed (deterministic: simulation only)",
                "rounds": self.accountant.steps,
                "clip": self.clip,
                "noise_multiplier": self.noise_multiplier,
                **({"skellam": mech.describe()} if mech is not None else {}),
                "noise_seed": noise,
                "noise_added_by": f"the clients (integer Skellam shares; full noise once at "
                                  f"least {self.min_contributors} shares are summed)",
            },
            "secure_aggregation": None,
            "server_sees": "only what the transport reveals: with SecAgg+, the Skellam-noised "
                           "integer sum",
        }
