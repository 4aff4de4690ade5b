"""Exception types shared by every layer of fedmosaic."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class FedmosaicError(Exception):
    """Base class of every error fedmosaic raises on purpose."""


class ConfigError(FedmosaicError, ValueError):
    """A configuration value is wrong; the message names the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str | Iterable[Any]) -> None:
        if not isinstance(allowed, str):
            allowed = "one of " + ", ".join(repr(a) for a in allowed)
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config key '{key}': got {value!r}; allowed: {allowed}")


class InvalidUpdateError(FedmosaicError, ValueError):
    """A client update failed validation; it is rejected, the run goes on without it."""

    def __init__(self, client_id: str, problem: str) -> None:
        self.client_id, self.problem = client_id, problem
        super().__init__(f"update from client '{client_id}' rejected: {problem}")


class SpecMismatchError(FedmosaicError, ValueError):
    """A state dict or vector does not match the ParamSpec it is used with."""


class RoundFailedError(FedmosaicError, RuntimeError):
    """A round could not complete (e.g. too few valid client updates)."""


class PrivacyBudgetExhausted(FedmosaicError, RuntimeError):
    """Another round would exceed the run's (epsilon, delta) budget; training stops."""


class CheckpointError(FedmosaicError, RuntimeError):
    """A checkpoint is missing, unreadable or belongs to another experiment."""
