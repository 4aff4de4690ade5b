"""Small reference models used by the demo, the CLI and the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import torch
from torch import nn


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: one linear layer over flattened features."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """Fully connected network with ReLU activations over flattened features."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class SmallCNN(nn.Module):
    """Two 5x5 conv + max-pool blocks and two dense layers, for 28x28 images.

    A narrower version of the CNN of McMahan et al. 2017 (32/64 channels, 512 units), sized
    so that a federated round on Fashion-MNIST runs in seconds on two CPU cores.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 4 * 4, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


MODEL_KINDS = ("logreg", "mlp", "cnn")


def build_model(
    kind: str, feature_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (64,)
) -> nn.Module:
    """Construct one of the reference models for data of ``feature_shape``."""
    in_features = prod(feature_shape)
    if kind == "logreg":
        return LogisticRegression(in_features, num_classes)
    if kind == "mlp":
        return MLP(in_features, hidden, num_classes)
    if kind == "cnn":
        if len(feature_shape) != 3 or tuple(feature_shape[1:]) != (28, 28):
            raise ValueError(
                f"model 'cnn' needs images of shape (C, 28, 28), data has {tuple(feature_shape)}"
            )
        return SmallCNN(feature_shape[0], num_classes)
    raise ValueError(f"unknown model kind {kind!r}; allowed: {', '.join(MODEL_KINDS)}")
