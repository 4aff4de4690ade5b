"""Ownership check: does a suspect model carry the owner's watermark?

The owner regenerates the trigger set from the key and counts how many triggers the suspect
model assigns their labels. The question is whether that count could come from a model that
never saw the triggers. Such a model's prediction on a trigger carries no information about a
label drawn uniformly from ``K`` classes, so each agreement is a coin with probability ``1/K``
and the count of ``n`` triggers is at most as large as Binomial(n, 1/K) (WAFFLE, Tekgul et al.
2021, sets its verification threshold with this argument):

- ``p_value``: P[Binomial(n, 1/K) >= observed count], the probability that an unmarked model
  agrees at least this much by chance (small means the watermark is there);
- ``false_claim_probability``: P[Binomial(n, 1/K) >= ceil(threshold * n)], the probability
  that the test, at its threshold, claims a model that is not the owner's (its false-positive
  rate).

The noisy copies of one pattern are not independent trials (an unmarked model tends to map
them all to the same class), so the verdict also reports a conservative per-pattern test: a
pattern counts as matched when most of its copies get its label, and ``pattern_p_value`` is
P[Binomial(patterns, 1/K) >= matched]. Exact integer arithmetic: no floating-point
underflow in the far tail.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmosaic.core.errors import ConfigError, SpecMismatchError
from fedmosaic.data import ArrayDataset
from fedmosaic.train.base import Trainer
from fedmosaic.watermark.keys import WatermarkKey
from fedmosaic.watermark.triggers import TriggerSpec, waffle_pattern_triggers

DEFAULT_THRESHOLD = 0.5


def chance_tail(n: int, k: int, num_classes: int) -> float:
    """P[Binomial(n, 1/num_classes) >= k], computed exactly."""
    if n < 0 or num_classes < 2:
        raise ValueError(f"need n >= 0 and num_classes >= 2, got n={n}, {num_classes}")
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    # sum_j C(n, j) (K-1)^(n-j) / K^n, in integers.
    num = sum(math.comb(n, j) * (num_classes - 1) ** (n - j) for j in range(k, n + 1))
    return float(Fraction(num, num_classes**n))


@dataclass(frozen=True)
class WatermarkVerdict:
    """The outcome of an ownership check (see the module docstring for the statistics)."""

    owned: bool
    accuracy: float
    threshold: float
    correct: int
    num_triggers: int
    num_classes: int
    p_value: float
    false_claim_probability: float
    patterns_matched: int
    num_patterns: int
    pattern_p_value: float
    key_fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        decision = "watermark present" if self.owned else "no watermark"
        return (f"{decision}: watermark accuracy {self.accuracy:.3f} ({self.correct}/"
                f"{self.num_triggers}) vs threshold {self.threshold:.2f}; chance-level "
                f"agreement 1/{self.num_classes}: p-value {self.p_value:.3g}, false-claim "
                f"probability of the test {self.false_claim_probability:.3g}; patterns "
                f"matched {self.patterns_matched}/{self.num_patterns} "
                f"(p {self.pattern_p_value:.3g}); key {self.key_fingerprint}")


def predict_labels(
    model: nn.Module | torch.Tensor, data: ArrayDataset, trainer: Trainer | None = None,
) -> np.ndarray:
    """Predicted classes of ``model`` (a module, or a flat weight vector with the ``trainer``
    that knows its architecture) on ``data``."""
    if isinstance(model, nn.Module):
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                param = next(iter(model.parameters()), None)
                device = param.device if param is not None else torch.device("cpu")
                out = model(torch.as_tensor(data.x, device=device))
        finally:
            model.train(was_training)
    elif isinstance(model, torch.Tensor):
        predict = getattr(trainer, "predict", None)
        if predict is None:
            raise ConfigError("trainer", type(trainer).__name__,
                              "a trainer with predict(weights, data) (e.g. TorchTrainer) "
                              "to evaluate a flat weight vector")
        if model.numel() != trainer.spec.numel:  # type: ignore[union-attr]
            raise SpecMismatchError(f"weights have {model.numel()} values, the trainer's "
                                    f"model {trainer.spec.numel}")  # type: ignore[union-attr]
        out = predict(model, data)
    else:
        raise ConfigError("model", type(model).__name__, "a torch.nn.Module or a flat weight "
                          "tensor")
    if out.ndim != 2:
        raise ConfigError("model", tuple(out.shape), "a classifier with outputs (n, classes)")
    return out.argmax(1).cpu().numpy()


def watermark_accuracy(
    model: nn.Module | torch.Tensor, triggers: ArrayDataset, trainer: Trainer | None = None,
) -> float:
    """Fraction of triggers the model assigns their watermark label."""
    return float((predict_labels(model, triggers, trainer) == triggers.y).mean())


def verdict_from_predictions(
    predictions: np.ndarray, triggers: ArrayDataset, *, num_classes: int, spec: TriggerSpec,
    threshold: float, key_fingerprint: str,
) -> WatermarkVerdict:
    """The verdict for given predictions on a trigger set generated with ``spec``."""
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or \
            not 0 < threshold <= 1:
        raise ConfigError("watermark.threshold", threshold, "a number in (0, 1]")
    n = len(triggers)
    hits = predictions == triggers.y
    correct = int(hits.sum())
    per_pattern = hits.reshape(-1, spec.samples_per_pattern).mean(1)
    matched = int((per_pattern > 0.5).sum())
    accuracy = correct / n
    return WatermarkVerdict(
        owned=accuracy >= threshold, accuracy=accuracy, threshold=float(threshold),
        correct=correct, num_triggers=n, num_classes=num_classes,
        p_value=chance_tail(n, correct, num_classes),
        false_claim_probability=chance_tail(n, math.ceil(threshold * n - 1e-9), num_classes),
        patterns_matched=matched, num_patterns=len(per_pattern),
        pattern_p_value=chance_tail(len(per_pattern), matched, num_classes),
        key_fingerprint=key_fingerprint)


def verify_watermark(
    model: nn.Module | torch.Tensor,
    key: WatermarkKey,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    spec: TriggerSpec | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    trainer: Trainer | None = None,
) -> WatermarkVerdict:
    """Check a suspect ``model`` (module, or flat weights plus ``trainer``) for the watermark
    of ``key``; ``spec`` must be the trigger settings used when embedding."""
    spec = spec or TriggerSpec()
    triggers = waffle_pattern_triggers(key, input_shape, num_classes, spec)
    predictions = predict_labels(model, triggers, trainer)
    return verdict_from_predictions(predictions, triggers, num_classes=num_classes, spec=spec,
                                    threshold=threshold, key_fingerprint=key.fingerprint)
