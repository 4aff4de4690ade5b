"""Trainers for tests/runtime/test_parallel.py, in a module of their own: worker processes
import it to unpickle them, and it imports nothing the workers do not already have."""

from __future__ import annotations

import functools
import os
import signal
import zlib
from pathlib import Path

import torch

import fedmosaic as fm
from fedmosaic.models import MLP
from fedmosaic.train import FitConfig
from fedmosaic.train.base import Dataset, FitResult, TrainerWrapper

make_trainer = functools.partial(fm.TorchTrainer, functools.partial(MLP, 64, [32], 10),
                                 lr=0.05, epochs=1, batch_size=32)


class KillOnce(TrainerWrapper):
    """A trainer whose worker process kills itself (SIGKILL) the first time it trains a
    client with ``victim_size`` samples; ``marker`` records the pid that did it."""

    def __init__(self, victim_size: int, marker: str) -> None:
        super().__init__(make_trainer())
        self.victim_size, self.marker = victim_size, marker

    def fit(self, weights: torch.Tensor, data: Dataset, config: FitConfig) -> FitResult:
        if len(data) == self.victim_size and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner.fit(weights, data, config)


def nudge(client_id: str, weights: torch.Tensor) -> torch.Tensor:
    """A dispatch transform that sends each client its own shift of the global weights."""
    return weights + 1e-2 * (zlib.crc32(client_id.encode()) % 7)


class BatchNormNet(torch.nn.Module):
    """An MLP with BatchNorm, which BatchedTransport cannot batch (it falls back)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16),
                                        torch.nn.ReLU(), torch.nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
