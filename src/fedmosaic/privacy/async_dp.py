"""Client-level central DP for the asynchronous schedules (FedBuff, FedAsync).

The mechanism is DP-FedAvg's (McMahan, Ramage, Talwar and Zhang 2018, "Learning
Differentially Private Recurrent Language Models", ICLR), applied per asynchronous server
step instead of per sampled synchronous round:

* **FedBuff** (Nguyen et al. 2022): each arriving update is clipped by the server to L2 norm
  ``C`` *before* its staleness weight ``s`` is applied. Every staleness function the
  schedules offer has ``0 < s <= 1`` and the release checks it for every update (a weight
  above 1 raises), so each summed term ``s_i * clip(Delta_i)`` has norm at most ``C``. A
  client contributes at most one update to a buffer (the buffer is built with
  ``distinct_clients``; the schedule holds a buffered client back until the flush). At the
  flush the buffer's *sum* of K terms gets Gaussian noise ``N(0, (z C)^2 I)`` and is divided
  by the fixed K (uniform weighting only: sample-count weighting would make the
  denominator, hence the sensitivity, data-dependent); the server optimizer then applies it.
  The noise std on the applied mean is ``z C / K``.
* **FedAsync** (Xie et al. 2019): each arriving update is one server step: its clipped delta
  gets ``N(0, (z C)^2 I)`` and is mixed in as usual, ``x <- x + a_t (x_base + d - x)``. The
  mixing weight ``a_t = alpha * s(staleness)`` and the base ``x_base`` depend only on the
  schedule (who arrived when) and on earlier released models, not on the client's data, so
  the mixing is post-processing of the noised delta (it is FedBuff with K = 1 in accounting
  and noise; the noise std on the step is ``a_t z C``, with no averaging over clients).

**Accounting.** Asynchronous dispatch is not random sampling (clients are redispatched as
they finish; who fills a buffer is a matter of speed and availability), so no amplification
by subsampling is claimed: each server step is one Gaussian mechanism with noise multiplier
``z`` over the whole population (``GaussianDpEvent(z)``, q = 1), and T steps are their
composition (RDP or PLD, dp-accounting). The neighbouring relation is *zero-out* (Kairouz et
al. 2021, "Practical and Private (Deep) Learning without Sampling or Shuffling", ICML): one
client's updates are replaced by zero updates, every arrival unchanged. Under it a step the
client joined moves the noised sum by at most ``C`` and a step it did not join by 0, so the
T-fold composition bounds every client's privacy loss whatever subset of steps it joined.
The participation pattern (which client's update filled which buffer at which version, the
staleness, failures and timing, and the sample counts that drive simulated durations) is
outside the guarantee, as participation is for DP-FedAvg (``NOT_COVERED``).

A budget (``budget_epsilon``) stops the run before the step that would exceed it
(``PrivacyBudgetExhausted``: checked when a buffer receives its first update, so no client
trains for a release that will not happen, and again at the release). The accountant is part
of the strategy's state, written in the same atomic checkpoint as the model version it
accounts for, before any client receives that version.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fedmosaic.algorithms.fedbuff import FedBuffBuffer
from fedmosaic.algorithms.staleness import check_staleness
from fedmosaic.algorithms.strategy import FedAvg, client_seed
from fedmosaic.core.errors import ConfigError, PrivacyBudgetExhausted
from fedmosaic.core.update import ClientUpdate, validate_update
from fedmosaic.privacy.accountant import (
    PrivacyAccountant,
    PrivacyBudget,
    calibrate_noise_multiplier,
)
from fedmosaic.privacy.cohort import check_noise_settings
from fedmosaic.privacy.dp_fedavg import NOT_COVERED, SEEDED_NOISE_NOTICE
from fedmosaic.privacy.randomness import NoiseSource, SecureNoise, SeededNoise

__all__ = ["ASYNC_DP_GUARANTEE", "AsyncDPFedAvg", "AsyncGaussianRelease", "DPFedBuffBuffer"]

#: The guarantee's form, as ``guarantees()`` states it.
ASYNC_DP_GUARANTEE = ("client-level (epsilon, delta) per server step composition, no "
                      "amplification")

#: What the asynchronous guarantee does not cover, besides DP-FedAvg's ``NOT_COVERED``.
ASYNC_NOT_COVERED = (
    "the asynchronous participation pattern: which client's update filled which buffer at "
    "which version, its staleness, arrival times, failures and rejections (they are "
    "treated as public: the neighbouring runs have the same arrivals)",
)


def clip_to_norm(delta: torch.Tensor, clip: float) -> tuple[torch.Tensor, float]:
    """``delta`` scaled to L2 norm at most ``clip`` (unchanged, the same tensor, when
    within it) and its norm before clipping."""
    norm = float(torch.linalg.vector_norm(delta))
    if norm <= clip:
        return delta, norm
    return delta * (clip / norm), norm


class AsyncGaussianRelease:
    """The Gaussian mechanism of one asynchronous server step and its accounting.

    ``clip`` (C), ``noise_multiplier`` (z > 0: noise std ``z * C`` on the released sum),
    ``delta``; ``budget_epsilon`` stops the run before a step that would exceed it.
    Every step is recorded as an unsampled Gaussian mechanism (``sampling="none"``) under
    add/remove, which for an unsampled Gaussian is the zero-out relation's arithmetic.
    ``noise(step)`` is where step ``step``'s noise comes from (step = steps released + 1).
    """

    def __init__(self, *, clip: float, noise_multiplier: float, delta: float,
                 noise: Callable[[int], NoiseSource],
                 budget_epsilon: float | None = None, accountant: str = "rdp",
                 conversion: str = "improved",
                 orders: str | Sequence[float] | None = None) -> None:
        if not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
            raise ValueError(f"clip must be a finite number > 0, got {clip!r}")
        if not (isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier)
                and noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be a finite number > 0 (z = 0 releases "
                             f"the clipped sum with no privacy), got {noise_multiplier!r}")
        self.clip = float(clip)
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.noise = noise
        self.accountant = PrivacyAccountant(accountant, neighboring="add_remove",
                                            conversion=conversion, orders=orders)
        self.budget = (PrivacyBudget(budget_epsilon, delta) if budget_epsilon is not None
                       else None)

    @property
    def steps(self) -> int:
        """Server steps released (and accounted) so far."""
        return self.accountant.steps

    def epsilon(self) -> float:
        """Epsilon at ``delta`` after the steps released so far (0 before the first)."""
        return self.accountant.epsilon(self.delta) if self.steps else 0.0

    def before_step(self) -> None:
        """Raise ``PrivacyBudgetExhausted`` if one more step would exceed the budget."""
        if self.budget is None:
            return
        if self.budget.would_exceed(self.accountant, self.noise_multiplier, "none"):
            raise PrivacyBudgetExhausted(
                f"server step {self.steps + 1} would exceed the budget epsilon="
                f"{self.budget.epsilon} at delta={self.delta} (spent so far: "
                f"{self.epsilon():.4f} after {self.steps} steps, no amplification)")

    def check_weight(self, weight: float, staleness: int) -> None:
        """The staleness weight must be in (0, 1]: above 1 it would scale a clipped update
        past ``C``, the sensitivity the noise is calibrated to."""
        if not 0 < weight <= 1:
            raise ConfigError("strategy.staleness", f"weight {weight!r} at staleness "
                              f"{staleness}", "a staleness function with weights in (0, 1] "
                              "under DP: a weight above 1 would raise the sensitivity above "
                              "the clip")

    def gaussian(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """This step's noise on the sum: ``N(0, (z C)^2)`` per coordinate (float32, CPU)."""
        source = self.noise(self.steps + 1)
        return source.gaussian(tuple(shape), self.noise_multiplier * self.clip, torch.float32)

    def record(self, k: int) -> dict[str, Any]:
        """Account one released step (a sum of at most ``k`` clipped terms divided by
        ``k``); the metrics for its record, named as DP-FedAvg's."""
        self.accountant.record_gaussian_round(self.noise_multiplier, "none")
        return {"dp_clip": self.clip, "dp_noise_multiplier": self.noise_multiplier,
                "dp_noise_std_on_mean": self.noise_multiplier * self.clip / k,
                "dp_epsilon": self.accountant.epsilon(self.delta), "dp_delta": self.delta}


