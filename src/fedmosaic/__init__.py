"""fedmosaic: federated learning that moves the model, not the data.

The public API is what this module exports (``import fedmosaic as fm``); everything else is
internal and may change.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names, for type checkers and IDEs; at run time they load on first use
    from fedmosaic import data
    from fedmosaic.algorithms.aggregate import FedAvgAggregator, weighted_mean
    from fedmosaic.algorithms.server_opt import (
        FedAdagrad,
        FedAdam,
        FedAvgM,
        FedYogi,
        ServerOptimizer,
        ServerSGD,
        make_server_optimizer,
    )
    from fedmosaic.algorithms.strategy import FedAvg, FedProx
    from fedmosaic.core import (
        ClientUpdate,
        ConfigError,
        FedmosaicError,
        InvalidUpdateError,
        ParamSpec,
        validate_update,
    )
    from fedmosaic.runtime import (
        BatchedTransport,
        ParallelTransport,
        RayTransport,
        RunResult,
        SequentialTransport,
        Server,
        simulate,
    )
    from fedmosaic.train import FitConfig, TorchTrainer, Trainer

# Where each public name lives. Importing ``fedmosaic`` (as every ``fedmosaic`` command does)
# must not import torch: that alone takes ~1 s, and ``fedmosaic --help`` should answer at once.
# So names load on first attribute access (PEP 562), ``fm.simulate`` as fast as before after it.
_EXPORTS = {
    "FedAvgAggregator": "fedmosaic.algorithms.aggregate",
    "weighted_mean": "fedmosaic.algorithms.aggregate",
    **dict.fromkeys(["FedAdagrad", "FedAdam", "FedAvgM", "FedYogi", "ServerOptimizer",
                     "ServerSGD", "make_server_optimizer"], "fedmosaic.algorithms.server_opt"),
    "FedAvg": "fedmosaic.algorithms.strategy",
    "FedProx": "fedmosaic.algorithms.strategy",
    **dict.fromkeys(["ClientUpdate", "ConfigError", "FedmosaicError", "InvalidUpdateError",
                     "ParamSpec", "validate_update"], "fedmosaic.core"),
    **dict.fromkeys(["BatchedTransport", "ParallelTransport", "RayTransport", "RunResult",
                     "SequentialTransport", "Server", "simulate"], "fedmosaic.runtime"),
    **dict.fromkeys(["FitConfig", "TorchTrainer", "Trainer"], "fedmosaic.train"),
}
_SUBMODULES = {"data"}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        # ``fm.data``, ``fm.models``, ``fm.runtime``...: subpackages were attributes when this
        # module imported them eagerly, and code written then still uses them so.
        try:
            return import_module(f"fedmosaic.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"fedmosaic.{name}":
                raise
        raise AttributeError(f"module 'fedmosaic' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES)


__version__ = "0.1.0"

__all__ = [
    "BatchedTransport",
    "ClientUpdate",
    "ConfigError",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgAggregator",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "FedmosaicError",
    "FitConfig",
    "InvalidUpdateError",
    "ParallelTransport",
    "ParamSpec",
    "RayTransport",
    "RunResult",
    "SequentialTransport",
    "Server",
    "ServerOptimizer",
    "ServerSGD",
    "TorchTrainer",
    "Trainer",
    "__version__",
    "data",
    "make_server_optimizer",
    "simulate",
    "validate_update",
    "weighted_mean",
]
