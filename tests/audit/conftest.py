from collections.abc import Callable
from functools import partial

import pytest
from torch import nn

from fedmosaic.data import ArrayDataset, load_digits
from fedmosaic.models import build_model


@pytest.fixture(scope="session")
def digits() -> ArrayDataset:
    """The scikit-learn digits train split, 8x8 images scaled to [0, 1]."""
    return load_digits()[0]


@pytest.fixture
def mlp_fn() -> Callable[[], nn.Module]:
    """The fully connected digits model of the peer task: 64 inputs, 64 ReLU units, 10 classes."""
    return partial(build_model, "mlp", (64,), 10, hidden=(64,))


@pytest.fixture
def logreg_fn() -> Callable[[], nn.Module]:
    return partial(build_model, "logreg", (64,), 10)
