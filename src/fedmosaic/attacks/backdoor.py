"""The model-replacement backdoor (Bagdasaryan et al. 2020, "How To Backdoor Federated
Learning"): train on triggered samples labelled with the target class, then scale the update
so that it replaces the global model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedmosaic.attacks.base import (
    Attack,
    RoundView,
    check_label,
    check_label_in_range,
    check_positive,
)
from fedmosaic.core.errors import ConfigError
from fedmosaic.data.dataset import ArrayDataset


def trigger_indices(feature_shape: tuple[int, ...], size: int) -> np.ndarray:
    """Flat feature indices of a ``size x size`` patch in the image's bottom-right corner.

    The image is the last two axes of ``feature_shape`` (every channel gets the patch); a
    flat feature vector whose length is a perfect square (digits: 64 = 8 x 8, MNIST-like:
    784 = 28 x 28) is read as a square row-major image; any other flat vector gets its last
    ``size * size`` features.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError("trigger_size", size, "an integer >= 1")
    numel = math.prod(feature_shape)
    if len(feature_shape) == 1:
        side = math.isqrt(feature_shape[0])
        shape = (side, side) if side * side == feature_shape[0] else None
    else:
        shape = feature_shape
    if shape is None:
        if size * size > numel:
            raise ConfigError("trigger_size", size, f"at most {math.isqrt(numel)} for "
                                                    f"{numel} features")
        return np.arange(numel - size * size, numel)
    h, w = shape[-2], shape[-1]
    if size > min(h, w):
        raise ConfigError("trigger_size", size, f"at most {min(h, w)} for {h}x{w} images")
    mask = np.zeros(shape, dtype=bool)
    mask[..., h - size:, w - size:] = True
    return np.flatnonzero(mask)


@dataclass(frozen=True)
class Backdoor(Attack):
    """Scaled model-replacement backdoor (Bagdasaryan et al. 2020).

    Data: a malicious client stamps a ``trigger_size x trigger_size`` patch of value
    ``trigger_value`` on a ``poison_fraction`` of its training samples (chosen with its seed)
    and relabels them ``target``, keeping the rest clean so the main task still trains.

    Update: it uploads ``gamma * delta`` (the paper's ``X = gamma (L - G) + G``). The paper
    takes ``gamma = n / eta`` for a single attacker among ``n`` averaged clients with server
    learning rate ``eta``: the server then applies ``eta / n * gamma * delta = delta``, so the
    global model becomes the backdoored local model. With ``m`` colluding attackers in a
    round each scaling by ``n / eta`` would apply the replacement ``m`` times and overshoot,
    so by default (``gamma=None``) each uses ``gamma = n / (eta * m)``, which is the paper's
    ``n / eta`` when ``m = 1`` and replaces the model exactly once for any ``m`` (assuming,
    as the paper does, roughly equal aggregation weights). A fixed ``gamma`` overrides this.
    ``server_lr`` is ``eta`` (1 for FedAvg). The paper's constrain-and-scale variant (a loss
    term that evades anomaly detection) is not simulated.
    """

    target: int = 0
    poison_fraction: float = 0.5
    trigger_size: int = 2
    trigger_value: float = 1.0
    gamma: float | None = None
    server_lr: float = 1.0

    name = "backdoor"
    poisons_data = True
    poisons_updates = True

    def __post_init__(self) -> None:
        check_label("target", self.target)
        pf = self.poison_fraction
        if isinstance(pf, bool) or not isinstance(pf, (int, float)) or not 0 < pf <= 1:
            raise ConfigError("poison_fraction", pf, "a number in (0, 1]")
        if isinstance(self.trigger_size, bool) or not isinstance(self.trigger_size, int):
            raise ConfigError("trigger_size", self.trigger_size, "an integer >= 1")
        check_positive("trigger_size", self.trigger_size)
        tv = self.trigger_value
        if isinstance(tv, bool) or not isinstance(tv, (int, float)) or not math.isfinite(tv):
            raise ConfigError("trigger_value", tv, "a finite number")
        if self.gamma is not None:
            check_positive("gamma", self.gamma)
        check_positive("server_lr", self.server_lr)

    def apply_trigger(self, x: np.ndarray) -> np.ndarray:
        """A copy of the samples ``x`` (shape ``(n, *features)``) with the trigger stamped."""
        out = np.array(x, dtype=np.float32, copy=True)
        flat = out.reshape(len(out), -1)
        flat[:, trigger_indices(tuple(out.shape[1:]), self.trigger_size)] = self.trigger_value
        return out

    def poison_data(self, train: ArrayDataset, num_classes: int,
                    rng: np.random.Generator) -> ArrayDataset:
        check_label_in_range("target", self.target, num_classes)
        k = max(1, round(self.poison_fraction * len(train)))
        idx = np.sort(rng.choice(len(train), size=k, replace=False))
        x, y = np.array(train.x, copy=True), train.y.copy()
        x[idx] = self.apply_trigger(train.x[idx])
        y[idx] = self.target
        return ArrayDataset(x, y)

    def triggered_test_set(self, test: ArrayDataset) -> ArrayDataset:
        """The test samples not of the target class, triggered and labelled ``target``: the
        model's accuracy on it is the attack success rate."""
        keep = test.y != self.target
        if not keep.any():
            raise ConfigError("target", self.target, "a class that leaves some test samples "
                                                     "of other classes to trigger")
        x = self.apply_trigger(test.x[keep])
        return ArrayDataset(x, np.full(len(x), self.target, dtype=np.int64))

    def gamma_for(self, n: int, m: int) -> float:
        """The scale factor in a round with ``n`` selected clients, ``m`` of them malicious."""
        if self.gamma is not None:
            return float(self.gamma)
        return n / (self.server_lr * max(m, 1))

    def craft_update(self, delta: torch.Tensor, view: RoundView) -> torch.Tensor:
        return delta * self.gamma_for(view.n, view.m)
