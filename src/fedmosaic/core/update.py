"""What a client sends back after local training, and the checks every update must pass."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fedmosaic.core.errors import InvalidUpdateError


@dataclass
class ClientUpdate:
    """One client's contribution to a round.

    ``delta`` is the client's locally trained weights minus the global weights it started
    from (a flat float32 vector); ``weight`` is its aggregation weight (by default its
    number of training samples); ``base_round`` is the round whose global model the client
    trained from, so that asynchronous aggregation can measure staleness.
    """

    client_id: str
    delta: torch.Tensor
    num_samples: int
    base_round: int
    weight: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weight is None:
            self.weight = float(self.num_samples)

    @property
    def nbytes(self) -> int:
        """Raw bytes of the delta on the wire."""
        return self.delta.numel() * self.delta.element_size()


def finite_rows(m: torch.Tensor) -> torch.Tensor:
    """Whether each row of a 2-D float tensor is all finite, as a bool vector.

    ``amax`` and ``amin`` propagate NaN and show +-inf, so both finite means the row is; two
    reductions cost about a tenth of ``isfinite(m).all(dim=1)``, which first writes a bool
    tensor as large as ``m`` (a cost paid for every update of every round)."""
    return m.amax(dim=1).isfinite() & m.amin(dim=1).isfinite()


def all_finite(v: torch.Tensor) -> bool:
    """Whether every value of a float tensor is finite (NaN and +-inf are not)."""
    if v.numel() == 0:
        return True
    return bool(finite_rows(v.reshape(1, -1))[0])


def validate_update(
    update: object, *, numel: int, current_round: int | None = None
) -> ClientUpdate:
    """Check an update before it touches any server state; raise ``InvalidUpdateError``.

    Never trusts the client: type, length, dtype, finiteness, weight, sample count, metric
    values and the base round are all checked.
    """
    if not isinstance(update, ClientUpdate):
        raise InvalidUpdateError("?", f"expected a ClientUpdate, got {type(update).__name__}")
    cid = str(update.client_id)
    delta = update.delta
    if not isinstance(delta, torch.Tensor):
        raise InvalidUpdateError(cid, f"delta is a {type(delta).__name__}, not a torch.Tensor")
    if delta.dtype != torch.float32:
        raise InvalidUpdateError(cid, f"delta has dtype {delta.dtype}, expected torch.float32")
    if delta.dim() != 1 or delta.numel() != numel:
        raise InvalidUpdateError(
            cid, f"delta has shape {tuple(delta.shape)}, expected ({numel},) for this model"
        )
    if not all_finite(delta):
        bad = int((~torch.isfinite(delta)).sum())
        raise InvalidUpdateError(cid, f"delta has {bad} non-finite values (NaN or inf)")
    if isinstance(update.num_samples, bool) or not isinstance(update.num_samples, int):
        raise InvalidUpdateError(cid, f"num_samples {update.num_samples!r} is not an integer")
    if update.num_samples <= 0:
        raise InvalidUpdateError(cid, f"num_samples is {update.num_samples}, must be > 0")
    w = update.weight
    if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w <= 0:
        raise InvalidUpdateError(cid, f"weight is {w!r}, must be a finite number > 0")
    if current_round is not None and update.base_round > current_round:
        raise InvalidUpdateError(
            cid, f"base_round {update.base_round} is ahead of the server's round {current_round}"
        )
    for key, value in update.metrics.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise InvalidUpdateError(cid, f"metric '{key}' is {value!r}, not a number")
        if not math.isfinite(value):
            raise InvalidUpdateError(cid, f"metric '{key}' is {value}, not finite")
    return update
