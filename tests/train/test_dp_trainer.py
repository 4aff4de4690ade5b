"""DPSGDTrainer: DP-SGD (Abadi et al. 2016) inside each client with Opacus."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("opacus")

import fedmosaic as fm
from fedmosaic.data import ArrayDataset
from fedmosaic.models import MLP
from fedmosaic.runtime.batched import BatchingFallbackWarning
from fedmosaic.train import FitConfig, TorchTrainer, Trainer
from fedmosaic.train.dp_trainer import DPSGDTrainer
from tests.conftest import make_blobs

# Tiny noise multipliers give huge epsilons, for which Opacus says its alpha grid is too narrow.
loose_alphas = pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")


def _trainer(**kw) -> DPSGDTrainer:
    args = {"lr": 0.5, "batch_size": 16, "noise_multiplier": 1.0, "max_grad_norm": 1.0,
            "noise": "seeded"}
    args.update(kw)
    return DPSGDTrainer(lambda: MLP(5, [8], 3), **args)


def test_trainer_satisfies_protocol_learns_and_reports_epsilon():
    tr = _trainer(noise_multiplier=0.7)
    assert isinstance(tr, Trainer) and not isinstance(tr, TorchTrainer)
    data, test = make_blobs(200, 0), make_blobs(200, 1)
    w0 = tr.initial_weights(0)
    before = tr.evaluate(w0, test)
    res = tr.fit(w0, data, FitConfig(round=1, epochs=5, seed=3))
    after = tr.evaluate(res.weights, test)
    assert after["loss"] < before["loss"] and after["accuracy"] > 0.7  # chance is 1/3
    assert res.num_samples == 200 and res.steps == 5 * math.ceil(200 / 16)
    assert set(res.metrics) == {"train_loss", "train_accuracy", "epsilon"}
    assert 0 < res.metrics["epsilon"] < math.inf
    assert res.weights.dtype == torch.float32 and res.weights.shape == w0.shape


def test_epsilon_accumulates_per_client_and_clients_are_independent():
    tr = _trainer()
    a, b = make_blobs(100, 0), make_blobs(100, 1)
    w0 = tr.initial_weights(0)
    cfg = FitConfig(round=1, seed=1)
    eps_a1 = tr.fit(w0, a, cfg, client_id="a").metrics["epsilon"]
    eps_a2 = tr.fit(w0, a, cfg, client_id="a").metrics["epsilon"]
    eps_b1 = tr.fit(w0, b, cfg, client_id="b").metrics["epsilon"]
    assert 0 < eps_a1 < eps_a2
    # b's first round costs what a's first round cost (same n, q, sigma, steps): a's earlier
    # rounds were not charged to b.
    assert eps_b1 == pytest.approx(eps_a1, rel=1e-12)
    assert tr.client_epsilons() == pytest.approx({"a": eps_a2, "b": eps_b1})
    assert tr.client_epsilon("nobody") == 0.0


def test_without_client_id_the_data_identifies_the_client():
    tr = _trainer()
    a, b = make_blobs(60, 0), make_blobs(60, 1)
    w0 = tr.initial_weights(0)
    cfg = FitConfig(round=1, seed=1)
    first = tr.fit(w0, a, cfg).metrics["epsilon"]
    # Reloaded data (new objects, same bytes) is the same client; other data is not.
    again = ArrayDataset(a.x.copy(), a.y.copy())
    second = tr.fit(w0, again, cfg).metrics["epsilon"]
    other = tr.fit(w0, b, cfg).metrics["epsilon"]
    assert second > first and other == pytest.approx(first, rel=1e-12)
    key_a, key_b = DPSGDTrainer.client_key(a), DPSGDTrainer.client_key(b)
    assert key_a == DPSGDTrainer.client_key(again) and key_a != key_b
    assert set(tr.client_epsilons()) == {key_a, key_b}


def test_more_noise_costs_less_privacy():
    data, cfg = make_blobs(80, 0), FitConfig(round=1, epochs=2, seed=0)
    eps = []
    for sigma in (0.8, 1.5, 3.0):
        tr = _trainer(noise_multiplier=sigma)
        eps.append(tr.fit(tr.initial_weights(0), data, cfg).metrics["epsilon"])
    assert eps[0] > eps[1] > eps[2] > 0


def test_epsilon_matches_dp_accounting_rdp_for_poisson_subsampled_gaussian():
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting.rdp import RdpAccountant

    n, batch_size, sigma, delta = 200, 16, 1.1, 1e-5
    tr = _trainer(batch_size=batch_size, noise_multiplier=sigma, delta=delta)
    data, w0 = make_blobs(n, 0), tr.initial_weights(0)
    r1 = tr.fit(w0, data, FitConfig(round=1, epochs=2, seed=0), client_id="c")
    r2 = tr.fit(r1.weights, data, FitConfig(round=2, epochs=1, seed=1), client_id="c")
    steps = r1.steps + r2.steps
    assert steps == 3 * math.ceil(n / batch_size)
    ref = RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(
        batch_size / n, dp_accounting.GaussianDpEvent(sigma)
    )
    ref.compose(event, steps)
    assert r2.metrics["epsilon"] == pytest.approx(ref.get_epsilon(delta), rel=0.01)


def test_prv_accountant_is_tighter_than_rdp():
    data, cfg = make_blobs(100, 0), FitConfig(round=1, epochs=2, seed=0)
    rdp = _trainer(accountant="rdp")
    prv = _trainer(accountant="prv")
    e_rdp = rdp.fit(rdp.initial_weights(0), data, cfg).metrics["epsilon"]
    e_prv = prv.fit(prv.initial_weights(0), data, cfg).metrics["epsilon"]
    assert 0 < e_prv <= e_rdp * 1.01


@loose_alphas
def test_clipping_bounds_every_step_of_the_update():
    # Fixed-size lots of at most L examples: each step moves the weights by at most lr * C
    # (mean of clipped gradients), plus noise that sigma = 1e-4 makes negligible.
    lr, clip, n, batch_size = 1.0, 0.01, 40, 8
    tr = _trainer(lr=lr, batch_size=batch_size, max_grad_norm=clip, noise_multiplier=1e-4,
                  poisson_sampling=False)
    data, w0 = make_blobs(n, 0), tr.initial_weights(0)
    res = tr.fit(w0, data, FitConfig(round=1, seed=0))
    assert res.steps == n // batch_size
    moved = float((res.weights - w0).norm())
    assert 0 < moved <= lr * res.steps * clip * 1.001
    plain = TorchTrainer(lambda: MLP(5, [8], 3), lr=lr, batch_size=batch_size)
    unclipped = float((plain.fit(w0, data, FitConfig(round=1, seed=0)).weights - w0).norm())
    assert unclipped > 10 * lr * res.steps * clip, "clipping must have been active"


def test_one_example_moves_a_step_by_at_most_2c_over_the_lot_size():
    # Neighbouring data sets: one example replaced by an extreme outlier. With q = 1 the
    # example is in the lot, and the same seed gives the same noise, so the difference of
    # the two first steps is exactly the difference of the clipped sums divided by L.
    n, lr, clip = 20, 1.0, 0.5

    def linear() -> nn.Module:
        return nn.Linear(5, 3)

    tr = DPSGDTrainer(linear, lr=lr, batch_size=n, noise_multiplier=1.0, max_grad_norm=clip,
                      noise="seeded")
    data, w0 = make_blobs(n, 0), tr.initial_weights(0)
    x, y = data.x.copy(), data.y.copy()
    x[3] *= 1e3
    # The label the initial model finds least likely: the outlier's raw gradient is huge.
    with torch.no_grad():
        model = linear()
        tr.spec.load_into(model, w0)
        y[3] = int(model(torch.as_tensor(x[3:4])).argmin())
    outlier = ArrayDataset(x, y)
    cfg = FitConfig(round=1, seed=5, max_steps=1)
    a = tr.fit(w0, data, cfg, client_id="a").weights
    b = tr.fit(w0, outlier, cfg, client_id="b").weights
    diff = float((a - b).norm())
    assert 0 < diff <= lr * 2 * clip / n + 1e-6
    plain = TorchTrainer(linear, lr=lr, batch_size=n)
    pa, pb = (plain.fit(w0, d, cfg).weights for d in (data, outlier))
    assert float((pa - pb).norm()) > 100 * lr * 2 * clip / n, "the outlier must matter"


def test_fixed_seed_reproduces_and_leaves_global_rng_and_inputs_alone():
    tr = _trainer()
    data, w0 = make_blobs(50, 0), tr.initial_weights(0)
    state = torch.random.get_rng_state()
    a = tr.fit(w0, data, FitConfig(round=1, seed=7)).weights
    assert torch.equal(state, torch.random.get_rng_state())
    torch.rand(10)  # disturb the global RNG: must not matter
    b = tr.fit(w0, data, FitConfig(round=1, seed=7)).weights
    c = tr.fit(w0, data, FitConfig(round=1, seed=8)).weights
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(w0, tr.initial_weights(0)), "fit must not modify its input weights"
    # A fresh trainer (another process, say) gives the same weights for the same seed.
    assert torch.equal(a, _trainer().fit(w0, data, FitConfig(round=1, seed=7)).weights)


def test_max_steps_and_empty_poisson_lots():
    tr = _trainer(batch_size=1)
    # q = 1/50: most lots are empty, and each still takes a noise-only step.
    res = tr.fit(tr.initial_weights(0), make_blobs(50, 0), FitConfig(round=1, max_steps=7))
    assert res.steps == 7 and torch.isfinite(res.weights).all()
    assert math.isfinite(res.metrics["epsilon"])


def test_proximal_term_keeps_weights_closer_to_global():
    # lr * mu < 1 keeps the proximal pull a contraction, as for TorchTrainer's test.
    tr = _trainer(lr=0.1, noise_multiplier=0.5)
    data, w0 = make_blobs(100, 0), tr.initial_weights(0)
    free = tr.fit(w0, data, FitConfig(round=1, epochs=5, seed=1)).weights
    prox = tr.fit(w0, data, FitConfig(round=1, epochs=5, seed=1, proximal_mu=5.0)).weights
    assert (prox - w0).norm() < (free - w0).norm()
    zero = tr.fit(w0, data, FitConfig(round=1, epochs=5, seed=1, proximal_mu=0.0)).weights
    assert torch.equal(zero, free)


def test_simulate_reports_sample_weighted_mean_epsilon(blobs_fed):
    tr = _trainer(batch_size=8)
    result = fm.simulate(tr, blobs_fed, fm.FedAvg(fraction=1.0), rounds=2, seed=0)
    eps_rounds = result.metric("epsilon")
    assert len(eps_rounds) == 2 and 0 < eps_rounds[0] < eps_rounds[1]
    per_client = tr.client_epsilons()
    sizes = blobs_fed.sizes()
    keys = {cid: DPSGDTrainer.client_key(blobs_fed.client(cid).train) for cid in sizes}
    assert set(per_client) == set(keys.values())
    expected = sum(sizes[c] * per_client[keys[c]] for c in sizes) / sum(sizes.values())
    assert eps_rounds[1] == pytest.approx(expected, rel=1e-9)
    assert "test_accuracy" in result.final


def test_batched_transport_falls_back_to_sequential(blobs_fed):
    tr = _trainer(batch_size=8)
    with pytest.warns(BatchingFallbackWarning, match="not a TorchTrainer"):
        transport = fm.BatchedTransport(tr, blobs_fed)
    assert not transport.batched
    result = fm.simulate(tr, blobs_fed, fm.FedAvg(fraction=1.0), rounds=1, seed=0,
                         transport=transport)
    assert result.final["epsilon"] > 0


def test_accounting_state_round_trips():
    tr = _trainer()
    data, w0 = make_blobs(60, 0), tr.initial_weights(0)
    tr.fit(w0, data, FitConfig(round=1, seed=0), client_id="a")
    state = tr.accounting_state()
    restored = _trainer()
    restored.load_accounting_state(state)
    assert restored.client_epsilons() == tr.client_epsilons()
    after = restored.fit(w0, data, FitConfig(round=2, seed=1), client_id="a").metrics["epsilon"]
    assert after > tr.client_epsilon("a")
    with pytest.raises(ValueError, match="accountant"):
        _trainer(accountant="prv").load_accounting_state(state)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": float("nan")}, "noise_multiplier"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"max_grad_norm": float("inf")}, "max_grad_norm"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"lr": 0.0}, "lr"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"accountant": "moments"}, "accountant"),
        ({"loss": "hinge"}, "unknown loss"),
    ],
)
def test_bad_arguments_are_refused(kwargs, param):
    with pytest.raises(ValueError, match=param):
        _trainer(**kwargs)


def test_models_opacus_cannot_clip_per_sample_are_refused():
    def model():
        return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    with pytest.raises(ValueError, match="GroupNorm"):
        DPSGDTrainer(model, noise_multiplier=1.0, max_grad_norm=1.0)


def test_empty_data_is_refused():
    tr = _trainer()
    empty = ArrayDataset(np.zeros((0, 5), np.float32), np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="empty"):
        tr.fit(tr.initial_weights(0), empty, FitConfig(round=1))


def test_missing_opacus_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus", None)  # makes `import opacus` fail
    with pytest.raises(ImportError, match="pip install opacus"):
        _trainer()


def test_secure_noise_trains_and_is_not_reproducible():
    data = make_blobs(120, 0)
    tr = _trainer(noise="secure")
    w0 = tr.initial_weights(0)
    cfg = FitConfig(round=1, seed=3)
    a, b = tr.fit(w0, data, cfg), tr.fit(w0, data, cfg)
    assert torch.isfinite(a.weights).all() and a.steps == b.steps
    # Same seed, different weights: neither lots nor noise come from FitConfig.seed.
    assert not torch.equal(a.weights, b.weights)
    assert a.metrics["epsilon"] > 0


def test_noise_option_is_checked():
    with pytest.raises(ValueError, match="seeded, secure"):
        _trainer(noise="csprng")
    with pytest.raises(TypeError):
        _trainer(secure_rng=True)  # the torchcsprng path is gone


def test_importing_fedmosaic_does_not_import_opacus():
    code = ("import sys, fedmosaic, fedmosaic.train.dp_trainer; "
            "assert 'opacus' not in sys.modules, 'opacus imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
def test_cuda_training_is_seeded_and_accounted_like_cpu():
    data = make_blobs(120, 0)
    cpu, gpu = _trainer(), _trainer(device="cuda")
    w0 = cpu.initial_weights(0)
    cfg = FitConfig(round=1, epochs=2, seed=2, proximal_mu=0.1)
    a = gpu.fit(w0, data, cfg, client_id="a")
    b = gpu.fit(w0, data, cfg, client_id="b")
    c = cpu.fit(w0, data, cfg, client_id="a")
    assert a.weights.device.type == "cpu" and a.weights.dtype == torch.float32
    assert torch.allclose(a.weights, b.weights, atol=1e-6)
    # Lots are drawn on the CPU in both cases, so the steps and the privacy spend agree
    # (the noise itself comes from the device's generator and differs).
    assert a.steps == c.steps and a.metrics["epsilon"] == pytest.approx(c.metrics["epsilon"])
    test = make_blobs(50, 1)
    assert gpu.evaluate(a.weights, test)["accuracy"] == cpu.evaluate(a.weights, test)["accuracy"]


def test_resumed_run_remembers_each_clients_privacy_spend(tmp_path):
    """The server checkpoint carries the DP-SGD accountants, so resume continues the spend."""
    from fedmosaic.data import IID, partition

    fed = partition(make_blobs(120, 0), IID(), 3, 0, test=make_blobs(30, 1))

    def trainer():
        return DPSGDTrainer(lambda: MLP(5, [8], 3), lr=0.1, batch_size=8,
                            noise_multiplier=1.0, max_grad_norm=1.0, noise="seeded")

    full = fm.simulate(trainer(), fed, fm.FedAvg(fraction=1.0), rounds=3, seed=0)
    fm.simulate(trainer(), fed, fm.FedAvg(fraction=1.0), rounds=3, seed=0, out_dir=tmp_path,
                stop_after=1)
    resumed = fm.simulate(trainer(), fed, fm.FedAvg(fraction=1.0), rounds=3, seed=0,
                          out_dir=tmp_path, resume=True)
    assert resumed.metric("epsilon") == pytest.approx(full.metric("epsilon"))
    assert torch.equal(full.weights, resumed.weights)
