"""Which clients take part in a round, and how much local work each one manages.

Uniform client sampling follows FedAvg (McMahan et al., 2017, "Communication-Efficient
Learning of Deep Networks from Decentralized Data"); straggler simulation follows the
systems-heterogeneity setup of FedProx (Li et al., 2020, "Federated Optimization in
Heterogeneous Networks", MLSys).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedmosaic.core.errors import RoundFailedError

__all__ = ["ClientSampler", "StragglerSimulation"]

# Products such as 0.1 * 30 come out as 3.0000000000000004; rounding to this many
# decimals first keeps ceil/round from jumping to the next integer.
_DECIMALS = 9


def _unique_sorted(ids: Sequence[str], what: str) -> list[str]:
    ordered = sorted(ids)
    if len(set(ordered)) != len(ordered):
        raise ValueError(f"{what} contains duplicate client ids")
    return ordered


class ClientSampler:
    """Uniform sampling of clients without replacement (McMahan et al., 2017).

    Give exactly one of ``clients_per_round`` (a count) or ``fraction`` (in (0, 1]; the
    round takes ``ceil(fraction * n)`` of the ``n`` available clients, at least one).
    When ``clients_per_round`` exceeds the number available, every available client is
    taken. Fewer than ``min_available`` available clients fails the round.

    The result is sorted by client id, and the available ids are sorted before sampling,
    so the same generator state and the same set of clients always give the same round,
    whatever order the caller lists them in.
    """

    def __init__(
        self,
        clients_per_round: int | None = None,
        fraction: float | None = None,
        min_available: int = 1,
    ) -> None:
        if (clients_per_round is None) == (fraction is None):
            raise ValueError("give exactly one of clients_per_round or fraction")
        if clients_per_round is not None and (
            isinstance(clients_per_round, bool)
            or not isinstance(clients_per_round, int)
            or clients_per_round < 1
        ):
            raise ValueError(
                f"clients_per_round must be an integer >= 1, got {clients_per_round!r}"
            )
        if fraction is not None and not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        if (
            isinstance(min_available, bool)
            or not isinstance(min_available, int)
            or min_available < 1
        ):
            raise ValueError(f"min_available must be an integer >= 1, got {min_available!r}")
        self.clients_per_round = clients_per_round
        self.fraction = None if fraction is None else float(fraction)
        self.min_available = min_available

    def sample_size(self, num_available: int) -> int:
        """How many clients a round takes when ``num_available`` are available."""
        if self.clients_per_round is not None:
            return min(self.clients_per_round, num_available)
        assert self.fraction is not None
        wanted = math.ceil(round(self.fraction * num_available, _DECIMALS))
        return min(max(1, wanted), num_available)

    def sample(self, available: Sequence[str], rng: np.random.Generator) -> list[str]:
        """Clients for this round, sorted by id; ``RoundFailedError`` if too few are available."""
        ids = _unique_sorted(available, "available")
        if len(ids) < self.min_available:
            raise RoundFailedError(
                f"only {len(ids)} clients available, at least {self.min_available} required"
            )
        k = self.sample_size(len(ids))
        picked = rng.choice(len(ids), size=k, replace=False)
        return [ids[i] for i in np.sort(picked)]


class StragglerSimulation:
    """Systems heterogeneity as simulated in FedProx (Li et al., 2020, "Federated
    Optimization in Heterogeneous Networks", MLSys).

    Of the selected clients, ``round(fraction * n)`` chosen at random are stragglers.
    The paper has each straggler run a number of epochs drawn uniformly from [1, E]; here
    the draw is at step granularity, uniform in [1, full_steps] of that client. With
    ``drop=True`` stragglers are dropped instead (``None``), which is how the paper runs
    FedAvg. Everyone else does its full number of steps.
    """

    def __init__(self, fraction: float = 0.0, drop: bool = False) -> None:
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
        self.fraction = float(fraction)
        self.drop = bool(drop)

    def num_stragglers(self, num_clients: int) -> int:
        """``fraction * num_clients`` rounded half up."""
        return math.floor(round(self.fraction * num_clients, _DECIMALS) + 0.5)

    def assign(
        self,
        client_ids: Sequence[str],
        full_steps: Mapping[str, int],
        rng: np.random.Generator,
    ) -> dict[str, int | None]:
        """Local steps per client (``None``: dropped), in the order of ``client_ids``.

        Ids are sorted before stragglers are drawn so the draw does not depend on the
        caller's ordering.
        """
        ids = _unique_sorted(client_ids, "client_ids")
        missing = [c for c in ids if c not in full_steps]
        if missing:
            raise ValueError(f"full_steps lacks clients {missing[:5]}")
        full = np.array([full_steps[c] for c in ids], dtype=np.int64)
        if (full < 1).any():
            bad = [c for c, s in zip(ids, full, strict=True) if s < 1]
            raise ValueError(f"full_steps must be >= 1, got {bad[:5]} below 1")
        steps = full.copy()
        dropped = np.zeros(len(ids), dtype=bool)
        n_slow = self.num_stragglers(len(ids))
        if n_slow > 0:
            slow = rng.choice(len(ids), size=n_slow, replace=False)
            if self.drop:
                dropped[slow] = True
            else:
                steps[slow] = rng.integers(1, full[slow] + 1)
        by_id: dict[str, int | None] = {
            c: None if d else int(s) for c, s, d in zip(ids, steps, dropped, strict=True)
        }
        return {c: by_id[c] for c in client_ids}
