"""BatchedTransport's bmm path for flatten / Linear / ReLU chains (``linear_chain``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, vmap

import fedmosaic as fm
from fedmosaic.algorithms.strategy import ClientTask
from fedmosaic.core.params import ParamSpec
from fedmosaic.data import ClientData, FederatedDataset
from fedmosaic.models.zoo import MLP, LogisticRegression, SmallCNN
from fedmosaic.runtime.batched import BatchedTransport
from fedmosaic.runtime.chain import chain_forward, linear_chain
from fedmosaic.train import FitConfig
from tests.conftest import make_blobs


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + x


class _Tanh(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.a(x))


def _kinds(model: nn.Module) -> list[str] | None:
    chain = linear_chain(model, ParamSpec.from_module(model))
    return None if chain is None else [op[0] for op in chain]


def test_chains_recognised_and_refused() -> None:
    assert _kinds(MLP(64, [32, 16], 10)) == ["flatten", "linear", "relu", "linear", "relu",
                                             "linear"]
    assert _kinds(LogisticRegression(64, 10)) == ["flatten", "linear"]
    assert _kinds(SmallCNN()) is None  # convolutions: the vmap path
    assert _kinds(_Residual()) is None  # a value used twice
    assert _kinds(_Tanh()) is None  # an op outside the chain's vocabulary
    hooked = MLP(8, [4], 2)
    hooked.net[0].register_forward_hook(lambda *_: None)
    assert _kinds(hooked) is None  # functional_call would run the hook; bmm would not


def test_chain_forward_and_gradient_equal_vmap() -> None:
    torch.manual_seed(0)
    model = MLP(64, [32], 10)
    spec = ParamSpec.from_module(model)
    chain = linear_chain(model, spec)
    assert chain is not None
    k, b = 5, 7
    x, y = torch.randn(k, b, 8, 8), torch.randint(0, 10, (k, b))

    def one(w: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        params = {e.name: w[e.offset: e.offset + e.numel].view(e.shape) for e in spec.entries}
        return functional_call(model, params, (xs,))

    outs, grads = [], []
    for forward in (vmap(one), chain_forward(chain)):
        w = torch.randn(k, spec.numel, generator=torch.Generator().manual_seed(1))
        w.requires_grad_(True)
        out = forward(w, x)
        nn.functional.cross_entropy(out.reshape(-1, 10), y.reshape(-1)).backward()
        outs.append(out.detach())
        grads.append(w.grad)
    assert outs[0].shape == (k, b, 10)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7)


def test_single_client_chunk_leaves_the_global_weights_alone() -> None:
    fed = FederatedDataset(name="blobs", clients=[ClientData("c0", make_blobs(20, seed=1))],
                           test=make_blobs(10, seed=9), num_classes=3, feature_shape=(5,))
    trainer = fm.TorchTrainer(lambda: MLP(5, [8], 3), lr=0.1, batch_size=8)
    transport = BatchedTransport(trainer, fed)
    assert transport._chain is not None  # the bmm path
    weights = trainer.initial_weights(0)
    before = weights.clone()
    config = FitConfig(round=1, seed=3)
    (update,) = list(transport.fit(weights, [ClientTask("c0", config)]))
    assert transport.batched
    assert torch.equal(weights, before)  # training worked on a copy of the weights
    want = trainer.fit(before, fed.client("c0").train, config).weights - before
    torch.testing.assert_close(update.delta, want, rtol=1e-5, atol=1e-6)
