"""The cohort of a DP round: Poisson or fixed-size sampling, from a generator nobody can
predict when the noise must be secure.

Sampling is part of the DP mechanism (amplification by subsampling, Abadi et al. 2016;
McMahan et al. 2018): a cohort predictable from the run seed -- which a client can search
from its own ``FitConfig.seed`` -- voids that amplification. With a ``SecureNoise`` source the
cohort and every client's seed come from the CSPRNG instead, so seeds say nothing about the
run seed. Shared by ``DPFedAvg`` and ``DistributedSkellam``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from fedmosaic.algorithms.strategy import ClientTask, client_seed
from fedmosaic.privacy.randomness import SecureNoise
from fedmosaic.train.base import FitConfig

SAMPLINGS = ("poisson", "fixed")


def cohort_settings(sampling: str, rate: float | None,
                    clients_per_round: int | None) -> dict[str, float | int]:
    """Check a DP strategy's sampling settings; the ``FedAvg`` cohort arguments they mean
    (Poisson: every client is offered, ``dp_cohort`` draws; fixed: ``clients_per_round``)."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if sampling == "poisson":
        if rate is None or not 0 < rate <= 1:
            raise ValueError(f"poisson sampling needs rate in (0, 1], got {rate}")
        if clients_per_round is not None:
            raise ValueError("poisson sampling takes rate, not clients_per_round")
        return {"fraction": 1.0}
    if clients_per_round is None or clients_per_round < 1:
        raise ValueError("fixed sampling needs clients_per_round >= 1")
    return {"clients_per_round": clients_per_round}


def check_noise_settings(noise_multiplier: float | None, target_epsilon: float | None,
                         rounds: int | None) -> None:
    """Exactly one of a noise multiplier and a target epsilon (which needs the rounds)."""
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("give exactly one of noise_multiplier and target_epsilon")
    if noise_multiplier is not None and not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    if target_epsilon is not None and (rounds is None or rounds < 1):
        raise ValueError("target_epsilon needs the planned number of rounds")


def dp_cohort(
    round_num: int, available: Sequence[str], rng: np.random.Generator, *,
    run_seed: int, sampling: str, rate: float | None,
    fixed: Callable[[np.random.Generator], list[ClientTask]],
    fit_config: Callable[[int, int], FitConfig],
    stages: tuple[object, ...], secure: SecureNoise | None,
) -> list[ClientTask]:
    """This round's tasks. ``sampling="poisson"``: every available client independently with
    probability ``rate`` (a round may have any number of clients, even none -- the analysed
    mechanism); ``"fixed"``: ``fixed(rng)``, the strategy's fixed-size draw. ``fit_config``
    maps (round, seed) to a client's settings; ``secure`` (when given) replaces ``rng`` and
    the derived client seeds."""
    if secure is not None:
        rng = secure.numpy()
    if sampling == "fixed":
        tasks = fixed(rng)
    else:
        assert rate is not None
        ids = sorted(available)
        chosen = [c for c, keep in zip(ids, rng.random(len(ids)) < rate) if keep]
        tasks = [ClientTask(c, fit_config(round_num, client_seed(run_seed, round_num, c)),
                            stages)  # type: ignore[arg-type]
                 for c in chosen]
    if secure is None:
        return tasks
    seeds = secure.numpy().integers(0, 2**63, size=len(tasks))
    return [dataclasses.replace(t, config=dataclasses.replace(t.config, seed=int(sd)))
            for t, sd in zip(tasks, seeds, strict=True)]
