"""The analytic inversion of a fully connected first layer (Phong et al. 2017; Geiping et al.
2020, Sec. 3): exact from one sample's update, mixtures from several, defences against it,
and refusal of models it does not apply to."""

import numpy as np
import pytest
import torch
from torch import nn

from fedmosaic.audit import (
    AuditError,
    GaussianNoise,
    NoDefence,
    SecureAggregation,
    UpdateModel,
    analytic_inversion,
    leakage_audit,
)
from fedmosaic.audit.attacks import check_analytic
from fedmosaic.train import TorchTrainer


def _target(model_fn, seed=0, lr=0.05, local_steps=1) -> UpdateModel:
    trainer = TorchTrainer(model_fn, lr=lr)
    target = UpdateModel(trainer, trainer.initial_weights(seed), lr=lr, local_steps=local_steps)
    return target


def _invert(target, x, y, batch=1):
    observed = target.observe(target.client_update(x, y, seed=0))
    return analytic_inversion(target, observed, clients=1, batch=batch, feature_shape=(64,))


@pytest.mark.parametrize(("lr", "local_steps"), [(0.05, 1), (1.0, 1), (0.1, 3)])
@pytest.mark.parametrize("kind", ["mlp", "logreg"])
def test_exact_reconstruction_of_one_sample(kind, lr, local_steps, digits, mlp_fn, logreg_fn):
    # One sample: x = dL/dW[i,:] / dL/db[i] for any active row, whatever lr, and for any
    # number of full-batch steps (each step's first-layer gradient is an outer product with x).
    target = _target(mlp_fn if kind == "mlp" else logreg_fn, lr=lr, local_steps=local_steps)
    target.probe(digits.x)
    for i in (0, 7, 123):
        rec = _invert(target, digits.x[i:i + 1], digits.y[i:i + 1])
        x = torch.from_numpy(digits.x[i]).double()
        mse = float((rec.x.view(64).double() - x).pow(2).mean())
        assert mse < 1e-8
        torch.testing.assert_close(rec.x.view(64), torch.from_numpy(digits.x[i]),
                                   atol=1e-5, rtol=0)
        assert rec.loss < 1e-8 and rec.labels.tolist() == [[-1]]


def test_a_batch_gives_mixtures_of_its_samples(digits, logreg_fn, mlp_fn):
    # Logistic regression: every unit is active for every sample, so each row's ratio is an
    # affine combination sum_j c_ij x_j / sum_j c_ij of the batch, and no row is one sample.
    target = _target(logreg_fn)
    target.probe(digits.x)
    x, y = digits.x[:2], digits.y[:2]
    rec = _invert(target, x, y, batch=2).x.view(2, 64).double()
    truth = torch.from_numpy(x).double()
    coef = torch.linalg.lstsq(truth.T, rec.T).solution  # rec_k = sum_j coef[j, k] x_j
    assert float((truth.T @ coef - rec.T).pow(2).sum() / rec.pow(2).sum()) < 1e-10
    torch.testing.assert_close(coef.sum(0), torch.ones(2, dtype=torch.float64), atol=1e-6,
                               rtol=0)
    assert float((torch.cdist(rec, truth).pow(2) / 64).min()) > 1e-4  # neither sample exactly
    # ReLU MLP: a unit active for one sample of the batch only gives that sample exactly.
    target = _target(mlp_fn)
    target.probe(digits.x)
    rec = _invert(target, x, y, batch=2).x.view(2, 64).double()
    assert float((torch.cdist(rec, truth).pow(2) / 64).min(1).values.max()) < 1e-8


def test_the_audit_runs_it_by_default_and_scores_it(digits, mlp_fn):
    report = leakage_audit(mlp_fn, digits, samples=4, label_samples=20, defences=["none"],
                           iterations=2, restarts=1)
    rows = {r.attack: r for r in report.results}
    assert set(rows) == {"dlg", "idlg", "analytic"}
    analytic = rows["analytic"]
    assert analytic.psnr == 100.0 and analytic.leaked_samples == 4 and analytic.mse < 1e-10
    assert analytic.label_accuracy == rows["idlg"].label_accuracy == 1.0  # iDLG's rule
    assert analytic.matching_loss < 1e-8
    assert any("analytic attack reads inputs" in n for n in report.notes)


@pytest.mark.parametrize("z", [1.0, 3.0])
def test_local_dp_at_the_recommended_noise_stops_it(z, digits, mlp_fn):
    # docs/security.md recommends z = 3 (every attack fails) and z >= 0.1 for the inputs.
    report = leakage_audit(mlp_fn, digits, samples=8, label_samples=8,
                           defences=[NoDefence(), GaussianNoise(z)], attacks=["analytic"],
                           seed=3)
    undefended, noised = report.results
    assert undefended.leaked_samples == 8
    # No reconstruction is closer to its sample than the data set's mean image is.
    assert noised.leaked_samples == 0 and noised.mse > report.prior["mse"]


def test_secure_aggregation_does_not_stop_it_on_a_relu_mlp(digits, mlp_fn):
    # Units active for one client only reveal that client's input from the secure sum.
    report = leakage_audit(mlp_fn, digits, samples=4, label_samples=4,
                           defences=[SecureAggregation(2)], attacks=["analytic"])
    (r,) = report.results
    assert r.samples == 4 and r.leaked_samples >= 3 and r.best_psnr == 100.0
    assert r.label_accuracy == 0.0  # no labels from a mixture of samples
    assert any("mixtures" in n for n in report.notes)
    assert "the analytic attack only (no optimisation)" in report.to_markdown()


class TinyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.head = nn.Linear(72, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x.view(-1, 1, 8, 8))).flatten(1))


class RegisteredOutOfOrder(nn.Module):
    """Its first ParamSpec entries look like a first layer but act on hidden units."""

    def __init__(self) -> None:
        super().__init__()
        self.second = nn.Linear(64, 64)
        self.first = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.second(torch.relu(self.first(x)))))


class Rescaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(2 * x - 1)


class NoBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 16, bias=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(x)))


@pytest.mark.parametrize(("model", "match"), [
    (TinyConv, "fully connected with a bias"),
    (NoBias, "fully connected with a bias"),
    (RegisteredOutOfOrder, "not applied to the raw input"),
    (Rescaled, "not applied to the raw input"),
])
def test_models_without_a_linear_first_layer_are_refused(model, match, digits):
    target = _target(model)
    target.probe(digits.x)
    with pytest.raises(AuditError, match=match):
        check_analytic(target, torch.from_numpy(digits.x[:1]))
    with pytest.raises(AuditError, match=match):
        leakage_audit(model, digits, samples=1, defences=["none"], attacks=["analytic"])
    # By default the audit skips it and says why.
    report = leakage_audit(model, digits, samples=1, label_samples=1, defences=["none"],
                           iterations=1, restarts=1)
    assert {r.attack for r in report.results} == {"dlg", "idlg"}
    assert any("analytic attack was not run" in n for n in report.notes)


def test_top_k_keeps_rows_whose_bias_survives(digits, mlp_fn):
    report = leakage_audit(mlp_fn, digits, samples=4, label_samples=4,
                           defences=["topk"], keep_fractions=[0.3], attacks=["analytic"])
    (r,) = report.results
    assert r.leaked_samples == 4 and r.psnr > 30
    assert np.isfinite(r.matching_loss)
