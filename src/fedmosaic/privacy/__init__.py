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

from importlib import import_module
from typing import Any

# Loaded on first use (PEP 562): a client process imports ``privacy.randomness`` for its noise
# and must not pay for dp-accounting and scipy (about 1.5 s) that only the server needs.
_EXPORTS = {
    "PrivacyAccountant": "accountant", "PrivacyBudget": "accountant",
    "calibrate_noise_multiplier": "accountant", "epsilon_for": "accountant",
    "DistributedSkellam": "distributed_skellam",
    "ClippedSumAggregator": "dp_fedavg", "DPFedAvg": "dp_fedavg",
    "LocalDP": "local_dp", "laplace_mechanism": "local_dp",
    "NoiseSource": "randomness", "SecureNoise": "randomness", "SeededNoise": "randomness",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedmosaic.privacy' has no attribute {name!r}")
    return getattr(import_module(f"fedmosaic.privacy.{module}"), name)


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
