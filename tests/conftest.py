import signal
import sys

import numpy as np
import pytest
import torch

from fedmosaic.data import ArrayDataset, ClientData, FederatedDataset

# A suite started in the background by a non-interactive shell (`make test &`, nohup) inherits
# SIGINT ignored, and exec keeps an ignored signal ignored: the tests that send Ctrl-C to a
# CLI process would then see it run on. Handled signals are reset to the default by exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def make_blobs(n: int, seed: int, num_classes: int = 3, dim: int = 5) -> ArrayDataset:
    """Linearly separable-ish Gaussian blobs: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).normal(0, 2.0, size=(num_classes, dim))
    y = rng.integers(0, num_classes, size=n)
    x = centers[y] + rng.normal(0, 1.0, size=(n, dim))
    return ArrayDataset(x.astype(np.float32), y.astype(np.int64))


@pytest.fixture
def blobs_fed() -> FederatedDataset:
    """Six clients of different sizes plus a global test set."""
    sizes = [40, 25, 60, 13, 33, 50]
    clients = [ClientData(f"c{i}", make_blobs(n, seed=i)) for i, n in enumerate(sizes)]
    return FederatedDataset(name="blobs", clients=clients, test=make_blobs(200, seed=99),
                            num_classes=3, feature_shape=(5,))


@pytest.fixture(autouse=True)
def _single_thread():
    # Identical results need identical reduction orders; one thread also keeps CI fast.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _forget_user_task_module():
    # Projects made by `fedmosaic new` (and several tests) import a user module named "task"
    # from their own directory; one left in sys.modules would be another test's model.
    sys.modules.pop("task", None)
    yield
    sys.modules.pop("task", None)
