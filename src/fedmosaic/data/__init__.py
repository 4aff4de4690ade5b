"""Datasets for federated learning: containers, partitioners and loaders.

``ArrayDataset`` holds one set of samples, ``FederatedDataset`` a set of clients with a
global test set. Partitioners (:class:`IID`, :class:`Dirichlet`, :class:`Shards`,
:class:`NaturalIds`) simulate clients from a centralized dataset via :func:`partition`;
the loaders give centralized datasets (digits, Fashion-MNIST) and naturally federated ones
(UCI Heart Disease by hospital, FedProx synthetic).
"""

from fedmosaic.data.dataset import ArrayDataset, ClientData, FederatedDataset
from fedmosaic.data.loaders import (
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_heart_disease,
    synthetic_fedprox,
)
from fedmosaic.data.partition import IID, Dirichlet, NaturalIds, Partitioner, Shards, partition

__all__ = [
    "IID",
    "ArrayDataset",
    "ClientData",
    "Dirichlet",
    "FederatedDataset",
    "NaturalIds",
    "Partitioner",
    "Shards",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_heart_disease",
    "partition",
    "synthetic_fedprox",
]
