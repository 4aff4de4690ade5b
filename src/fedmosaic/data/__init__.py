"""Datasets for federated learning: containers, partitioners and loaders.

``ArrayDataset`` holds one set of samples, ``FederatedDataset`` a set of clients with a
global test set. Partitioners (:class:`IID`, :class:`Dirichlet`, :class:`Shards`,
:class:`NaturalIds`) simulate clients from a centralized dataset via :func:`partition`;
the loaders give centralized datasets (digits, Fashion-MNIST) and naturally federated ones
(UCI Heart Disease by hospital, FedProx synthetic); ``load_table``,
``federation_from_files`` and ``federation_from_loader`` read the user's own data (``.npz``,
``.csv``, ``.parquet``, or a loader callable).
"""

from fedmosaic.data.dataset import ArrayDataset, ClientData, FederatedDataset
from fedmosaic.data.files import (
    client_from_loader,
    federation_from_files,
    federation_from_loader,
    load_table,
    local_test_split,
)
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
    "client_from_loader",
    "federation_from_files",
    "federation_from_loader",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_heart_disease",
    "load_table",
    "local_test_split",
    "partition",
    "synthetic_fedprox",
]
