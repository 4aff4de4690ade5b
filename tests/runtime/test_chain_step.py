"""chain_sgd_step (runtime/chain.py): the hand-written SGD step of a linear/ReLU chain must be
autograd's step, client by client, up to float rounding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedmosaic.core.params import ParamSpec
from fedmosaic.runtime.chain import (
    chain_params,
    chain_sgd_step,
    linear_chain,
    manual_step_reason,
)


def _autograd_step(model: nn.Module, spec: ParamSpec, w: torch.Tensor, w0: torch.Tensor,
                   x: torch.Tensor, y: torch.Tensor, m: torch.Tensor, scale: float,
                   mu: float, loss: str) -> tuple[torch.Tensor, float, float]:
    """One client's step, the way TorchTrainer takes it: mean loss over the real samples."""
    spec.load_into(model, w)
    keep = m.bool()
    xs, ys = x[keep], y[keep]
    params = list(model.parameters())
    out = model(xs)
    if loss == "cross_entropy":
        per = nn.functional.cross_entropy(out, ys, reduction="none")
        correct = float((out.argmax(1) == ys).sum()) if len(ys) else 0.0
    else:
        per = (out.squeeze(-1) - ys.to(out.dtype)) ** 2
        correct = 0.0
    mean = per.sum() / max(len(ys), 1)
    grads = torch.autograd.grad(mean, params, allow_unused=False) if len(ys) else \
        [torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    if mu > 0:
        flat = flat + mu * (w - w0)
    return w - scale * flat, float(mean.detach()), correct


def _mlp(d_in: int, hidden: list[int], d_out: int, flatten: bool) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()] if flatten else []
    prev = d_in
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.ReLU()]
        prev = h
    layers.append(nn.Linear(prev, d_out))
    return nn.Sequential(*layers)


@settings(max_examples=30, deadline=None)
@given(
    k=st.integers(1, 5),
    b=st.integers(1, 6),
    hidden=st.lists(st.integers(1, 7), max_size=2),
    loss=st.sampled_from(["cross_entropy", "mse"]),
    mu=st.sampled_from([0.0, 0.3]),
    seed=st.integers(0, 2**16),
)
def test_step_equals_autograd_per_client(k, b, hidden, loss, mu, seed):
    gen = torch.Generator().manual_seed(seed)
    classes = 4 if loss == "cross_entropy" else 1
    model = _mlp(6, hidden, classes, flatten=True)
    spec = ParamSpec.from_module(model)
    chain = linear_chain(model, spec)
    assert chain is not None
    assert manual_step_reason(chain, loss, feature_dims=2) is None
    w0 = spec.read_from(model)
    w = w0 + 0.1 * torch.randn(k, w0.numel(), generator=gen)  # each client somewhere else
    x = torch.randn(k, b, 2, 3, generator=gen)  # (K, B, 2, 3): the chain flattens first
    y = (torch.randint(0, classes, (k, b), generator=gen) if loss == "cross_entropy"
         else torch.randn(k, b, generator=gen))
    m = (torch.rand(k, b, generator=gen) < 0.7).float()  # padding, maybe a whole client
    scale = torch.rand(k, generator=gen) * (torch.rand(k, generator=gen) < 0.8)  # lr x active
    rows_w = w.clone()
    rows = {e.offset: rows_w[:, e.offset : e.offset + e.numel] for e in chain_params(chain)}
    prox = (torch.full((k,), mu), {o: w0[o : o + r.shape[1]] for o, r in rows.items()}) \
        if mu > 0 else None
    got_loss, got_correct = chain_sgd_step(chain, rows, x, y, m, scale, loss=loss, prox=prox,
                                           classification=loss == "cross_entropy")
    for i in range(k):
        want, mean, correct = _autograd_step(model, spec, w[i], w0, x[i], y[i], m[i],
                                             float(scale[i]), mu, loss)
        assert torch.allclose(rows_w[i], want, rtol=1e-5, atol=1e-6), i
        assert float(got_loss[i]) == pytest.approx(mean, rel=1e-5, abs=1e-6)
        if got_correct is not None:
            assert float(got_correct[i]) == correct


def test_reasons_to_keep_autograd():
    # A layer applied twice: its two gradients must be summed before its update.
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.fc(x)))

    model = Twice()
    chain = linear_chain(model, ParamSpec.from_module(model))
    if chain is not None:  # the trace may already refuse it; if not, the step must
        assert "more than once" in str(manual_step_reason(chain, "cross_entropy", 1))
    plain = _mlp(4, [3], 2, flatten=False)
    chain = linear_chain(plain, ParamSpec.from_module(plain))
    assert chain is not None
    assert "unflattened" in str(manual_step_reason(chain, "cross_entropy", feature_dims=2))
    assert manual_step_reason(chain, "cross_entropy", feature_dims=1) is None
    assert "mse" in str(manual_step_reason(chain, "mse", feature_dims=1))  # two outputs
