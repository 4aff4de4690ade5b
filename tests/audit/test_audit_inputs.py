"""The audit refuses what it cannot audit, with an error naming the problem."""

import numpy as np
import pytest
import torch
from torch import nn

from fedmosaic.audit import AuditError, NoDefence, leakage_audit
from fedmosaic.core.errors import FedmosaicError
from fedmosaic.data import ArrayDataset
from fedmosaic.train import TorchTrainer

FAST = {"samples": 1, "defences": [NoDefence()], "attacks": ["idlg"], "iterations": 2,
        "restarts": 1}


class Quantised(nn.Module):
    """Rounds its input: the gradient has no derivative w.r.t. the input."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.round(x * 4) / 4)


class Embedding(nn.Module):
    """Looks up integer tokens: not a model of continuous inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(17, 8)
        self.out = nn.Linear(8 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(x).flatten(1))


class WithDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_audit_errors_are_fedmosaic_errors():
    assert issubclass(AuditError, FedmosaicError) and issubclass(AuditError, ValueError)


@pytest.mark.parametrize("kwargs, message", [
    ({"defences": ["none", "noise"]}, "unknown defence 'noise'"),
    ({"defences": [object()]}, "neither a name"),
    ({"defences": []}, "no defences"),
    ({"attacks": ["dlg", "gradinversion"]}, "unknown attack"),
    ({"samples": 0}, "samples must be"),
    ({"samples": 5000}, "only 1437 samples"),
    ({"samples": 3, "defences": ["secagg"], "secagg_clients": [4]}, "needs samples >= 4"),
    ({"iterations": 0}, "iterations must be"),
    ({"local_steps": 0}, "local_steps must be"),
    ({"lr": -1.0}, "lr must be > 0"),
])
def test_bad_arguments_are_refused(kwargs, message, digits, mlp_fn):
    with pytest.raises(AuditError, match=message):
        leakage_audit(mlp_fn, digits, **{**FAST, **kwargs})


@pytest.mark.parametrize("model, message", [
    (Quantised, "does not depend differentiably on its input"),
    (Embedding, "cannot be evaluated"),
    (WithDropout, "dropout"),
    (lambda: nn.Linear(64, 1), ">= 2 classes"),
    (lambda: nn.Linear(64, 3), r"labels must lie in \[0, 3\)"),
])
def test_models_the_attack_cannot_handle_are_refused(model, message, digits):
    with pytest.raises(AuditError, match=message):
        leakage_audit(model, digits, **FAST)


def test_trainers_the_attack_does_not_model_are_refused(digits, mlp_fn):
    with pytest.raises(AuditError, match="cross-entropy"):
        leakage_audit(TorchTrainer(mlp_fn, "mse"), digits, **FAST)
    adam = TorchTrainer(mlp_fn, optimizer=lambda params, lr: torch.optim.Adam(params, lr=lr))
    with pytest.raises(AuditError, match="plain SGD"):
        leakage_audit(adam, digits, **FAST)


def test_idlg_needs_an_output_layer_per_class(digits):
    class NoLinearHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x * self.scale).view(-1, 8, 8).sum(-1)[:, :8].tanh()

    small = ArrayDataset.create(digits.x, digits.y % 8)
    with pytest.raises(AuditError, match="iDLG needs a model that ends in a linear layer"):
        leakage_audit(NoLinearHead, small, **FAST)


@pytest.mark.parametrize("x, message", [
    (np.zeros((4, 64), dtype=np.float32), "every feature value is the same"),
    (np.full((4, 64), np.nan, dtype=np.float32), "NaN"),
])
def test_bad_data_is_refused(x, message, mlp_fn):
    data = ArrayDataset(x, np.zeros(4, dtype=np.int64))
    with pytest.raises(AuditError, match=message):
        leakage_audit(mlp_fn, data, **FAST)


def test_integer_features_are_refused(mlp_fn):
    class Ints:
        x = np.zeros((4, 64), dtype=np.int64)
        y = np.zeros(4, dtype=np.int64)

        def __len__(self) -> int:
            return 4

    with pytest.raises(AuditError, match="floating point"):
        leakage_audit(mlp_fn, Ints(), **FAST)
