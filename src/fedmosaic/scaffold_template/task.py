"""The task of this federation: the model every hospital trains, and how a hospital reads its
own data. The same file drives the simulation (`fedmosaic run experiment.toml`, or
`fm.simulate` from Python) and the deployment (`fedmosaic server` + `fedmosaic client`).

Edit freely: `HeartNet` is an ordinary PyTorch module (fedmosaic.models is not used), and
`make_trainer` may return any `fedmosaic.Trainer`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import fedmosaic as fm
from fedmosaic.data import ArrayDataset, load_table

HERE = Path(__file__).resolve().parent
LABEL = "disease"  # the label column of the CSV files (0: no disease, 1: disease)


class HeartNet(nn.Module):
    """A small residual MLP for tabular data: 16 patient features -> 2 classes."""

    def __init__(self, features: int = 16, hidden: int = 32, classes: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(features, hidden)
        self.block = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(h + self.block(h))


def make_trainer() -> fm.TorchTrainer:
    """The trainer every client and the server build: the model, the loss and local SGD."""
    return fm.TorchTrainer(HeartNet, "cross_entropy", lr=0.05, epochs=2, batch_size=16)


def load_data(client_id: str) -> ArrayDataset:
    """One hospital's training data (for `[data] dataset = "custom"` and for Python)."""
    return load_table(HERE / "data" / f"{client_id}.csv", label=LABEL)


def load_test() -> ArrayDataset:
    """The central test set the server evaluates the global model on."""
    return load_table(HERE / "data" / "test.csv", label=LABEL)
