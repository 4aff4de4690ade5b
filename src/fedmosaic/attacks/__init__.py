"""Simulated attacks, for evaluating defences only (issue #6).

Nothing here runs in a normal federated run: an attack is simulated only when a user asks
for it (``simulate_attack``, or an ``[attack]`` table in an experiment file), and such a run
says so in its history and report.

- Data poisoning (the malicious clients train on altered data): :class:`LabelFlip`, and the
  training half of :class:`Backdoor`; applied by :func:`poison_federation`.
- Model poisoning (the malicious clients upload a crafted update): :class:`SignFlip`,
  :class:`GaussianNoise`, the scaling half of :class:`Backdoor`, and the omniscient
  :class:`ALIE` and :class:`IPM`; applied by :class:`AdversarialTransport`.
- :func:`choose_malicious` marks a fraction of the clients from a seed;
  :class:`AttackMonitor` records what the attack did each round.
"""

from fedmosaic.attacks.backdoor import Backdoor, trigger_indices
from fedmosaic.attacks.base import Attack, BenignStats, RoundView
from fedmosaic.attacks.data_poisoning import LabelFlip, poison_federation
from fedmosaic.attacks.model_poisoning import ALIE, IPM, GaussianNoise, SignFlip, alie_z_max
from fedmosaic.attacks.monitor import AttackMonitor
from fedmosaic.attacks.selection import choose_malicious, malicious_count
from fedmosaic.attacks.simulate import ATTACKS, make_attack, simulate_attack
from fedmosaic.attacks.transport import AdversarialTransport

__all__ = [
    "ALIE",
    "ATTACKS",
    "IPM",
    "AdversarialTransport",
    "Attack",
    "AttackMonitor",
    "Backdoor",
    "BenignStats",
    "GaussianNoise",
    "LabelFlip",
    "RoundView",
    "SignFlip",
    "alie_z_max",
    "choose_malicious",
    "make_attack",
    "malicious_count",
    "poison_federation",
    "simulate_attack",
    "trigger_indices",
]
