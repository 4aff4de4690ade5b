"""Core types: flat parameter vectors, client updates, errors."""

from fedmosaic.core.errors import (
    CheckpointError,
    ConfigError,
    FedmosaicError,
    InvalidUpdateError,
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
    "RoundFailedError",
    "SpecMismatchError",
    "validate_update",
]
