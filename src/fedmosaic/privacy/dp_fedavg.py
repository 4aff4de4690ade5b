"""Client-level differential privacy for federated averaging.

DP-FedAvg (McMahan, Ramage, Talwar and Zhang 2018, "Learning Differentially Private Recurrent
Language Models", ICLR): each client's update is clipped to L2 norm ``S``; the server sums the
clipped updates, adds Gaussian noise of standard deviation ``z * S`` to the sum and divides by
the *expected* number of clients (a fixed denominator, so one client's presence changes the
sum by at most ``S``); the server optimizer then applies the noisy mean. The unit of privacy
is the client: neighbouring data sets differ in all the data of one client.

Adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy 2021, "Differentially Private
Learning with Adaptive Clipping", NeurIPS) tracks a target quantile ``gamma`` of the update
norms: ``S <- S * exp(-eta * (b - gamma))`` where ``b`` is the noisy fraction of clients whose
norm was at most ``S``. As in TF-Privacy's quantile estimator, the server releases the noised
sum of ``b_i - 1/2`` over the round's clients (noise std ``sigma_b``), which one added or
removed client moves by at most 1/2, and recovers the fraction by adding ``expected / 2`` and
dividing by ``expected``. That sensitivity is what Andrew et al.'s split assumes: the update
noise multiplier is raised to ``z_update = (z**-2 - (2 * sigma_b)**-2) ** -0.5`` so that the
pair of Gaussian releases together has noise multiplier ``z`` (their Theorem 1). Under the
replace-one relation (fixed-size cohorts) one client moves the centred count by 1 and the sum
by ``2S``, so the pair has multiplier ``z / 2``, the same ratio as the update alone.

Client sampling is part of the guarantee: ``sampling="poisson"`` includes each client
independently with probability ``q`` (the assumption of the subsampled-Gaussian analysis;
rounds have a random number of clients); ``"fixed"`` draws exactly ``clients_per_round``
without replacement and is accounted as sampling without replacement under the replace-one
relation, where one client can move the clipped sum by ``2S`` (so noise ``z * S`` is a
multiplier of ``z / 2`` for the accountant). The accountant
(``fedmosaic.privacy.accountant``, built on dp-accounting) records every round; ``epsilon``
after each round is in the round metrics, and a budget either calibrates the noise
multiplier up front or stops training before it would be exceeded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedmosaic.algorithms.strategy import CLIENT_NOISE_NOTICE, ClientTask, FedAvg, client_seed
from fedmosaic.core.errors import PrivacyBudgetExhausted
from fedmosaic.core.update import ClientUpdate
from fedmosaic.privacy.accountant import (
    PrivacyAccountant,
    PrivacyBudget,
    calibrate_noise_multiplier,
)
from fedmosaic.privacy.cohort import check_noise_settings, cohort_settings, dp_cohort
from fedmosaic.privacy.randomness import NoiseSource, SecureNoise, SeededNoise

#: What a run with seeded noise says about its noise in its guarantees.
SEEDED_NOISE_NOTICE = "deterministic noise: simulation only"

#: What the DP guarantee does not cover (said in every DP run's guarantees).
NOT_COVERED = (
    "participation: which clients were selected and reported, and how many (the round "
    "records' clients_selected and updates)",
    "clients' sample counts",
    "clients' reported training metrics (train_loss, train_accuracy, ...), unless "
    "privacy.client_metrics = 'suppress'",
    "floating-point attacks on the float Gaussian sampler (Mironov 2012)",
)


class ClippedSumAggregator:
    """Uniform-weight sum of updates clipped to L2 norm ``clip`` (the DP-FedAvg sum).

    ``prepare`` clips each validated update before the tally adds it and counts how many
    were within the bound (for adaptive clipping). Not streaming: transports that reduce
    remotely would skip the clip, so the server receives individual updates.
    """

    streaming = False

    def __init__(self, clip: float, cap: float | None = None) -> None:
        self.clip = float(clip)
        # A norm bound (fedmosaic.robust.NormBound) tighter than the clip, if any.
        self.cap = cap

    @property
    def bound(self) -> float:
        """The norm every summed update is clipped to: ``min(clip, cap)``."""
        return self.clip if self.cap is None else min(self.clip, self.cap)

    def weight_of(self, update: ClientUpdate) -> float:
        return 1.0

    def prepare(self, update: ClientUpdate, tally: Any) -> torch.Tensor:
        norm = float(torch.linalg.vector_norm(update.delta))
        stats = tally.stage_stats
        stats["within_clip"] = stats.get("within_clip", 0.0) + (1.0 if norm <= self.clip else 0.0)
        stats["norm_sum"] = stats.get("norm_sum", 0.0) + norm
        bound = self.bound
        if norm <= bound:
            return update.delta
        return update.delta * (bound / norm)

    def describe(self) -> dict[str, Any]:
        return {"name": "clipped_sum", "clip": self.clip}


class DPFedAvg(FedAvg):
    """FedAvg with client-level (epsilon, delta)-DP: clip, fixed denominator, Gaussian noise.

    Give either ``noise_multiplier`` (z) or ``target_epsilon`` with ``rounds``: the latter
    calibrates z so that ``rounds`` rounds cost at most ``target_epsilon`` at ``delta``. With
    ``budget_epsilon`` the run stops before a round that would push epsilon above it.
    ``sampling="poisson"`` needs ``rate`` (q); ``"fixed"`` needs ``clients_per_round``.
    ``adaptive_clip_quantile`` (gamma) turns on adaptive clipping with learning rate
    ``adaptive_clip_lr`` and count-noise std ``adaptive_clip_noise`` (sigma_b, the paper's
    default is expected_clients / 20).

    Randomness (``fedmosaic.privacy.randomness``): by default the noise comes from
    ``SeededNoise`` seeded by (run seed, round) and the cohort from the run's seeded generator,
    so simulations are reproducible -- and anyone who knows or finds the run seed (a client can
    search it from its own ``FitConfig.seed``) can predict the cohort and remove the noise; the
    guarantees then say "deterministic noise: simulation only". ``secure_noise=True`` draws the
    noise, the cohort and the clients' ``FitConfig`` seeds from ``SecureNoise`` (ChaCha20 keyed
    from ``os.urandom``), as a deployment must; ``fedmosaic server`` turns it on by default.
    """

    name = "dp-fedavg"

    def __init__(
        self,
        *,
        clip: float,
        delta: float,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        rounds: int | None = None,
        budget_epsilon: float | None = None,
        sampling: str = "poisson",
        rate: float | None = None,
        clients_per_round: int | None = None,
        population: int | None = None,
        accountant: str = "rdp",
        accountant_conversion: str = "improved",
        accountant_orders: str | Sequence[float] | None = None,
        adaptive_clip_quantile: float | None = None,
        adaptive_clip_lr: float = 0.2,
        adaptive_clip_noise: float | None = None,
        secure_noise: bool = False,
        distributed: bool = False,
        min_contributors: int | None = None,
        min_updates: int = 0,
        **kwargs: Any,
    ) -> None:
        if not clip > 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        super().__init__(weighting="uniform",
                         **cohort_settings(sampling, rate, clients_per_round), **kwargs)
        check_noise_settings(noise_multiplier, target_epsilon, rounds)
        if adaptive_clip_quantile is not None and not 0 < adaptive_clip_quantile < 1:
            raise ValueError(f"adaptive_clip_quantile must be in (0, 1), got "
                             f"{adaptive_clip_quantile}")
        if min_updates < 0:
            raise ValueError(f"min_updates must be >= 0, got {min_updates}")
        # Poisson sampling may pick nobody: the round still releases (pure) noise, so by
        # default a DP round needs no minimum number of updates.
        self.min_updates = min_updates
        self.sampling, self.rate = sampling, rate
        self.dp_clients_per_round = clients_per_round
        self.population = population
        self.delta = float(delta)
        self.accountant_kind = accountant
        # Fixed-size sampling is analysed under replace-one; Poisson under add/remove.
        self.neighboring = "add_remove" if sampling == "poisson" else "replace_one"
        self.accountant_conversion = accountant_conversion
        self.accountant_orders = (None if accountant_orders is None else
                                  accountant_orders if isinstance(accountant_orders, str)
                                  else [float(o) for o in accountant_orders])
        # conversion/orders: the classic RDP conversion and a paper's grid of orders reproduce
        # published figures (see fedmosaic.privacy.accountant); budgets and stops use them too.
        self.accountant = PrivacyAccountant(accountant, neighboring=self.neighboring,
                                            conversion=accountant_conversion,
                                            orders=accountant_orders)
        self.target_epsilon, self.planned_rounds = target_epsilon, rounds
        self.budget = (PrivacyBudget(budget_epsilon, delta) if budget_epsilon is not None
                       else None)
        self.adaptive_quantile = adaptive_clip_quantile
        self.adaptive_lr = float(adaptive_clip_lr)
        self.adaptive_noise = adaptive_clip_noise
        self.secure_noise = bool(secure_noise)
        self._secure: SecureNoise | None = None  # keyed on first use
        self.initial_clip = float(clip)
        self.clip_aggregator = ClippedSumAggregator(clip)
        self.aggregator = self.clip_aggregator  # type: ignore[assignment]
        self.noise_multiplier = noise_multiplier
        self.distributed = distributed
        if distributed:
            if adaptive_clip_quantile is not None:
                raise ValueError("adaptive clipping needs the server to see each update's norm; "
                                 "it cannot run with distributed DP")
            if min_contributors is None or min_contributors < 1:
                raise ValueError("distributed DP needs min_contributors >= 1: the fewest "
                                 "updates a released sum may have (at most SecAgg's threshold)")
            # Clients clip and noise; the server only sums (SecAgg+ can carry it).
            from fedmosaic.algorithms.aggregate import FedAvgAggregator

            self.aggregator = FedAvgAggregator(weighting="uniform")  # type: ignore[assignment]
        self.min_contributors = min_contributors
        # Robust rules: only norm bounding composes (it is the clipped sum); the check
        # explains why the others and anomaly detection are refused.
        self.norm_bound = None
        if self.defence is not None:
            from fedmosaic.robust.pipeline import check_central_dp

            self.norm_bound = check_central_dp(self.robust, self.anomaly,
                                               distributed=distributed)
            if self.norm_bound is not None:
                self.clip_aggregator.cap = self.norm_bound.max_norm
            self.defence = None  # the round is DP-FedAvg's clipped, noised sum
        self.user_stages = self.client_stages  # the distributed noise share goes in front
        self.run_seed = 0
        self._calibrated = False

    # -- configuration -----------------------------------------------------------------------
    def _population(self, available: Sequence[str] | None = None) -> int:
        if self.population is not None:
            return self.population
        if available is None:
            raise ValueError("DPFedAvg needs the population size; give population=")
        return len(available)

    def expected_clients(self, population: int) -> float:
        """The fixed denominator: q * N (Poisson) or the fixed cohort size."""
        if self.sampling == "poisson":
            assert self.rate is not None
            return self.rate * population
        assert self.dp_clients_per_round is not None
        return float(self.dp_clients_per_round)

    def _sampling_args(self, population: int) -> dict[str, Any]:
        if self.sampling == "poisson":
            return {"sampling": "poisson", "rate": self.rate}
        return {"sampling": "fixed", "population": population,
                "sample_size": self.dp_clients_per_round}

    def update_noise_multiplier(self, population: int) -> float:
        """The noise multiplier on the update sum, after adaptive clipping's share."""
        z = self._z(population)
        if self.adaptive_quantile is None:
            return z
        sigma_b = self._count_noise(population)
        if 2 * sigma_b <= z:
            raise ValueError(
                f"adaptive clipping's count noise {sigma_b} is too small for noise multiplier "
                f"{z}: need 2 * sigma_b > z (Andrew et al. 2021, Theorem 1)")
        return (z ** -2 - (2 * sigma_b) ** -2) ** -0.5

    def _count_noise(self, population: int) -> float:
        if self.adaptive_noise is not None:
            return float(self.adaptive_noise)
        return self.expected_clients(population) / 20.0

    def sum_sensitivity(self) -> float:
        """How far one client can move the clipped update sum (L2), as the accountant
        assumes: the bound ``min(clip, cap)`` under add/remove, twice it under replace-one."""
        return self._sensitivity_factor() * self.clip_aggregator.bound

    def count_sensitivity(self) -> float:
        """How far one client can move the released (centred) count of clients within the
        clip: 1/2 under add/remove (it adds or removes one ``b_i - 1/2``), 1 under
        replace-one (one ``b_i`` flips)."""
        return 0.5 if self.neighboring == "add_remove" else 1.0

    def _sensitivity_factor(self) -> float:
        """How far one client can move the clipped sum, in units of the clip: ``S`` under
        add/remove (Poisson), ``2S`` under replace-one (fixed-size sampling)."""
        return 1.0 if self.neighboring == "add_remove" else 2.0

    def _accounted(self, z: float) -> float:
        """The noise multiplier the accountant sees: noise std over sensitivity."""
        return z / self._sensitivity_factor()

    def _z(self, population: int) -> float:
        """The noise multiplier z (noise std on the sum = z * clip), calibrated if asked."""
        if self.noise_multiplier is None or (self.target_epsilon is not None
                                             and not self._calibrated):
            assert self.target_epsilon is not None and self.planned_rounds is not None
            accounted = calibrate_noise_multiplier(
                self.target_epsilon, self.delta, self.planned_rounds,
                accountant=self.accountant_kind, neighboring=self.neighboring,
                conversion=self.accountant.conversion, orders=self.accountant.orders,
                **self._sampling_args(population))
            self.noise_multiplier = accounted * self._sensitivity_factor()
            self._calibrated = True
        return float(self.noise_multiplier)

    def _distributed_stage(self) -> tuple[Any, ...]:
        if not self.distributed:
            return ()
        from fedmosaic.privacy.local_dp import DistributedNoiseShare

        assert self.population is not None and self.min_contributors is not None
        z = self._z(self.population)
        return (DistributedNoiseShare(self.initial_clip,
                                      z * self.initial_clip / math.sqrt(self.min_contributors)),)

    def configure_fit(
        self, round_num: int, available: Sequence[str], rng: np.random.Generator, *,
        run_seed: int, full_steps: Mapping[str, int] | None = None,
    ) -> list[ClientTask]:
        self.run_seed = run_seed
        if self.population is None:
            self.population = len(available)
        self.client_stages = self._distributed_stage() + self.user_stages
        return dp_cohort(
            round_num, available, rng, run_seed=run_seed, sampling=self.sampling,
            rate=self.rate, stages=self.client_stages,
            fixed=lambda r: super(DPFedAvg, self).configure_fit(
                round_num, available, r, run_seed=run_seed, full_steps=full_steps),
            fit_config=lambda rnd, seed: self.fit_config(rnd, seed=seed),
            secure=self._secure_source() if self.secure_noise else None)

    # -- the round ---------------------------------------------------------------------------
    def before_round(self, round_num: int, available: Sequence[str]) -> None:
        if self.population is None:
            self.population = len(available)
        if self.budget is None:
            return
        z = self._accounted(self._z(self.population))
        if self.budget.would_exceed(self.accountant, z, **self._sampling_args(self.population)):
            raise PrivacyBudgetExhausted(
                f"round {round_num} would exceed the budget epsilon={self.budget.epsilon} at "
                f"delta={self.delta} (spent so far: {self.accountant.epsilon(self.delta):.4f})")

    def _secure_source(self) -> SecureNoise:
        if self._secure is None:
            self._secure = SecureNoise()
        return self._secure

    def round_noise(self, round_num: int) -> NoiseSource:
        """Where this round's central noise comes from: ``SecureNoise`` with
        ``secure_noise``, else ``SeededNoise`` from (run seed, round) (simulation only)."""
        if self.secure_noise:
            return self._secure_source()
        return SeededNoise(client_seed(self.run_seed, round_num, "__dp_noise__"))

    def finish_round(
        self, round_num: int, weights: torch.Tensor, tally: Any
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        population = self.population if self.population is not None else tally.count
        expected = self.expected_clients(population)
        z_update = self.update_noise_multiplier(population)
        clip = self.clip_aggregator.clip
        bound = self.clip_aggregator.bound  # the sensitivity: clip, or a tighter norm bound
        noise_source = self.round_noise(round_num)
        summed = tally.acc.weighted_sum
        if self.distributed:
            if tally.count < (self.min_contributors or 0):
                # Fewer shares than planned: the sum is under-noised and must not be released.
                metrics = {"dp_epsilon": self.accountant.epsilon(self.delta)
                           if self.accountant.steps else 0.0, "dp_round_discarded": 1.0}
                return weights, metrics
            assert summed is not None
            mean = summed.to(torch.float32).cpu() / expected
        else:
            if summed is None:
                # Poisson sampling can pick nobody; the mechanism still releases noise.
                summed = torch.zeros_like(weights)
            noise = noise_source.gaussian(summed.shape, z_update * bound, torch.float32)
            mean = (summed.to(torch.float32).cpu() + noise) / expected
        new_weights = self.apply(weights, mean.to(weights.device))
        metrics: dict[str, Any] = {"dp_clip": bound, "dp_noise_multiplier": z_update,
                                   "dp_noise_std_on_mean": z_update * bound / expected}
        if self.adaptive_quantile is not None:
            sigma_b = self._count_noise(population)
            released = self.released_count(tally) + float(
                noise_source.gaussian((), sigma_b, torch.float64))
            # The fraction: add back the expected sum of the 1/2's, divide by the expected
            # cohort (TF-Privacy's quantile estimator).
            noisy = (released + expected / 2) / expected
            self.clip_aggregator.clip = clip * math.exp(-self.adaptive_lr
                                                        * (noisy - self.adaptive_quantile))
            metrics["dp_within_clip_fraction"] = noisy
        # With adaptive clipping the update and count noise together have multiplier z
        # (Andrew et al. 2021, Theorem 1; the count's sensitivity is count_sensitivity()).
        self.accountant.record_gaussian_round(self._accounted(self._z(population)),
                                              **self._sampling_args(population))
        metrics["dp_epsilon"] = self.accountant.epsilon(self.delta)
        metrics["dp_delta"] = self.delta
        return new_weights, metrics

    @staticmethod
    def released_count(tally: Any) -> float:
        """The count adaptive clipping releases before noise: ``sum_i (b_i - 1/2)`` over the
        round's summed updates, ``b_i = 1`` when update i's norm was within the clip."""
        within = tally.stage_stats.get("within_clip", 0.0)
        return within - tally.count / 2

    # -- state and reports --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "clip": self.clip_aggregator.clip,
                "accountant": self.accountant.state_dict(),
                "noise_multiplier": self.noise_multiplier, "calibrated": self._calibrated,
                "population": self.population}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.clip_aggregator.clip = float(state["clip"])
        self.accountant.load_state_dict(state["accountant"])
        self.noise_multiplier = state["noise_multiplier"]
        self._calibrated = bool(state["calibrated"])
        self.population = state["population"]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "strategy": self.name, "clip": self.initial_clip,
                "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "target_epsilon": self.target_epsilon, "planned_rounds": self.planned_rounds,
                "budget_epsilon": None if self.budget is None else self.budget.epsilon,
                "sampling": self.sampling, "rate": self.rate,
                "dp_clients_per_round": self.dp_clients_per_round,
                "accountant": self.accountant_kind,
                "adaptive_clip_quantile": self.adaptive_quantile,
                # Only when set, so that earlier runs keep their resume identity.
                **({"accountant_conversion": self.accountant_conversion}
                   if self.accountant_conversion != "improved" else {}),
                **({"accountant_orders": self.accountant_orders}
                   if self.accountant_orders is not None else {}),
                # Only when on, so that seeded runs keep their resume identity; a checkpoint
                # of a seeded run does not resume under secure noise, nor the reverse.
                **({"secure_noise": True} if self.secure_noise else {}),
                **({"robust": self.norm_bound.describe()} if self.norm_bound else {})}

    def guarantees(self) -> dict[str, Any]:
        rounds = self.accountant.steps
        return {
            "differential_privacy": {
                "unit": "client",
                "epsilon": self.accountant.epsilon(self.delta) if rounds else 0.0,
                "delta": self.delta,
                "accountant": self.accountant_kind,
                "accountant_conversion": self.accountant.conversion,
                # The same history by every accountant that supports it (RDP with the improved
                # and the classic conversion, PLD), to compare with a paper's figures.
                "epsilon_by_accountant": self.accountant.report(self.delta),
                "neighboring": self.neighboring,
                "sampling": (f"Poisson, q={self.rate}" if self.sampling == "poisson" else
                             f"fixed size {self.dp_clients_per_round} of {self.population}, "
                             "without replacement"),
                "rounds": rounds,
                "noise_multiplier": self.noise_multiplier,
                "clip": "adaptive" if self.adaptive_quantile is not None else self.initial_clip,
                "noise_seed": ("SecureNoise (ChaCha20 keyed from os.urandom): noise, cohorts "
                               "and client seeds no party can reproduce"
                               if self.secure_noise else SEEDED_NOISE_NOTICE),
                **({"client_noise": CLIENT_NOISE_NOTICE} if self.distributed else {}),
                "noise_added_by": (f"the clients (distributed; full noise once at least "
                                   f"{self.min_contributors} updates are summed)"
                                   if self.distributed else "the server"),
                "not_covered": list(NOT_COVERED) if self.client_metrics != "suppress" else
                               [n for n in NOT_COVERED if "training metrics" not in n],
                "client_metrics": self.client_metrics,
            },
            "secure_aggregation": None,
            "server_sees": ("only what the transport reveals: with SecAgg+, the noised sum"
                            if self.distributed else
                            "every client's clipped update in plaintext (central DP: the "
                            "server is trusted; the released model is protected)"),
            **({"robustness": {"aggregator": self.norm_bound.describe(),
                               "assumes": "nothing about f: each update is clipped to "
                                          "min(clip, max_norm), the DP sensitivity"}}
               if self.norm_bound is not None else {}),
        }
