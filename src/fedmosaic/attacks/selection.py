"""Which clients are malicious in a simulated attack: a seeded, reproducible choice."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedmosaic.core.errors import ConfigError


def malicious_count(num_clients: int, fraction: float) -> int:
    """``round(fraction * num_clients)``, halves rounded up (0.2 of 50 clients is 10)."""
    # The small tolerance keeps products such as 0.29 * 100 = 28.999999999999996 at 29.
    return math.floor(fraction * num_clients + 0.5 + 1e-9)


def choose_malicious(client_ids: Sequence[str], fraction: float, seed: int) -> frozenset[str]:
    """A seeded uniform choice of ``malicious_count(len(client_ids), fraction)`` clients.

    The ids are sorted first, so the choice depends on the set of clients and the seed only,
    not on their order. ``fraction = 0`` marks nobody (a clean baseline); a positive
    fraction that rounds to zero clients is an error rather than a silently clean run.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or \
            not 0 <= fraction <= 1:
        raise ConfigError("fraction", fraction, "a number in [0, 1]")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError("seed", seed, "an integer >= 0")
    ids = sorted(str(c) for c in client_ids)
    if len(set(ids)) != len(ids):
        raise ConfigError("client_ids", "<duplicates>", "distinct client ids")
    count = malicious_count(len(ids), fraction)
    if fraction > 0 and count == 0:
        raise ConfigError("fraction", fraction,
                          f"a fraction that marks at least one of the {len(ids)} clients "
                          f"(>= {0.5 / max(len(ids), 1):.3g})")
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(ids), size=count, replace=False) if count else []
    return frozenset(ids[int(i)] for i in picked)
