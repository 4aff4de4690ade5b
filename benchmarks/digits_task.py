"""The digits peer task of issue #3 (docs/benchmarks.md), for runners outside the Flower venv.

The same definition as benchmarks/flower_peer.py and benchmarks/peer_fedmosaic.py: sklearn's
digits as X/16 float32, a stratified 80/20 split with random_state=0 (1,437 train / 360
test), IID partition by ``np.random.default_rng(seed).permutation(1437)`` cut with
``np.array_split``, MLP 64 -> 64 (ReLU) -> 10, 1 epoch of SGD lr 0.05, batch 32. Needs
numpy, torch and scikit-learn only.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from torch import nn

N_TRAIN = 1437
N_TEST = 360
LR = 0.05
BATCH_SIZE = 32
EVAL_BATCH = 2048


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


@lru_cache(maxsize=1)
def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): 1,437 / 360 digits, stratified, random_state=0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    if len(x_tr) != N_TRAIN or len(x_te) != N_TEST:
        raise ValueError(f"expected {N_TRAIN}/{N_TEST} samples, got {len(x_tr)}/{len(x_te)}")
    return x_tr, y_tr, x_te, y_te


@lru_cache(maxsize=4)
def partitions(num_clients: int, seed: int) -> list[np.ndarray]:
    """The IID partition: a seeded permutation of the train indices cut into N parts."""
    if not 1 <= num_clients <= N_TRAIN:
        raise ValueError(f"need 1 <= clients <= {N_TRAIN}, got {num_clients}")
    perm = np.random.default_rng(seed).permutation(N_TRAIN)
    return np.array_split(perm, num_clients)
