"""The population of benchmarks/ray_scale.py: any number of small synthetic clients, each
generated from its id alone, so a worker can load any client anywhere (no files to copy)
and the data is the same wherever it is loaded.

Each client has 6 to 14 samples of 60 features around a client-specific mean, labelled by
one fixed linear teacher with noise (10 classes): non-IID in the features, learnable.
About 2.4 KB per client: 100,000 clients hold about 240 MB of float32 features.
"""

from __future__ import annotations

import zlib

import numpy as np

from fedmosaic.data import ArrayDataset

FEATURES, CLASSES = 60, 10
_TEACHER = np.random.default_rng(12345).normal(size=(FEATURES, CLASSES)).astype(np.float32)


def client_ids(n: int) -> list[str]:
    return [f"u{i:07d}" for i in range(n)]


def _samples(rng: np.random.Generator, n: int, shift: np.ndarray) -> ArrayDataset:
    x = (rng.normal(size=(n, FEATURES)) + shift).astype(np.float32)
    noise = rng.gumbel(size=(n, CLASSES)) * 2.0
    y = np.argmax(x @ _TEACHER + noise, axis=1).astype(np.int64)
    return ArrayDataset(x, y)


def load_data(client_id: str) -> ArrayDataset:
    rng = np.random.default_rng(zlib.crc32(client_id.encode()))
    n = int(rng.integers(6, 15))
    return _samples(rng, n, rng.normal(0.0, 0.5, size=FEATURES))


def load_test() -> ArrayDataset:
    rng = np.random.default_rng(7)
    return _samples(rng, 2000, np.zeros(FEATURES))
