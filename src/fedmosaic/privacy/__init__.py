"""Privacy: differential privacy, accounting and secure aggregation.

- ``DPFedAvg``: client-level DP-FedAvg (McMahan et al. 2018) with adaptive clipping
  (Andrew et al. 2021), Poisson or fixed-size client sampling, an accountant and a budget.
- ``DistributedSkellam``: distributed DP on integers under SecAgg+ (Agarwal, Kairouz and Liu
  2021), with its own RDP accountant.
- ``LocalDP``: a client stage that clips and noises each update on the client.
- ``SeededNoise`` / ``SecureNoise``: where noise comes from (``NoiseSource``): reproducible
  for simulation, or ChaCha20 keyed from ``os.urandom`` for anything deployed.
- ``PrivacyAccountant`` / ``calibrate_noise_multiplier`` / ``PrivacyBudget``: accounting on
  dp-accounting (RDP and PLD).
- ``laplace_mechanism``: epsilon-DP release of scalar statistics.
- Sample-level DP-SGD inside clients: ``fedmosaic.train.dp_trainer.DPSGDTrainer`` (Opacus).
"""

from fedmosaic.privacy.accountant import (
    PrivacyAccountant,
    PrivacyBudget,
    calibrate_noise_multiplier,
    epsilon_for,
)
from fedmosaic.privacy.distributed_skellam import DistributedSkellam
from fedmosaic.privacy.dp_fedavg import ClippedSumAggregator, DPFedAvg
from fedmosaic.privacy.local_dp import LocalDP, laplace_mechanism
from fedmosaic.privacy.randomness import NoiseSource, SecureNoise, SeededNoise

__all__ = [
    "ClippedSumAggregator",
    "DPFedAvg",
    "DistributedSkellam",
    "LocalDP",
    "NoiseSource",
    "PrivacyAccountant",
    "PrivacyBudget",
    "SecureNoise",
    "SeededNoise",
    "calibrate_noise_multiplier",
    "epsilon_for",
    "laplace_mechanism",
]
