"""WAFFLE (Tekgul et al. 2021, "WAFFLE: Watermarking in Federated Learning", SRDS): the
server re-trains the global model on its secret trigger set after every aggregation.

Clients' local training erodes the watermark a little each round; the retraining step puts it
back before the model is sent out again, so every model a client ever receives is
watermarked. Retraining runs whole epochs of plain SGD over the trigger set until the
watermark accuracy reaches ``target_accuracy`` or ``max_epochs`` have run (the paper's stopping
rule). It needs no client data. The paper also pre-trains the initial model on the triggers;
here the first round's retraining does the same job (it runs until the target is reached),
and :meth:`WaffleStage.embed` can watermark initial weights directly.

What survives a checkpoint and resume: the stage keeps no state between rounds. The trigger
set and the retraining shuffles are pure functions of the key, the round and the epoch, so a
resumed run regenerates them and ends with the same model as an uninterrupted one. Only the
key's fingerprint appears in the run's identity and records; the key itself is never written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedmosaic.core.errors import ConfigError, SpecMismatchError
from fedmosaic.train.base import FitConfig
from fedmosaic.train.torch_trainer import TorchTrainer
from fedmosaic.watermark.keys import WatermarkKey
from fedmosaic.watermark.triggers import TriggerSpec, waffle_pattern_triggers
from fedmosaic.watermark.verify import watermark_accuracy

_RETRAIN_PURPOSE = "waffle-retraining-shuffle"


class WaffleStage:
    """A ``ServerStage`` that embeds the key's WAFFLEPattern watermark after every round.

    ``trainer`` is a server-side ``TorchTrainer`` of the global model's architecture (its own
    instance: retraining must not touch a DP trainer's accounting or a client's state).
    Records per round: ``watermark_accuracy_before`` (after aggregation),
    ``watermark_accuracy`` (after retraining), ``watermark_epochs`` and ``watermark_steps``.
    """

    def __init__(
        self,
        trainer: TorchTrainer,
        key: WatermarkKey,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        spec: TriggerSpec | None = None,
        target_accuracy: float = 0.98,
        max_epochs: int = 100,
        lr: float = 0.05,
        batch_size: int = 50,
    ) -> None:
        if not isinstance(key, WatermarkKey):
            raise ConfigError("watermark.key", type(key).__name__, "a WatermarkKey")
        for name, value, ok, allowed in (
            ("target_accuracy", target_accuracy, isinstance(target_accuracy, int | float)
             and 0 < target_accuracy <= 1, "a number in (0, 1]"),
            ("max_epochs", max_epochs, isinstance(max_epochs, int) and 1 <= max_epochs <= 10_000,
             "an integer in [1, 10000]"),
            ("lr", lr, isinstance(lr, int | float) and lr > 0, "a number > 0"),
            ("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1,
             "an integer >= 1"),
        ):
            if isinstance(value, bool) or not ok:
                raise ConfigError(f"watermark.{name}", value, allowed)
        for attr in ("fit", "predict", "spec"):
            if not hasattr(trainer, attr):
                raise ConfigError("trainer", type(trainer).__name__,
                                  "a TorchTrainer-like trainer (fit, predict, spec)")
        self.trainer, self.key = trainer, key
        self.spec = spec or TriggerSpec()
        self.num_classes = num_classes
        self.triggers = waffle_pattern_triggers(key, input_shape, num_classes, self.spec)
        self.target_accuracy, self.max_epochs = float(target_accuracy), max_epochs
        self.lr, self.batch_size = float(lr), batch_size
        self._seed = key.seed(_RETRAIN_PURPOSE)

    def _epoch_seed(self, round_num: int, epoch: int) -> int:
        return int(np.random.SeedSequence([self._seed, round_num, epoch]).generate_state(1)[0])

    def embed(self, weights: torch.Tensor, round_num: int = 0) -> tuple[torch.Tensor,
                                                                           dict[str, Any]]:
        """Re-train ``weights`` on the triggers until the target or the epoch cap."""
        if not isinstance(weights, torch.Tensor) or weights.ndim != 1:
            raise SpecMismatchError("WAFFLE needs the flat global weight vector")
        if weights.numel() != self.trainer.spec.numel:
            raise SpecMismatchError(f"global weights have {weights.numel()} values, the "
                                    f"watermark trainer's model {self.trainer.spec.numel}")
        current = weights
        before = acc = watermark_accuracy(current, self.triggers, self.trainer)
        epochs = steps = 0
        while acc < self.target_accuracy and epochs < self.max_epochs:
            cfg = FitConfig(round=round_num, epochs=1, batch_size=self.batch_size, lr=self.lr,
                            seed=self._epoch_seed(round_num, epochs))
            result = self.trainer.fit(current, self.triggers, cfg)
            current = result.weights
            epochs, steps = epochs + 1, steps + result.steps
            acc = watermark_accuracy(current, self.triggers, self.trainer)
        out = current.to(device=weights.device, dtype=weights.dtype)
        return out, {"watermark_accuracy_before": before, "watermark_accuracy": acc,
                     "watermark_epochs": epochs, "watermark_steps": steps}

    def apply(self, round_num: int, weights: torch.Tensor) -> tuple[torch.Tensor,
                                                                      dict[str, Any]]:
        """The ``ServerStage`` hook: watermark the new global model of ``round_num``."""
        return self.embed(weights, round_num)

    def describe(self) -> dict[str, Any]:
        """Settings for the run's identity and report: the key's fingerprint, never the key."""
        return {"watermark": "WAFFLE (Tekgul et al. 2021), WAFFLEPattern triggers",
                "key_fingerprint": self.key.fingerprint, "triggers": len(self.triggers),
                **self.spec.to_dict(), "target_accuracy": self.target_accuracy,
                "max_epochs": self.max_epochs, "lr": self.lr, "batch_size": self.batch_size}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.describe().items() if k != "watermark")
        return f"WaffleStage({fields})"
