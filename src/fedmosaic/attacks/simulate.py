"""Attacks by name, and ``simulate_attack``: a whole attacked run in one call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedmosaic.algorithms.strategy import FedAvg
from fedmosaic.attacks.backdoor import Backdoor
from fedmosaic.attacks.base import Attack
from fedmosaic.attacks.data_poisoning import LabelFlip, poison_federation
from fedmosaic.attacks.model_poisoning import ALIE, IPM, GaussianNoise, SignFlip
from fedmosaic.attacks.monitor import AttackMonitor
from fedmosaic.attacks.selection import choose_malicious
from fedmosaic.attacks.transport import AdversarialTransport
from fedmosaic.core.errors import ConfigError
from fedmosaic.data.dataset import FederatedDataset
from fedmosaic.runtime.result import RunResult
from fedmosaic.runtime.simulate import simulate
from fedmosaic.runtime.transport import SequentialTransport, Transport
from fedmosaic.train.base import Trainer

ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls for cls in (LabelFlip, SignFlip, GaussianNoise, Backdoor, ALIE, IPM)
}


def make_attack(name: str, **params: Any) -> Attack:
    """The attack called ``name`` (a key of ``ATTACKS``) with its parameters."""
    if name not in ATTACKS:
        raise ConfigError("attack", name, sorted(ATTACKS))
    cls = ATTACKS[name]
    allowed = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    for key in sorted(set(params) - allowed):
        raise ConfigError(key, params[key], f"a parameter of attack '{name}': "
                                            + (", ".join(sorted(allowed)) or "none"))
    return cls(**params)


def simulate_attack(
    trainer: Trainer,
    federated_data: FederatedDataset,
    strategy: FedAvg,
    rounds: int,
    *,
    attack: Attack | str,
    fraction: float = 0.2,
    seed: int = 0,
    attack_seed: int | None = None,
    make_transport: Callable[[FederatedDataset], Transport] | None = None,
    **simulate_kwargs: Any,
) -> RunResult:
    """``fedmosaic.simulate`` with a ``fraction`` of the clients running ``attack``
    (an :class:`Attack` or a name from ``ATTACKS`` with default parameters).

    The malicious clients are ``choose_malicious(ids, fraction, attack_seed)`` (by default
    ``attack_seed = seed``). ``make_transport`` builds the inner transport from the
    (poisoned) federation, e.g. ``lambda fed: BatchedTransport(trainer, fed)``; by default a
    ``SequentialTransport``. Every round's record carries
    ``attack_malicious_updates`` (and ``backdoor_success_rate`` for a backdoor), and
    ``result.guarantees["simulated_attack"]`` describes the attack: an attacked run's figures
    cannot be mistaken for a clean run's. The strategy is returned to its former server
    stages afterwards.
    """
    if isinstance(attack, str):
        attack = make_attack(attack)
    malicious = choose_malicious(federated_data.client_ids, fraction,
                                 seed if attack_seed is None else attack_seed)
    poisoned = poison_federation(federated_data, attack, malicious,
                                 seed if attack_seed is None else attack_seed)
    inner = make_transport(poisoned) if make_transport is not None else \
        SequentialTransport(trainer, poisoned)
    adversarial = AdversarialTransport(inner, attack, malicious)
    monitor = AttackMonitor(adversarial, trainer, federated_data.test)
    stages = strategy.server_stages
    strategy.server_stages = (*stages, monitor)
    try:
        return simulate(trainer, poisoned, strategy, rounds, seed=seed, transport=adversarial,
                        **simulate_kwargs)
    finally:
        strategy.server_stages = stages