class DPFedBuffBuffer:
    """A FedBuff buffer whose flush is a DP release (the ``UpdateBuffer`` a ``FedBuffSchedule``
    takes): it clips each update to the release's ``C`` before the inner ``FedBuffBuffer``
    applies the staleness weight, and on ``flush`` adds ``N(0, (z C)^2)`` to the sum and
    divides by K. ``inner`` must weigh uniformly and refuse a second update of a client.
    The flush's stats carry the step's DP metrics under ``"extra"``.
    """

    def __init__(self, inner: FedBuffBuffer, release: AsyncGaussianRelease) -> None:
        if inner.weighting != "uniform":
            raise ConfigError("strategy.weighting", inner.weighting, "'uniform' under DP: "
                              "sample-count weights make the denominator, hence the "
                              "sensitivity, depend on the clients' data")
        if not inner.distinct_clients:
            raise ValueError("a DP buffer needs distinct_clients=True: one client's "
                             "contribution to a step must be one clipped update")
        # At configuration: a staleness function is non-increasing, so s(0) <= 1 bounds it
        # (every update's weight is checked again as it arrives).
        release.check_weight(inner.staleness(0), 0)
        self.inner, self.release = inner, release

    @property
    def count(self) -> int:
        return self.inner.count

    @property
    def full(self) -> bool:
        return self.inner.full

    @property
    def client_ids(self) -> list[str]:
        return self.inner.client_ids

    @property
    def k(self) -> int:
        return self.inner.k

    def add(self, update: ClientUpdate, staleness: int) -> float:
        """Clip ``update`` to C, then buffer it with its staleness weight (in (0, 1])."""
        if self.inner.count == 0:
            self.release.before_step()  # no client trains on for a step beyond the budget
        staleness = check_staleness(staleness)
        update = validate_update(update, numel=self.inner.dim)  # finite before its norm
        self.release.check_weight(self.inner.staleness(staleness), staleness)
        clipped, _ = clip_to_norm(update.delta, self.release.clip)
        return self.inner.add(update, staleness, delta=clipped)

    def flush(self) -> tuple[torch.Tensor, dict[str, Any]]:
        """``(sum_i s_i clip(Delta_i) + N(0, (z C)^2 I)) / K`` and the buffer's stats; only
        a full buffer is released (the denominator is the fixed K)."""
        if not self.inner.full:
            raise ValueError(f"a DP buffer is released full only (holds {self.inner.count} of "
                             f"k={self.inner.k}): the fixed denominator is K")
        self.release.before_step()
        k = self.inner.k
        noise = self.release.gaussian((self.inner.dim,))
        mean, stats = self.inner.flush()  # sum / K: uniform weights of exactly 1.0
        # mean + noise / K: at zero noise exactly the plain buffer's mean.
        noised = mean + noise.to(mean.device) / k
        stats["extra"] = self.release.record(k)
        return noised, stats

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.inner.load_state_dict(state)

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "dp_clip": self.release.clip}


