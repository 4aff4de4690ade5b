import pytest
import torch
from torch import nn

from fedmosaic.models import MLP
from fedmosaic.train import FitConfig, TorchTrainer, Trainer
from tests.conftest import make_blobs


def _trainer(**kw) -> TorchTrainer:
    return TorchTrainer(lambda: MLP(5, [8], 3), lr=0.1, batch_size=8, **kw)


def test_trainer_satisfies_protocol_and_learns():
    tr = _trainer()
    assert isinstance(tr, Trainer)
    data, test = make_blobs(200, 0), make_blobs(200, 1)
    w0 = tr.initial_weights(0)
    before = tr.evaluate(w0, test)
    res = tr.fit(w0, data, FitConfig(round=1, epochs=5, batch_size=8, seed=3))
    after = tr.evaluate(res.weights, test)
    assert after["loss"] < before["loss"] and after["accuracy"] > 0.8
    assert res.num_samples == 200 and res.steps == 5 * 25
    assert set(res.metrics) == {"train_loss", "train_accuracy"}


def test_fit_is_a_pure_function_of_weights_data_and_seed():
    tr = _trainer()
    data = make_blobs(50, 0)
    w0 = tr.initial_weights(0)
    a = tr.fit(w0, data, FitConfig(round=1, seed=7)).weights
    torch.rand(10)  # disturb the global RNG: must not matter
    b = tr.fit(w0, data, FitConfig(round=1, seed=7)).weights
    c = tr.fit(w0, data, FitConfig(round=1, seed=8)).weights
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(w0, tr.initial_weights(0)), "fit must not modify its input weights"


def test_initial_weights_are_seeded_and_leave_global_rng_alone():
    tr = _trainer()
    state = torch.random.get_rng_state()
    assert torch.equal(tr.initial_weights(1), tr.initial_weights(1))
    assert not torch.equal(tr.initial_weights(1), tr.initial_weights(2))
    assert torch.equal(state, torch.random.get_rng_state())


def test_max_steps_caps_local_work():
    tr = _trainer()
    res = tr.fit(tr.initial_weights(0), make_blobs(100, 0), FitConfig(round=1, epochs=3,
                 batch_size=10, max_steps=4))
    assert res.steps == 4


def test_proximal_term_keeps_weights_closer_to_global():
    tr = _trainer()
    data = make_blobs(100, 0)
    w0 = tr.initial_weights(0)
    free = tr.fit(w0, data, FitConfig(round=1, epochs=5, seed=1)).weights
    prox = tr.fit(w0, data, FitConfig(round=1, epochs=5, seed=1, proximal_mu=5.0)).weights
    assert (prox - w0).norm() < (free - w0).norm()


def test_proximal_mu_zero_is_plain_training_exactly():
    tr = _trainer()
    data, w0 = make_blobs(60, 0), tr.initial_weights(0)
    a = tr.fit(w0, data, FitConfig(round=1, epochs=2, seed=1, proximal_mu=0.0)).weights
    b = tr.fit(w0, data, FitConfig(round=1, epochs=2, seed=1)).weights
    assert torch.equal(a, b)


def test_user_metrics_and_batchnorm_models_evaluate():
    def model():
        return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    tr = TorchTrainer(model, lr=0.1, metrics={"mean_logit": lambda out, y: float(out.mean())})
    res = tr.fit(tr.initial_weights(0), make_blobs(64, 0), FitConfig(round=1, seed=0))
    ev = tr.evaluate(res.weights, make_blobs(30, 1))
    assert {"loss", "accuracy", "mean_logit"} <= set(ev)
    # running statistics travel in the vector and are updated by training
    spec = tr.spec
    rm = spec.views(res.weights)["1.running_mean"]
    assert not torch.equal(rm, torch.zeros(8))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown loss"):
        TorchTrainer(lambda: MLP(5, [4], 3), loss="hinge")
    with pytest.raises(ValueError, match="lr"):
        TorchTrainer(lambda: MLP(5, [4], 3), lr=0)
    with pytest.raises(ValueError, match="epochs"):
        FitConfig(round=1, epochs=0)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
def test_cuda_training_matches_cpu_training():
    data, test = make_blobs(120, 0), make_blobs(100, 1)
    cpu = _trainer()
    gpu = _trainer(device="cuda")
    w0 = cpu.initial_weights(0)
    cfg = FitConfig(round=1, epochs=3, seed=2, proximal_mu=0.1)
    a = cpu.fit(w0, data, cfg)
    b = gpu.fit(w0, data, cfg)
    assert b.weights.device.type == "cpu" and b.weights.dtype == torch.float32
    assert torch.allclose(a.weights, b.weights, atol=1e-4)
    ev_cpu, ev_gpu = cpu.evaluate(a.weights, test), gpu.evaluate(a.weights, test)
    assert abs(ev_cpu["loss"] - ev_gpu["loss"]) < 1e-4
    assert ev_cpu["accuracy"] == ev_gpu["accuracy"]
