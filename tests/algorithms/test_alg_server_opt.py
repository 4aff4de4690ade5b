"""Server optimizers (Reddi et al. 2021, Algorithm 2; Hsu et al. 2019): reference values,
state round trips, validation and the registry."""

from __future__ import annotations

import io

import pytest
import torch

from fedmosaic.algorithms import (
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedYogi,
    ServerOptimizer,
    ServerSGD,
    make_server_optimizer,
)

ZERO3 = torch.zeros(3)
DELTA = torch.tensor([1.0, -2.0, 0.5])


def test_fedadam_reference_values() -> None:
    opt = FedAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    out = opt.step(ZERO3.clone(), DELTA)
    assert torch.allclose(out, torch.tensor([0.0990, -0.0995, 0.0980]), atol=5e-5)
    assert [round(x, 4) for x in out.tolist()] == [0.0990, -0.0995, 0.0980]


def test_fedadagrad_reference_values() -> None:
    opt = FedAdagrad(lr=0.1, beta1=0.9, tau=1e-3)
    out = opt.step(ZERO3.clone(), DELTA)
    # -0.1 * 0.2 / 2.001 = -0.009995: compare with atol rather than a rounded literal.
    assert torch.allclose(out, torch.tensor([0.00999, -0.00999, 0.00998]), atol=1e-5)
    expected = torch.tensor([0.01 / 1.001, -0.02 / 2.001, 0.005 / 0.501])
    assert torch.allclose(out, expected, atol=1e-7)


def test_fedavgm_two_steps_by_hand() -> None:
    opt = FedAvgM(lr=0.5, momentum=0.9)
    x = torch.zeros(2)
    x = opt.step(x, torch.tensor([1.0, -1.0]))  # m = [1, -1]
    assert torch.allclose(x, torch.tensor([0.5, -0.5]))
    x = opt.step(x, torch.tensor([0.5, 2.0]))  # m = [1.4, 1.1]
    assert torch.allclose(x, torch.tensor([1.2, 0.05]))


def test_fedyogi_two_steps_by_hand() -> None:
    # tau = 0.1, so v starts at 0.01. Coordinate 0: deltas 2 then 0.1 (v first grows since
    # v < delta^2, then shrinks since v > delta^2); coordinate 1: deltas -2 then 3.
    opt = FedYogi(lr=0.1, beta1=0.9, beta2=0.99, tau=0.1)
    x = opt.step(torch.zeros(2), torch.tensor([2.0, -2.0]))
    # m = ±0.2, v = 0.01 + 0.01 * 4 = 0.05, x = ±0.02 / (sqrt(0.05) + 0.1)
    assert torch.allclose(x, torch.tensor([0.0618034, -0.0618034]), atol=1e-6)
    x = opt.step(x, torch.tensor([0.1, 3.0]))
    # coord 0: m = 0.19, v = 0.05 - 0.01 * 0.01 = 0.0499
    # coord 1: m = 0.12, v = 0.05 + 0.01 * 9 = 0.14
    assert torch.allclose(x, torch.tensor([0.1205572, -0.0364958]), atol=1e-6)
    v = opt.state_dict()["state"]["v"]
    assert torch.allclose(v, torch.tensor([0.0499, 0.14]), atol=1e-7)


def test_server_sgd_is_fedavg_at_lr_one() -> None:
    w = torch.tensor([1.0, 2.0])
    d = torch.tensor([0.5, -1.0])
    assert torch.equal(ServerSGD().step(w, d), w + d)
    assert torch.allclose(ServerSGD(lr=0.1).step(w, d), w + 0.1 * d)


def test_adam_without_bias_correction_and_v_initialised_to_tau_squared() -> None:
    opt = FedAdagrad(lr=1.0, tau=0.5)
    x = opt.step(torch.zeros(2), torch.zeros(2))
    assert torch.equal(x, torch.zeros(2))
    assert torch.allclose(opt.state_dict()["state"]["v"], torch.full((2,), 0.25))
    # First FedAdam step is (1 - beta1) * delta / (sqrt(...) + tau), not bias-corrected.
    adam = FedAdam(lr=1.0, beta1=0.5, beta2=0.0, tau=1e-8)
    x = adam.step(torch.zeros(1), torch.tensor([4.0]))
    assert x.item() == pytest.approx(0.5 * 4.0 / 4.0, rel=1e-6)


ALL = [
    lambda: ServerSGD(lr=0.7),
    lambda: FedAvgM(lr=0.5, momentum=0.8),
    lambda: FedAdagrad(lr=0.05, beta1=0.8, tau=1e-2),
    lambda: FedAdam(lr=0.05, beta1=0.8, beta2=0.95, tau=1e-2),
    lambda: FedYogi(lr=0.05, beta1=0.8, beta2=0.95, tau=1e-2),
]


@pytest.mark.parametrize("factory", ALL)
def test_state_dict_round_trip_is_exact(factory) -> None:
    gen = torch.Generator().manual_seed(0)
    deltas = [torch.randn(50, generator=gen) for _ in range(6)]
    a = factory()
    x = torch.randn(50, generator=gen)
    for d in deltas[:3]:
        x = a.step(x, d)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = factory()
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.steps == a.steps == 3
    xa, xb = x.clone(), x.clone()
    for d in deltas[3:]:
        xa = a.step(xa, d)
        xb = b.step(xb, d)
    assert torch.equal(xa, xb)


