"""Privacy: differential privacy, accounting and secure aggregation.

- ``DPFedAvg``: client-level DP-FedAvg (McMahan et al. 2018) with adaptive clipping
  (Andrew et al. 2021), Poisson or fixed-size client sampling, an accountant and a budget.
- ``LocalDP``: a client stage that clips and noises each update on the client.
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
from fedmosaic.privacy.dp_fedavg import ClippedSumAggregator, DPFedAvg
from fedmosaic.privacy.local_dp import LocalDP, laplace_mechanism

__all__ = [
    "ClippedSumAggregator",
    "DPFedAvg",
    "LocalDP",
    "PrivacyAccountant",
    "PrivacyBudget",
    "calibrate_noise_multiplier",
    "epsilon_for",
    "laplace_mechanism",
]
