"""``AttackMonitor``: writes what a simulated attack did into every round's record."""

from __future__ import annotations

from typing import Any

import torch

from fedmosaic.attacks.backdoor import Backdoor
from fedmosaic.attacks.transport import AdversarialTransport
from fedmosaic.data.dataset import ArrayDataset
from fedmosaic.train.base import Trainer


class AttackMonitor:
    """A server stage that leaves the model unchanged and records, each round,
    ``attack_malicious_updates`` (malicious clients whose results reached the server) and,
    for a :class:`Backdoor` with a test set, ``backdoor_success_rate``: the global model's
    accuracy on the triggered test samples of other classes, relabelled to the target (the
    attack success rate of Bagdasaryan et al. 2020).

    Its presence in a history marks the run as attacked, so nobody mistakes its figures.
    """

    def __init__(self, transport: AdversarialTransport, trainer: Trainer,
                 test: ArrayDataset | None = None) -> None:
        self.transport, self.trainer = transport, trainer
        attack = transport.attack
        self.triggered = attack.triggered_test_set(test) \
            if isinstance(attack, Backdoor) and test is not None else None

    def apply(self, round_num: int, weights: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        metrics: dict[str, Any] = {
            "attack_malicious_updates": self.transport.reported(round_num)}
        if self.triggered is not None:
            ev = self.trainer.evaluate(weights, self.triggered)
            metrics["backdoor_success_rate"] = ev["accuracy"]
        return weights, metrics

    def __repr__(self) -> str:
        # Part of the strategy's description, hence of the run identity a resume checks:
        # it must not contain addresses or anything else that changes between processes.
        return (f"AttackMonitor({self.transport.attack!r}, "
                f"malicious={len(self.transport.malicious)})")
