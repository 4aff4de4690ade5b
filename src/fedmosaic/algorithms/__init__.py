"""Federated algorithms on flat float32 vectors: aggregation, server optimizers, client
sampling, straggler simulation and the FedProx proximal term."""

from fedmosaic.algorithms.aggregate import (
    FedAvgAggregator,
    WeightedMeanAccumulator,
    weighted_mean,
    weighted_sum,
)
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
from fedmosaic.algorithms.strategy import ClientTask, FedAvg, FedProx, client_seed

__all__ = [
    "ClientSampler",
    "ClientTask",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgAggregator",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "ServerOptimizer",
    "ServerSGD",
    "StragglerSimulation",
    "WeightedMeanAccumulator",
    "client_seed",
    "make_server_optimizer",
    "proximal_term",
    "proximal_term_flat",
    "weighted_mean",
    "weighted_sum",
]
