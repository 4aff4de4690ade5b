"""The compute-bound peer task of issue #23, defined once for every runner and every venv.

Needs numpy and torch only, so that the Flower venv (benchmarks/.venv-flower), the pfl venv
(benchmarks/.venv-pfl) and the project's venv all import the same definition:

  * data: Fashion-MNIST (Xiao, Rasul and Vollgraf 2017, arXiv:1708.07747), 60,000 train /
    10,000 test, read from the gzip IDX files under ``FASHION_ROOT``; x float32 in [0, 1] with
    shape (n, 1, 28, 28) (bytes / 255, as ``fedmosaic.data.load_fashion_mnist``), y int64;
  * IID partition: ``np.random.default_rng(seed).permutation(60000)`` cut into N parts with
    ``np.array_split`` (as the digits peer task);
  * model: conv 1->16 5x5, ReLU, max-pool 2, conv 16->32 5x5, ReLU, max-pool 2, fc 512->10
    (18,378 parameters), torch's default initialisation after ``torch.manual_seed(seed)``;
  * each selected client: 1 local epoch of plain SGD (lr 0.05, no momentum), batch 32,
    shuffled, cross-entropy; FedAvg weighted by samples; K of N clients per round uniformly
    without replacement; the server evaluates the global model on the 10,000 test images
    after every round (part of the round's time, for every framework), in batches of
    ``EVAL_BATCH`` = 512 in every runner (on this machine's CPU 1.75x faster than batches of
    2048, whose activations overflow a core's cache).
"""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

FASHION_ROOT = Path(os.environ.get("FASHION_MNIST_ROOT", "/usr/share/datasets/fashion-mnist"))
FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
N_TRAIN = 60_000
N_TEST = 10_000
LR = 0.05
BATCH_SIZE = 32
LOCAL_EPOCHS = 1
EVAL_BATCH = 512
N_PARAMETERS = 18_378


class TaskCNN(nn.Module):
    """The issue's CNN: two 5x5 conv + max-pool blocks and one dense layer (18,378 weights).

    A narrower CNN than McMahan et al. 2017 (AISTATS, "Communication-efficient learning of
    deep networks from decentralized data"): 16/32 channels and no hidden dense layer, so that
    a round is compute-bound but still takes seconds on two CPU cores.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def make_model() -> nn.Module:
    return TaskCNN()


def _read_idx_gz(path: Path) -> np.ndarray:
    """An unsigned-byte IDX file (LeCun's MNIST format), gzip-compressed."""
    raw = gzip.decompress(path.read_bytes())
    if raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {data.size} bytes of data for dims {dims}")
    return data.reshape(dims)


@lru_cache(maxsize=1)
def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): Fashion-MNIST, x in [0, 1] as (n, 1, 28, 28)."""
    out = []
    for xk, yk in (("train_x", "train_y"), ("test_x", "test_y")):
        x = _read_idx_gz(FASHION_ROOT / FILES[xk]).astype(np.float32)[:, None, :, :]
        x /= 255.0
        y = _read_idx_gz(FASHION_ROOT / FILES[yk]).astype(np.int64)
        out += [x, y]
    x_tr, y_tr, x_te, y_te = out
    if len(x_tr) != N_TRAIN or len(x_te) != N_TEST:
        raise ValueError(f"expected {N_TRAIN}/{N_TEST} images, found {len(x_tr)}/{len(x_te)}")
    return x_tr, y_tr, x_te, y_te


@lru_cache(maxsize=4)
def partitions(num_clients: int, seed: int) -> list[np.ndarray]:
    """The IID partition: a seeded permutation of the train indices cut into N parts."""
    if not 1 <= num_clients <= N_TRAIN:
        raise ValueError(f"need 1 <= clients <= {N_TRAIN}, got {num_clients}")
    perm = np.random.default_rng(seed).permutation(N_TRAIN)
    return np.array_split(perm, num_clients)


def client_seed(seed: int, server_round: int, client: int) -> int:
    """A distinct, reproducible shuffle seed per (run seed, round, client), as flower_peer's."""
    return int(np.random.SeedSequence([seed, server_round, client]).generate_state(1)[0])


def train_local(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, timer: list[float] | None = None
) -> float:
    """One epoch of plain SGD over (x, y) in shuffled batches; returns the mean loss.

    With ``timer`` (a one-element list), the seconds spent in forward + backward passes alone
    are added to ``timer[0]``: the compute floor of the benchmark.
    """
    import time

    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    total, n = 0.0, len(y)
    for _ in range(LOCAL_EPOCHS):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            xb, yb = x[idx], y[idx]
            opt.zero_grad()
            t0 = time.perf_counter() if timer is not None else 0.0
            loss = loss_fn(model(xb), yb)
            loss.backward()
            if timer is not None:
                timer[0] += time.perf_counter() - t0
            opt.step()
            total += loss.item() * len(idx)
    return total / max(n * LOCAL_EPOCHS, 1)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy on (x, y), in batches of EVAL_BATCH."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(y), EVAL_BATCH):
            xb = torch.from_numpy(x[start : start + EVAL_BATCH])
            pred = model(xb).argmax(dim=1).numpy()
            correct += int((pred == y[start : start + EVAL_BATCH]).sum())
    return correct / max(len(y), 1)