class AsyncDPFedAvg(FedAvg):
    """DP-FedAvg for asynchronous schedules: the strategy of ``[privacy] mode = "central"``
    with ``[strategy] schedule = "fedbuff"`` or ``"fedasync"`` (see the module docstring).

    Give ``noise_multiplier`` (z) or ``target_epsilon`` with ``rounds`` (the planned server
    steps: z is calibrated for that many unsampled Gaussian steps); ``budget_epsilon`` stops
    the run before the step that would exceed it. ``secure_noise`` draws the server's noise
    from ``SecureNoise`` (a deployment must); otherwise it is ``SeededNoise`` from (run seed,
    step), simulation only. Weighting is uniform. It runs under an asynchronous schedule only
    (a synchronous round is refused: use ``DPFedAvg``, whose sampling is accounted).
    """

    name = "async-dp-fedavg"

    def __init__(
        self,
        *,
        clip: float,
        delta: float,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        rounds: int | None = None,
        budget_epsilon: float | None = None,
        accountant: str = "rdp",
        accountant_conversion: str = "improved",
        accountant_orders: str | Sequence[float] | None = None,
        secure_noise: bool = False,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("weighting", "uniform") != "uniform":
            raise ConfigError("strategy.weighting", kwargs["weighting"], "'uniform' under DP: "
                              "sample-count weights make the sensitivity data-dependent")
        kwargs.pop("weighting", None)
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        super().__init__(weighting="uniform", **kwargs)
        check_noise_settings(noise_multiplier, target_epsilon, rounds)
        self.initial_noise_multiplier = noise_multiplier
        self.target_epsilon, self.planned_rounds = target_epsilon, rounds
        self.budget_epsilon = budget_epsilon
        self.accountant_kind = accountant
        self.accountant_conversion = accountant_conversion
        self.accountant_orders = (None if accountant_orders is None else
                                  accountant_orders if isinstance(accountant_orders, str)
                                  else [float(o) for o in accountant_orders])
        self.secure_noise = bool(secure_noise)
        self._secure: SecureNoise | None = None
        self.run_seed = 0  # the server's seed, set by the schedule (bind)
        z = noise_multiplier
        if z is None:
            assert target_epsilon is not None and rounds is not None
            z = calibrate_noise_multiplier(target_epsilon, delta, rounds, "none",
                                           accountant=accountant,
                                           conversion=accountant_conversion,
                                           orders=accountant_orders)
        self.release = AsyncGaussianRelease(
            clip=clip, noise_multiplier=z, delta=delta, noise=self.step_noise,
            budget_epsilon=budget_epsilon, accountant=accountant,
            conversion=accountant_conversion, orders=accountant_orders)

    # -- wiring with the schedule --------------------------------------------------------
    def bind(self, run_seed: int) -> None:
        """The server's seed, for seeded (simulation) noise."""
        self.run_seed = int(run_seed)

    def step_noise(self, step: int) -> NoiseSource:
        """Where server step ``step``'s noise comes from: ``SecureNoise`` with
        ``secure_noise``, else ``SeededNoise`` from (run seed, step) (simulation only)."""
        if self.secure_noise:
            if self._secure is None:
                self._secure = SecureNoise()
            return self._secure
        return SeededNoise(client_seed(self.run_seed, step, "__async_dp_noise__"))

    def dp_buffer(self, inner: FedBuffBuffer) -> DPFedBuffBuffer:
        """FedBuff's buffer as a DP release (``inner``: uniform, distinct clients)."""
        return DPFedBuffBuffer(inner, self.release)

    def release_update(self, update: ClientUpdate, staleness: int,
                       dim: int) -> tuple[ClientUpdate, dict[str, Any]]:
        """FedAsync's step under DP: ``update`` with its delta clipped to C and noised with
        ``N(0, (z C)^2)``, and the step's DP metrics (the step is accounted here)."""
        self.release.before_step()
        check_staleness(staleness)
        update = validate_update(update, numel=dim)
        clipped, _ = clip_to_norm(update.delta, self.release.clip)
        noise = self.release.gaussian((dim,))
        noised = clipped + noise.to(clipped.device)
        metrics = self.release.record(1)
        return dataclasses.replace(update, delta=noised), metrics

    def check_schedule(self, schedule: str) -> None:
        """Refuse, at configuration, an asynchronous schedule this DP cannot account."""
        if schedule not in ("fedbuff", "fedasync"):
            raise ConfigError("strategy.schedule", schedule, "'fedbuff' or 'fedasync' with "
                              "AsyncDPFedAvg (synchronous rounds: DPFedAvg, which accounts "
                              "its client sampling)")

    # -- a synchronous round is not this strategy's ----------------------------------------
    def before_round(self, round_num: int, available: Sequence[str]) -> None:
        raise ConfigError("strategy.schedule", "sync", "'fedbuff' or 'fedasync' with "
                          "AsyncDPFedAvg: its accounting is per asynchronous server step "
                          "without sampling; synchronous rounds use DPFedAvg")

    def finish_round(self, round_num: int, weights: torch.Tensor,
                     tally: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        raise ConfigError("strategy.schedule", "sync", "'fedbuff' or 'fedasync' with "
                          "AsyncDPFedAvg")

    # -- state and reports -----------------------------------------------------------------
    @property
    def noise_multiplier(self) -> float:
        return self.release.noise_multiplier

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "accountant": self.release.accountant.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.release.accountant.load_state_dict(state["accountant"])

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "strategy": self.name, "clip": self.release.clip,
                "delta": self.release.delta, "noise_multiplier": self.noise_multiplier,
                "target_epsilon": self.target_epsilon, "planned_rounds": self.planned_rounds,
                "budget_epsilon": self.budget_epsilon, "accountant": self.accountant_kind,
                "accountant_conversion": self.accountant_conversion,
                "accountant_orders": self.accountant_orders,
                **({"secure_noise": True} if self.secure_noise else {})}

    def guarantees(self) -> dict[str, Any]:
        r = self.release
        steps = r.steps
        not_covered = list(NOT_COVERED) + list(ASYNC_NOT_COVERED)
        if self.client_metrics == "suppress":
            not_covered = [n for n in not_covered if "training metrics" not in n]
        return {
            "differential_privacy": {
                "unit": "client",
                "guarantee": ASYNC_DP_GUARANTEE,
                "epsilon": r.epsilon(),
                "delta": r.delta,
                "accountant": self.accountant_kind,
                "accountant_conversion": r.accountant.conversion,
                "epsilon_by_accountant": r.accountant.report(r.delta) if steps else {},
                "neighboring": "zero_out: one client's updates replaced by zero updates, "
                               "the same arrivals",
                "sampling": "none (q = 1, no amplification): asynchronous dispatch is not "
                            "random sampling; each server step is an unsampled Gaussian "
                            "mechanism over the whole population, composed over the steps",
                "rounds": steps,
                "noise_multiplier": r.noise_multiplier,
                "clip": r.clip,
                "sensitivity": "clip: each update clipped to C before its staleness weight "
                               "(checked <= 1); at most one update per client and step",
                "noise_seed": ("SecureNoise (ChaCha20 keyed from os.urandom)"
                               if self.secure_noise else SEEDED_NOISE_NOTICE),
                "noise_added_by": "the server",
                "not_covered": not_covered,
                "client_metrics": self.client_metrics,
            },
            "secure_aggregation": None,
            "server_sees": "every client's update in plaintext (central DP: the server is "
                           "trusted; the released model versions are protected)",
        }