@pytest.mark.parametrize("factory", ALL)
def test_step_does_not_mutate_inputs(factory) -> None:
    opt = factory()
    w = torch.tensor([1.0, 2.0, 3.0])
    d = torch.tensor([0.1, -0.2, 0.3])
    w0, d0 = w.clone(), d.clone()
    out = opt.step(w, d)
    out2 = opt.step(out, d)
    assert torch.equal(w, w0) and torch.equal(d, d0)
    assert out.data_ptr() != w.data_ptr() and out2.data_ptr() != out.data_ptr()


@pytest.mark.parametrize("factory", ALL)
def test_state_dict_is_a_snapshot(factory) -> None:
    opt = factory()
    x = opt.step(torch.zeros(4), torch.ones(4))
    snap = opt.state_dict()
    saved = {k: v.clone() for k, v in snap["state"].items()}
    opt.step(x, torch.ones(4))
    for k, v in snap["state"].items():
        assert torch.equal(v, saved[k])
    assert snap["steps"] == 1


def test_state_is_created_lazily() -> None:
    opt = FedAdam()
    assert opt.state_dict()["state"] == {}
    assert opt.steps == 0
    opt.step(torch.zeros(5), torch.ones(5))
    state = opt.state_dict()["state"]
    assert set(state) == {"m", "v"} and state["m"].shape == (5,)
    # A fresh optimizer can load the pre-step snapshot of another one.
    fresh = FedAdam()
    fresh.load_state_dict(FedAdam().state_dict())
    assert fresh.steps == 0


def test_load_rejects_other_hyperparameters() -> None:
    state = FedAdam(lr=0.1).state_dict()
    with pytest.raises(ValueError, match="lr"):
        FedAdam(lr=0.2).load_state_dict(state)


def test_load_rejects_other_optimizer() -> None:
    with pytest.raises(ValueError, match="fedyogi"):
        FedAdam().load_state_dict(FedYogi().state_dict())


def test_load_rejects_malformed_state() -> None:
    opt = FedAdam()
    opt.step(torch.zeros(3), torch.ones(3))
    good = opt.state_dict()
    with pytest.raises(ValueError, match="lacks"):
        FedAdam().load_state_dict({"name": "fedadam"})
    with pytest.raises(ValueError, match="state tensors"):
        FedAdam().load_state_dict({**good, "state": {"m": good["state"]["m"]}})
    with pytest.raises(ValueError, match="step"):
        FedAdam().load_state_dict({**good, "steps": -1})
    loaded = FedAdam()
    loaded.load_state_dict(good)
    with pytest.raises(ValueError, match="model changed"):
        loaded.step(torch.zeros(4), torch.ones(4))


@pytest.mark.parametrize(
    ("factory", "param"),
    [
        (lambda: ServerSGD(lr=0.0), "lr"),
        (lambda: FedAvgM(lr=-1.0), "lr"),
        (lambda: FedAvgM(momentum=1.0), "momentum"),
        (lambda: FedAdagrad(beta1=-0.1), "beta1"),
        (lambda: FedAdagrad(tau=0.0), "tau"),
        (lambda: FedAdam(beta2=1.0), "beta2"),
        (lambda: FedAdam(lr=float("nan")), "lr"),
        (lambda: FedYogi(tau=-1e-3), "tau"),
        (lambda: FedYogi(beta1=1.5), "beta1"),
    ],
)
def test_hyperparameter_validation(factory, param: str) -> None:
    with pytest.raises(ValueError, match=param):
        factory()


def test_step_validates_shapes_and_dtypes() -> None:
    opt = FedAdam()
    with pytest.raises(ValueError, match="shape"):
        opt.step(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="float32"):
        opt.step(torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="1-D"):
        opt.step(torch.zeros(2, 2), torch.zeros(2, 2))
    assert opt.steps == 0


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("sgd", ServerSGD),
        ("fedavg", ServerSGD),
        ("fedavgm", FedAvgM),
        ("fedadagrad", FedAdagrad),
        ("fedadam", FedAdam),
        ("FedYogi", FedYogi),
    ],
)
def test_registry(name: str, cls: type[ServerOptimizer]) -> None:
    opt = make_server_optimizer(name, lr=0.3)
    assert isinstance(opt, cls)
    assert opt.describe()["lr"] == 0.3 and opt.describe()["name"] == cls.name


def test_registry_errors_list_what_is_allowed() -> None:
    with pytest.raises(ValueError, match="fedadam") as info:
        make_server_optimizer("adamw")
    assert "fedyogi" in str(info.value) and "sgd" in str(info.value)
    with pytest.raises(ValueError, match="beta2") as info:
        make_server_optimizer("fedadam", lr=0.1, momentum=0.9)
    assert "momentum" in str(info.value)


def test_describe_reports_hyperparameters() -> None:
    assert FedYogi().describe() == {
        "name": "fedyogi", "lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3,
    }
    assert FedAvgM().describe() == {"name": "fedavgm", "lr": 1.0, "momentum": 0.9}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("factory", ALL)
def test_cuda_state_follows_weights(factory) -> None:
    opt = factory()
    x = opt.step(torch.zeros(8, device="cuda"), torch.ones(8, device="cuda"))
    assert x.is_cuda
    assert all(t.is_cuda for t in opt.state_dict()["state"].values())
    x_cpu = factory().step(torch.zeros(8), torch.ones(8))
    assert torch.allclose(x.cpu(), x_cpu, atol=1e-6)
    # Loading a GPU snapshot and stepping on CPU moves the state to the CPU.
    moved = factory()
    moved.load_state_dict(opt.state_dict())
    y = moved.step(x.cpu(), torch.ones(8))
    assert not y.is_cuda
    assert torch.allclose(y, opt.step(x, torch.ones(8)).cpu(), atol=1e-6)
