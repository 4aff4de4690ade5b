"""Staleness functions: how much an update computed from an old model still counts.

In asynchronous federated learning an update trained from model version ``tau`` reaches a
server that is at version ``t >= tau``; its *staleness* is ``t - tau``. A staleness function
``s`` maps it to a weight in ``(0, 1]`` that damps stale updates:

- ``ConstantStaleness``: ``s = 1`` (no damping).
- ``PolynomialStaleness(a)``: ``s = (staleness + 1) ** -a``;
- ``HingeStaleness(a, b)``: ``s = 1`` up to ``b``, then ``1 / (a * (staleness - b) + 1)``;
  both from Xie et al. 2019, "Asynchronous Federated Optimization", arXiv:1903.03934, Sec. 5.
- ``InverseSqrtStaleness``: ``s = 1 / sqrt(1 + staleness)``, FedBuff's choice (Nguyen et al.
  2022, "Federated Learning with Buffered Asynchronous Aggregation", AISTATS).

Every function checks its parameters at construction and its input on each call (an ``int``
``>= 0``; ``bool`` is refused), returns a Python float, and describes itself as a JSON-able
dict (``describe()``), which goes into the run identity. ``make_staleness(name, **params)``
builds one by name, so ``make_staleness(**f.describe())`` rebuilds ``f``.

Values are mathematically in ``(0, 1]``; with extreme parameters (say polynomial ``a = 100``
at staleness ``10**6``) the float result underflows to ``0.0``, which consumers (the FedBuff
buffer) treat as an update that cannot count and refuse.
"""

from __future__ import annotations

import inspect
import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from fedmosaic.core.errors import ConfigError, InvalidUpdateError
from fedmosaic.core.update import ClientUpdate

__all__ = [
    "ConstantStaleness",
    "HingeStaleness",
    "InverseSqrtStaleness",
    "PolynomialStaleness",
    "StalenessFunction",
    "check_staleness",
    "make_staleness",
    "staleness_of",
]


def check_staleness(staleness: object) -> int:
    """``staleness`` as an ``int``, or a ``ValueError``: it must be an integer ``>= 0``."""
    # numbers.Integral admits numpy integers; bool is an int subclass but never a staleness.
    if isinstance(staleness, bool) or not isinstance(staleness, numbers.Integral):
        raise ValueError(
            f"staleness must be an integer >= 0, got {staleness!r} "
            f"({type(staleness).__name__})")
    value = int(staleness)
    if value < 0:
        raise ValueError(f"staleness must be an integer >= 0, got {value}")
    return value


def staleness_of(update: ClientUpdate, current_version: int) -> int:
    """The staleness of ``update`` at server version ``current_version``: the number of
    server steps applied since the model it trained from (``update.base_round``).

    A base version ahead of the server, or negative, is the client's error and raises
    ``InvalidUpdateError`` naming it (the server rejects the update and goes on).
    """
    current = check_staleness(current_version)  # same rule: an integer >= 0
    base = update.base_round
    cid = str(update.client_id)
    if isinstance(base, bool) or not isinstance(base, numbers.Integral):
        raise InvalidUpdateError(cid, f"base_round {base!r} is not an integer")
    if base < 0:
        raise InvalidUpdateError(cid, f"base_round {base} is negative")
    if base > current:
        raise InvalidUpdateError(
            cid, f"base_round {base} is ahead of the server's version {current}")
    return current - int(base)


def _check_nonnegative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def _check_positive(name: str, value: object) -> float:
    v = _check_nonnegative(name, value)
    if v == 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


class StalenessFunction(ABC):
    """Maps a staleness (an integer ``>= 0``) to a weight in ``(0, 1]``, non-increasing."""

    name: str = ""

    def __call__(self, staleness: int) -> float:
        return self._weight(check_staleness(staleness))

    @abstractmethod
    def _weight(self, staleness: int) -> float:
        """The weight of a validated staleness."""

    @abstractmethod
    def parameters(self) -> dict[str, float]:
        """The parameters, as plain floats."""

    def describe(self) -> dict[str, Any]:
        """Name and parameters (JSON-able): ``make_staleness(**describe())`` rebuilds it."""
        return {"name": self.name, **self.parameters()}


@dataclass(frozen=True)
class ConstantStaleness(StalenessFunction):
    """``s(staleness) = 1``: every update counts fully (Xie et al. 2019, "Asynchronous
    Federated Optimization", arXiv:1903.03934)."""

    name = "constant"

    def _weight(self, staleness: int) -> float:
        return 1.0

    def parameters(self) -> dict[str, float]:
        return {}


@dataclass(frozen=True)
class PolynomialStaleness(StalenessFunction):
    """``s(staleness) = (staleness + 1) ** -a`` (Xie et al. 2019, "Asynchronous Federated
    Optimization", arXiv:1903.03934; there written ``(t - tau + 1) ** -a``). ``a >= 0``;
    ``a = 0`` is the constant function."""

    a: float = 0.5
    name = "polynomial"

    def __post_init__(self) -> None:
        object.__setattr__(self, "a", _check_nonnegative("a", self.a))

    def _weight(self, staleness: int) -> float:
        return float((staleness + 1.0) ** -self.a)

    def parameters(self) -> dict[str, float]:
        return {"a": self.a}


@dataclass(frozen=True)
class HingeStaleness(StalenessFunction):
    """``s(staleness) = 1`` if ``staleness <= b``, else ``1 / (a * (staleness - b) + 1)``
    (Xie et al. 2019, "Asynchronous Federated Optimization", arXiv:1903.03934). ``a > 0``
    is the slope of the decay, ``b >= 0`` the staleness tolerated without damping."""

    a: float = 10.0
    b: float = 4.0
    name = "hinge"

    def __post_init__(self) -> None:
        object.__setattr__(self, "a", _check_positive("a", self.a))
        object.__setattr__(self, "b", _check_nonnegative("b", self.b))

    def _weight(self, staleness: int) -> float:
        if staleness <= self.b:
            return 1.0
        return 1.0 / (self.a * (staleness - self.b) + 1.0)

    def parameters(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b}


@dataclass(frozen=True)
class InverseSqrtStaleness(StalenessFunction):
    """``s(staleness) = 1 / sqrt(1 + staleness)``, FedBuff's staleness scaling (Nguyen et al.
    2022, "Federated Learning with Buffered Asynchronous Aggregation", AISTATS)."""

    name = "inverse_sqrt"

    def _weight(self, staleness: int) -> float:
        return 1.0 / math.sqrt(1.0 + staleness)

    def parameters(self) -> dict[str, float]:
        return {}


_REGISTRY: dict[str, type[StalenessFunction]] = {
    "constant": ConstantStaleness,
    "polynomial": PolynomialStaleness,
    "hinge": HingeStaleness,
    "inverse_sqrt": InverseSqrtStaleness,
}


def make_staleness(name: str, **params: Any) -> StalenessFunction:
    """Build a staleness function by name: ``"constant"``, ``"polynomial"`` (``a``),
    ``"hinge"`` (``a``, ``b``), ``"inverse_sqrt"``.

    An unknown name raises ``ConfigError`` (a ``ValueError``) listing the names; an unknown
    parameter raises ``ValueError`` listing the allowed ones; bad values raise ``ValueError``
    naming the parameter.
    """
    cls = _REGISTRY.get(str(name).lower())
    if cls is None:
        raise ConfigError("staleness", name, sorted(_REGISTRY))
    allowed = [p for p in inspect.signature(cls).parameters]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for staleness function '{name}'; "
            f"allowed: {allowed or 'none'}")
    return cls(**params)
