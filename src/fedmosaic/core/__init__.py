"""Core types: flat parameter vectors, client updates, errors."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from fedmosaic.core.errors import (
    CheckpointError,
    ConfigError,
    FedmosaicError,
    InvalidUpdateError,
    PrivacyBudgetExhausted,
    RoundFailedError,
    SpecMismatchError,
)

if TYPE_CHECKING:
    from fedmosaic.core.params import ParamEntry, ParamSpec
    from fedmosaic.core.update import ClientUpdate, validate_update

# params and update import torch; the errors do not, and the command line imports them before
# it knows whether it needs torch, so those two modules load on first use (PEP 562).
_LAZY = {"ParamEntry": "params", "ParamSpec": "params", "ClientUpdate": "update",
         "validate_update": "update"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedmosaic.core' has no attribute {name!r}")
    return getattr(import_module(f"fedmosaic.core.{module}"), name)


__all__ = [
    "CheckpointError",
    "ClientUpdate",
    "ConfigError",
    "FedmosaicError",
    "InvalidUpdateError",
    "ParamEntry",
    "ParamSpec",
    "PrivacyBudgetExhausted",
    "RoundFailedError",
    "SpecMismatchError",
    "validate_update",
]
