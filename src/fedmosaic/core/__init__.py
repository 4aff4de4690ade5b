"""Core types: flat parameter vectors, client updates, errors."""

from fedmosaic.core.errors import (
    CheckpointError,
    ConfigError,
    FedmosaicError,
    InvalidUpdateError,
    PrivacyBudgetExhausted,
    RoundFailedError,
    SpecMismatchError,
)
from fedmosaic.core.params import ParamEntry, ParamSpec
from fedmosaic.core.update import ClientUpdate, validate_update

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
