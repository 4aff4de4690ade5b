"""Federated algorithms on flat float32 vectors: aggregation, server optimizers, client
sampling, straggler simulation, the FedProx proximal term, and the asynchronous pieces
(staleness functions, FedAsync's mixing, FedBuff's buffer)."""

from fedmosaic.algorithms.aggregate import (
    FedAvgAggregator,
    WeightedMeanAccumulator,
    weighted_mean,
    weighted_sum,
)
from fedmosaic.algorithms.fedasync import FedAsyncMixer, ModelHistory
from fedmosaic.algorithms.fedbuff import FedBuffBuffer
from fedmosaic.algorithms.fedprox import proximal_term, proximal_term_flat
from fedmosaic.algorithms.sampling import ClientSampler, StragglerSimulation
from fedmosaic.algorithms.server_opt import (
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedYogi,
    ServerOptimizer,
    ServerSGD,
    make_server_optimizer,
)
from fedmosaic.algorithms.staleness import (
    ConstantStaleness,
    HingeStaleness,
    InverseSqrtStaleness,
    PolynomialStaleness,
    StalenessFunction,
    make_staleness,
    staleness_of,
)
from fedmosaic.algorithms.strategy import ClientTask, FedAvg, FedProx, client_seed

__all__ = [
    "ClientSampler",
    "ClientTask",
    "ConstantStaleness",
    "FedAdagrad",
    "FedAdam",
    "FedAsyncMixer",
    "FedAvg",
    "FedAvgAggregator",
    "FedAvgM",
    "FedBuffBuffer",
    "FedProx",
    "FedYogi",
    "HingeStaleness",
    "InverseSqrtStaleness",
    "ModelHistory",
    "PolynomialStaleness",
    "ServerOptimizer",
    "ServerSGD",
    "StalenessFunction",
    "StragglerSimulation",
    "WeightedMeanAccumulator",
    "client_seed",
    "make_server_optimizer",
    "make_staleness",
    "proximal_term",
    "proximal_term_flat",
    "staleness_of",
    "weighted_mean",
    "weighted_sum",
]
