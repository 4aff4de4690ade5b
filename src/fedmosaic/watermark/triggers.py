"""WAFFLEPattern trigger sets (Tekgul et al. 2021, "WAFFLE: Watermarking in Federated
Learning", SRDS): class-specific random patterns plus noise, each labelled with its class.

The server needs no client data to build them, and they lie far from the training
distribution, so a model that never saw them agrees with their labels only by chance. Here
each pattern is a random subset of input positions (``density`` of them) set to random
intensities in ``[low, high]``, on a ``low`` background; each trigger is its pattern plus
Gaussian noise of standard deviation ``noise * (high - low)``, clipped to the input range.
Pattern ``j`` of class ``c`` is labelled ``c``, so the labels are class-balanced. For image
inputs ``(C, H, W)`` the pattern's positions are shared by the channels, as a shape would be.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedmosaic.core.errors import ConfigError
from fedmosaic.data import ArrayDataset
from fedmosaic.watermark.keys import WatermarkKey

_PURPOSE = "waffle-pattern-triggers"


def _check(key: str, value: Any, ok: bool, allowed: str) -> None:
    if isinstance(value, bool) or not ok:
        raise ConfigError(f"watermark.{key}", value, allowed)


@dataclass(frozen=True)
class TriggerSpec:
    """How a trigger set is generated from a key (must match between embedding and checks)."""

    patterns_per_class: int = 1
    samples_per_pattern: int = 10
    noise: float = 0.1
    density: float = 0.5
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self) -> None:
        for name in ("patterns_per_class", "samples_per_pattern"):
            v = getattr(self, name)
            _check(name, v, isinstance(v, int) and 1 <= v <= 10_000, "an integer in [1, 10000]")
        _check("noise", self.noise, isinstance(self.noise, int | float) and
               0 <= self.noise <= 1, "a number in [0, 1]")
        _check("density", self.density, isinstance(self.density, int | float) and
               0 < self.density <= 1, "a number in (0, 1]")
        finite = all(isinstance(v, int | float) and math.isfinite(v)
                     for v in (self.low, self.high))
        _check("high", self.high, finite and self.high > self.low,
               f"a finite number > watermark.low ({self.low})")

    def size(self, num_classes: int) -> int:
        return num_classes * self.patterns_per_class * self.samples_per_pattern

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def waffle_pattern_triggers(
    key: WatermarkKey, input_shape: Sequence[int], num_classes: int,
    spec: TriggerSpec | None = None,
) -> ArrayDataset:
    """The trigger set of ``key`` for inputs of ``input_shape`` and ``num_classes`` classes.

    A pure function of its arguments: the same key always gives the same triggers (so a
    resumed run or a later ownership check regenerates them), another key other ones.
    Triggers are ordered pattern by pattern (``samples_per_pattern`` consecutive rows each).
    """
    spec = spec or TriggerSpec()
    if not isinstance(key, WatermarkKey):
        raise ConfigError("watermark.key", type(key).__name__, "a WatermarkKey")
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise ConfigError("input_shape", input_shape, "a non-empty shape of positive sizes")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError("num_classes", num_classes, "an integer >= 2")
    rng = np.random.default_rng(key.seed(_PURPOSE))
    # Positions a pattern may occupy: the spatial grid for images (C, H, W), else every input.
    grid = shape[1:] if len(shape) == 3 else shape
    channels = shape[0] if len(shape) == 3 else 1
    num_patterns = num_classes * spec.patterns_per_class
    span = spec.high - spec.low
    xs, ys = [], []
    for p in range(num_patterns):
        mask = rng.random(grid) < spec.density
        values = rng.uniform(spec.low, spec.high, size=(channels, *grid))
        pattern = np.where(mask, values, spec.low).reshape(shape)
        noise = rng.normal(0.0, spec.noise * span, size=(spec.samples_per_pattern, *shape))
        xs.append(np.clip(pattern + noise, spec.low, spec.high))
        ys.append(np.full(spec.samples_per_pattern, p // spec.patterns_per_class))
    return ArrayDataset(np.concatenate(xs).astype(np.float32),
                        np.concatenate(ys).astype(np.int64))
