"""fedmosaic: federated learning that moves the model, not the data.

The public API is what this module exports (``import fedmosaic as fm``); everything else is
internal and may change.
"""

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
    RayTransport,
    RunResult,
    SequentialTransport,
    Server,
    simulate,
)
from fedmosaic.train import FitConfig, TorchTrainer, Trainer

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
