"""The empirical privacy audit on real DP-FedAvg runs with canary clients: correct
configurations stay below their accounted epsilon, an under-noised one is caught."""

import json
from functools import partial

import numpy as np
import pytest
from typer.testing import CliRunner

from fedmosaic.audit import AuditError
from fedmosaic.audit.privacy_audit import Canaries, CanaryTransport, audit_privacy
from fedmosaic.cli import app
from fedmosaic.data import IID, load_digits, partition
from fedmosaic.models import build_model
from fedmosaic.privacy.dp_fedavg import DPFedAvg
from fedmosaic.runtime import SequentialTransport
from fedmosaic.runtime.simulate import simulate
from fedmosaic.train import TorchTrainer
from fedmosaic.train.base import FitResult, TrainerWrapper


class UnderNoisedDPFedAvg(DPFedAvg):
    """Test-only broken mechanism: the accountant charges for z, the sum gets z / 10."""

    def update_noise_multiplier(self, population: int) -> float:
        return super().update_noise_multiplier(population) / 10


@pytest.fixture(scope="module")
def federation():
    train, test = load_digits()
    return partition(train, IID(), 300, 0, test=test, name="digits")


def _trainer():
    return TorchTrainer(partial(build_model, "mlp", (64,), 10, hidden=(64,)), "cross_entropy",
                        lr=0.05, epochs=1, batch_size=32)


def _audit(federation, cls=DPFedAvg, rounds=20, **privacy):
    args = dict(clip=0.2, delta=1e-5, target_epsilon=2.0, rounds=rounds, sampling="poisson",
                rate=0.1)
    args.update(privacy)
    return audit_privacy(_trainer(), federation, cls(**args), rounds, canaries=200, seed=1)


def test_correct_dp_fedavg_stays_below_its_epsilon(federation):
    report = _audit(federation)
    assert report.accounted_epsilon == pytest.approx(2.0, abs=0.02)
    assert report.inserted + (200 - report.inserted) == 200 and 60 < report.inserted < 140
    assert report.steinke.epsilon_lower_bound < report.accounted_epsilon
    assert not report.violation
    assert report.settings["excluded_canaries"] == "absent"
    assert report.settings["rounds_run"] == 20


def test_adaptive_clipping_stays_below_its_epsilon(federation):
    report = _audit(federation, adaptive_clip_quantile=0.5)
    assert report.steinke.epsilon_lower_bound < report.accounted_epsilon
    assert report.settings["clip"] == "adaptive"


def test_fixed_cohorts_use_mirrored_canaries_and_stay_below(federation):
    report = _audit(federation, sampling="fixed", rate=None, clients_per_round=50)
    assert report.settings["excluded_canaries"] == "mirror"
    assert report.steinke.epsilon_lower_bound < report.accounted_epsilon


def test_distributed_dp_canaries_add_their_own_noise_share(federation):
    report = _audit(federation, rounds=10, target_epsilon=None, noise_multiplier=1.0,
                    distributed=True, min_contributors=20)
    assert report.steinke.epsilon_lower_bound < report.accounted_epsilon


def test_under_noised_mechanism_is_caught(federation):
    report = _audit(federation, cls=UnderNoisedDPFedAvg)
    # The accountant still says 2.0; the audit proves, at 95%, that epsilon is higher.
    assert report.accounted_epsilon == pytest.approx(2.0, abs=0.02)
    assert report.steinke.epsilon_lower_bound > report.accounted_epsilon
    assert report.violation
    assert report.andrew_epsilon_estimate > report.accounted_epsilon


def test_same_seed_same_report(federation):
    a = _audit(federation, rounds=3)
    b = _audit(federation, rounds=3)
    assert a.to_dict() == b.to_dict()


class NoTraining(TrainerWrapper):
    """Real clients that upload a zero update, so only the canaries move the model."""

    def fit(self, weights, data, config):
        return FitResult(weights.clone(), len(data), 1)


def test_canaries_are_clipped_by_the_server_like_clients(federation):
    trainer = NoTraining(_trainer())
    canaries = Canaries.draw(20, trainer.spec.numel, seed=3)
    transport = CanaryTransport(SequentialTransport(trainer, federation), canaries, norm=50.0)
    strategy = DPFedAvg(clip=0.2, delta=1e-5, noise_multiplier=1.0, sampling="poisson",
                        rate=0.5)
    seen: dict[str, tuple[float, float]] = {}
    prepare = strategy.aggregator.prepare

    def spy(update, tally):  # the server's clipping step, on every validated update
        out = prepare(update, tally)
        seen[update.client_id] = (float(update.delta.norm()), float(out.norm()))
        return out

    strategy.aggregator.prepare = spy
    result = simulate(trainer, federation, strategy, 2, seed=0, transport=transport)
    canary_norms = [v for k, v in seen.items() if k.startswith("__canary_")]
    assert canary_norms, "no canary was sampled"
    assert all(raw == pytest.approx(50.0, rel=1e-5) and clipped == pytest.approx(0.2, rel=1e-5)
               for raw, clipped in canary_norms)
    # Only inserted canaries joined, and they count in the population (q N) like clients.
    inserted = {canaries.client_id(i) for i in np.flatnonzero(canaries.included)}
    assert {k for k in seen if k.startswith("__canary_")} <= inserted
    assert strategy.population == 300 + len(inserted)
    assert result.guarantees["differential_privacy"]["rounds"] == 2


def test_canary_ids_must_not_collide(federation):
    canaries = Canaries.draw(2, 10, seed=0)

    class Named:
        def available_clients(self):
            return [canaries.client_id(0)]

    with pytest.raises(AuditError, match="collide"):
        CanaryTransport(Named(), canaries, norm=1.0)
    with pytest.raises(AuditError, match="excluded"):
        CanaryTransport(SequentialTransport(_trainer(), federation), canaries, 1.0,
                        excluded="blank")


def test_non_dp_strategy_is_refused(federation):
    from fedmosaic.algorithms.strategy import FedAvg

    with pytest.raises(AuditError, match="client-level DP"):
        audit_privacy(_trainer(), federation, FedAvg(), 1, canaries=10)


CONFIG = """
name = "tiny-privacy-audit"
seed = 1
rounds = 8

[data]
dataset = "digits"

[partition]
clients = 200

[model]
kind = "mlp"
hidden = [16]

[privacy]
mode = "central"
clip = 0.2
delta = 1e-5
noise_multiplier = 1.0
sampling = "poisson"
rate = 0.2
"""


def test_cli_audit_privacy_writes_the_report(tmp_path):
    cfg = tmp_path / "exp.toml"
    cfg.write_text(CONFIG)
    out = tmp_path / "audit"
    result = CliRunner().invoke(app, ["audit", "privacy", str(cfg), "--canaries", "100",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "privacy_audit.json").read_text())
    assert report["settings"]["rounds"] == 8 and report["canaries"] == 100
    assert 0 <= report["steinke"]["epsilon_lower_bound"] < report["accounted_epsilon"]
    assert not report["violation"]
    assert (out / "privacy_audit.md").read_text().startswith("# Empirical privacy audit")
    assert "lower bound" in result.output and "no violation" in result.output


def test_cli_audit_privacy_refuses_a_run_without_dp(tmp_path):
    cfg = tmp_path / "exp.toml"
    cfg.write_text(CONFIG.split("[privacy]")[0])
    result = CliRunner().invoke(app, ["audit", "privacy", str(cfg)])
    assert result.exit_code == 2
    assert "client-level DP" in " ".join(result.output.split())
