"""DLG and iDLG against real client updates: the acceptance criteria of issue #6 part 4."""

import numpy as np
import pytest
import torch
from torch import nn

from fedmosaic.audit import (
    GaussianNoise,
    NoDefence,
    SecureAggregation,
    UpdateModel,
    idlg_label,
    leakage_audit,
)
from fedmosaic.train import TorchTrainer


def _target(model_fn, seed=0, lr=0.05, local_steps=1) -> UpdateModel:
    trainer = TorchTrainer(model_fn, lr=lr)
    return UpdateModel(trainer, trainer.initial_weights(seed), lr=lr, local_steps=local_steps)


class BiasFreeMLP(nn.Module):
    """No output bias: iDLG must read the label from the weight rows' signs."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(64, 32)
        self.out = nn.Linear(32, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


@pytest.mark.parametrize("kind", ["mlp", "logreg", "bias_free"])
def test_idlg_recovers_the_label_of_one_sample_exactly(kind, digits, mlp_fn, logreg_fn):
    model_fn = {"mlp": mlp_fn, "logreg": logreg_fn, "bias_free": BiasFreeMLP}[kind]
    for seed in range(3):
        target = _target(model_fn, seed=seed)
        target.probe(digits.x)
        for label in range(10):
            i = int(np.flatnonzero(digits.y == label)[seed])
            delta = target.client_update(digits.x[i:i + 1], digits.y[i:i + 1], seed=seed)
            assert idlg_label(target, target.observe(delta)) == label


@pytest.mark.parametrize("local_steps", [1, 3])
def test_the_attackers_simulation_reproduces_the_real_update(local_steps, digits, mlp_fn):
    """With the true data, the attacker's model of the client gives the uploaded update
    (the sum of K clients' updates for secure aggregation)."""
    target = _target(mlp_fn, local_steps=local_steps)
    target.probe(digits.x)
    x, y = digits.x[:3], digits.y[:3]
    observed = sum(target.observe(target.client_update(x[k:k + 1], y[k:k + 1], seed=0))
                   for k in range(3))
    probs = nn.functional.one_hot(torch.from_numpy(y), 10).float().view(3, 1, 10)
    simulated = target.simulate(torch.from_numpy(x).view(3, 1, 64), probs).detach()
    torch.testing.assert_close(simulated, observed, rtol=1e-4, atol=1e-6)


def test_dlg_reconstructs_an_undefended_input(digits, mlp_fn):
    report = leakage_audit(mlp_fn, digits, samples=3, defences=[NoDefence()], attacks=["dlg"],
                           iterations=100, restarts=4, seed=0)
    (r,) = report.results
    # "Low error": mean MSE below 1e-3 on [0, 1] pixels (PSNR > 30 dB; the mean image as a
    # guess scores about 0.08), every sample beats that guess and every label is right.
    assert r.mse < 1e-3 and r.psnr > 30
    assert r.leaked_samples == 3 and r.label_accuracy == 1.0
    assert report.prior["mse"] > 0.05


def test_recommended_dp_noise_defeats_dlg_on_fresh_samples(digits, mlp_fn):
    grid = [0.01, 0.1, 1.0, 3.0]
    report = leakage_audit(mlp_fn, digits, samples=4, defences=["dp"], noise_multipliers=grid,
                           iterations=60, restarts=1, seed=0)
    z = report.recommendation["noise_multiplier"]
    assert z is not None and z > 0.01  # the smallest noise leaves the inputs readable
    low = [r for r in report.results if r.defence == "dp z=0.01"]
    assert all(r.leaked_samples > 0 for r in low)
    # Other samples, other noise draws: undefended DLG succeeds, at z it fails.
    fresh = leakage_audit(mlp_fn, digits, samples=5, defences=[NoDefence(), GaussianNoise(z)],
                          attacks=["dlg"], iterations=60, restarts=1, seed=11)
    undefended, noised = fresh.results
    assert undefended.leaked_samples == 5 and undefended.psnr > 30
    # Documented failure: no input is closer than the data set's mean image (MSE about 0.08,
    # PSNR about 11 dB) is to it. DLG's labels on 5 samples are too few for the label test
    # to mean much; the recommendation's own run checks them (and iDLG's on 200 samples).
    assert noised.leaked_samples == 0
    assert noised.psnr < fresh.prior["psnr"] and noised.mse > fresh.prior["mse"]
    assert all(r.failed for r in report.results if r.defence == f"dp z={z:g}")


def test_secure_aggregation_of_eight_clients_degrades_reconstruction(digits, mlp_fn):
    report = leakage_audit(mlp_fn, digits, samples=8,
                           defences=[NoDefence(), SecureAggregation(8)], attacks=["dlg"],
                           iterations=100, restarts=1, seed=0)
    single, summed = report.results
    assert summed.samples == 8
    assert summed.psnr < single.psnr - 15
    assert summed.leaked_samples < single.leaked_samples


def test_dlg_inverts_an_update_of_several_local_steps(digits, mlp_fn):
    report = leakage_audit(mlp_fn, digits, samples=1, defences=[NoDefence()], local_steps=3,
                           lr=0.1, iterations=100, restarts=2, seed=1)
    for r in report.results:  # the attacker unrolls the three SGD steps it asked for
        assert r.mse < 1e-6 and r.leaked_samples == 1 and r.label_accuracy == 1.0
    assert any("3 steps" in n for n in report.notes)


def test_batched_updates_are_matched_to_their_samples(digits, logreg_fn):
    report = leakage_audit(logreg_fn, digits, samples=4, batch_size=2, defences=["none"],
                           iterations=5, restarts=1)
    # iDLG needs one sample per update: only DLG and the analytic attack run.
    assert [r.attack for r in report.results] == ["dlg", "analytic"]
    r = report.results[0]
    assert r.samples == 4 and report.settings["batch_size"] == 2
    assert any("single sample" in n for n in report.notes)
