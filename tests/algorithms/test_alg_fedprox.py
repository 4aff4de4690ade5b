"""FedProx proximal term (Li et al. 2020): value and gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmosaic.algorithms import proximal_term, proximal_term_flat


def _model_pair(seed: int = 0) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    global_params = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model, global_params


def test_zero_when_weights_equal_global_with_finite_zero_gradient() -> None:
    model, _ = _model_pair()
    same = [p.detach().clone() for p in model.parameters()]
    term = proximal_term(model.parameters(), same, mu=0.1)
    assert term.detach().item() == 0.0
    term.backward()
    for p in model.parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))


def test_value_and_gradient() -> None:
    model, global_params = _model_pair()
    mu = 0.3
    term = proximal_term(model.parameters(), global_params, mu)
    params = list(model.parameters())
    pairs = zip(params, global_params, strict=True)
    expected = mu / 2 * sum(float(((p.detach() - g) ** 2).sum()) for p, g in pairs)
    assert term.detach().item() == pytest.approx(expected, rel=1e-5)
    term.backward()
    for p, g in zip(params, global_params, strict=True):
        assert torch.allclose(p.grad, mu * (p.detach() - g), atol=1e-6)


def test_flat_matches_per_tensor_and_gradient() -> None:
    model, global_params = _model_pair(1)
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).requires_grad_()
    wg = torch.cat([g.reshape(-1) for g in global_params])
    flat = proximal_term_flat(w, wg, 0.7)
    listed = proximal_term(model.parameters(), global_params, 0.7)
    assert flat.detach().item() == pytest.approx(listed.detach().item(), rel=1e-5)
    flat.backward()
    assert torch.allclose(w.grad, 0.7 * (w.detach() - wg), atol=1e-6)
    assert proximal_term_flat(wg, wg, 0.7).item() == 0.0


def test_mu_zero_and_validation() -> None:
    model, global_params = _model_pair()
    assert proximal_term(model.parameters(), global_params, 0.0).item() == 0.0
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="mu"):
            proximal_term(model.parameters(), global_params, bad)
        with pytest.raises(ValueError, match="mu"):
            proximal_term_flat(torch.zeros(2), torch.zeros(2), bad)
    with pytest.raises(ValueError, match="global params"):
        proximal_term(model.parameters(), global_params[:-1], 0.1)
    with pytest.raises(ValueError, match="shape"):
        proximal_term([torch.zeros(3)], [torch.zeros(1)], 0.1)
    with pytest.raises(ValueError, match="empty"):
        proximal_term([], [], 0.1)
    with pytest.raises(ValueError, match="shape"):
        proximal_term_flat(torch.zeros(3), torch.zeros(4), 0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda() -> None:
    model, global_params = _model_pair()
    model.cuda()
    term = proximal_term(model.parameters(), [g.cuda() for g in global_params], 0.2)
    assert term.is_cuda
    term.backward()
    assert all(p.grad is not None and p.grad.is_cuda for p in model.parameters())
