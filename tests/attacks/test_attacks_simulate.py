"""Attacks end to end: through real training, the server loop, and the [attack] config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fedmosaic as fm
from fedmosaic.attacks import (
    AdversarialTransport,
    AttackMonitor,
    Backdoor,
    LabelFlip,
    SignFlip,
    poison_federation,
    simulate_attack,
)
from fedmosaic.build import build_data, build_strategy, build_trainer, build_transport
from fedmosaic.config import validate
from fedmosaic.core.errors import ConfigError
from fedmosaic.data import IID, load_digits, partition
from fedmosaic.models import MLP
from tests.attacks.helpers import tasks_for


def blobs_trainer() -> fm.TorchTrainer:
    return fm.TorchTrainer(lambda: MLP(5, [8], 3), lr=0.1, batch_size=16)


def test_backdoor_upload_is_gamma_times_the_delta_trained_on_poisoned_data(blobs_fed):
    attack = Backdoor(target=1, poison_fraction=0.5, trigger_size=1, trigger_value=4.0)
    bad = {"c0", "c2"}
    fed = poison_federation(blobs_fed, attack, bad, seed=0)
    trainer = blobs_trainer()
    weights = trainer.initial_weights(0)
    tasks = tasks_for(fed.client_ids)
    honest = {u.client_id: u for u in fm.SequentialTransport(trainer, fed).fit(weights, tasks)}
    adv = AdversarialTransport(fm.SequentialTransport(trainer, fed), attack, bad)
    out = {u.client_id: u for u in adv.fit(weights, tasks)}
    gamma = 6 / 2  # n = 6 clients in the round, m = 2 attackers, server lr 1
    for cid in fed.client_ids:
        want = honest[cid].delta * (gamma if cid in bad else 1.0)
        torch.testing.assert_close(out[cid].delta, want)
        assert out[cid].num_samples == honest[cid].num_samples
    # The malicious clients trained on triggered samples relabelled to the target.
    assert np.sum(fed.client("c0").train.x[:, -1] == 4.0) == 20  # 50% of 40
    assert not np.any(blobs_fed.client("c0").train.x[:, -1] == 4.0)


def test_crafted_updates_still_pass_server_validation(blobs_fed):
    class NaNAttack(SignFlip):
        def craft_update(self, delta, view):
            return torch.full_like(delta, float("nan"))

    trainer = blobs_trainer()
    strategy = fm.FedAvg()
    res = simulate_attack(trainer, blobs_fed, strategy, 2, attack=NaNAttack(), fraction=0.34)
    # Two malicious uploads per round are rejected by RoundTally; the others aggregate.
    assert [r["rejected"] for r in res.history] == [2, 2]
    assert [r["updates"] for r in res.history] == [4, 4]
    assert torch.isfinite(res.weights).all()


def test_simulate_attack_marks_the_run_and_measures_the_backdoor(blobs_fed):
    trainer = blobs_trainer()
    strategy = fm.FedAvg()
    res = simulate_attack(trainer, blobs_fed, strategy, 3, attack="backdoor", fraction=0.34,
                          seed=1)
    assert [r["attack_malicious_updates"] for r in res.history] == [2, 2, 2]
    asr = res.metric("backdoor_success_rate")
    assert len(asr) == 3 and all(0 <= a <= 1 for a in asr)
    report = res.guarantees["simulated_attack"]
    assert report["name"] == "backdoor" and report["malicious_clients"] == 2
    assert report["clients"] == 6
    assert strategy.server_stages == ()  # the caller's strategy is left as it was
    # Deterministic: the same seeds give the same model.
    again = simulate_attack(blobs_trainer(), blobs_fed, fm.FedAvg(), 3, attack="backdoor",
                            fraction=0.34, seed=1)
    assert torch.equal(res.weights, again.weights)


def test_simulate_attack_with_a_summing_inner_transport(blobs_fed):
    # Label flipping leaves uploads honest, so the batched transport may keep summing.
    trainer = blobs_trainer()
    res = simulate_attack(trainer, blobs_fed, fm.FedAvg(), 2, attack=LabelFlip(), fraction=0.5,
                          make_transport=lambda fed: fm.BatchedTransport(trainer, fed))
    assert [r["attack_malicious_updates"] for r in res.history] == [3, 3]
    with pytest.raises(ConfigError, match="attack"):
        simulate_attack(trainer, blobs_fed, fm.FedAvg(), 1, attack="nonsense")
    with pytest.raises(ConfigError, match="scale"):
        simulate_attack(trainer, blobs_fed, fm.FedAvg(), 1, attack=SignFlip(scale=0))


def test_sign_flipping_at_20_percent_hurts_plain_fedavg():
    torch.set_num_threads(1)
    train, test = load_digits()
    fed = partition(train, IID(), 10, 0, test=test, name="digits")

    def trainer() -> fm.TorchTrainer:
        return fm.TorchTrainer(lambda: MLP(64, [32], 10), lr=0.1, batch_size=16, epochs=1)

    clean = fm.simulate(trainer(), fed, fm.FedAvg(), 4, seed=0)
    attacked = simulate_attack(trainer(), fed, fm.FedAvg(), 4, attack=SignFlip(), fraction=0.2,
                               seed=0)
    assert attacked.history[-1]["attack_malicious_updates"] == 2
    # Two reversed updates among ten cancel two honest ones: a clearly slower descent.
    assert attacked.final["test_accuracy"] < clean.final["test_accuracy"] - 0.05
    assert attacked.final["test_loss"] > clean.final["test_loss"]


def _attack_exp(**attack):
    return validate({"rounds": 2, "seed": 3, "data": {"dataset": "digits"},
                     "partition": {"clients": 10}, "model": {"kind": "mlp", "hidden": [16]},
                     "attack": attack})


def test_attack_from_config_poisons_data_and_records_the_attack():
    exp = _attack_exp(kind="backdoor", fraction=0.2, target=7, poison_fraction=0.4)
    fed = build_data(exp)
    trainer = build_trainer(exp, fed)
    strategy = build_strategy(exp, fed)
    transport = build_transport(exp, fed, trainer, strategy)
    assert isinstance(transport, AdversarialTransport) and len(transport.malicious) == 2
    assert transport.attack == Backdoor(target=7, poison_fraction=0.4)
    assert isinstance(strategy.server_stages[-1], AttackMonitor)
    for cid in fed.client_ids:  # malicious clients hold target-labelled triggered samples
        triggered = np.all(fed.client(cid).train.x[:, [54, 55, 62, 63]] == 1.0, axis=1)
        assert triggered.any() == (cid in transport.malicious)
    res = fm.simulate(trainer, fed, strategy, 2, seed=3, transport=transport)
    assert "backdoor_success_rate" in res.final and res.final["attack_malicious_updates"] == 2
    assert res.guarantees["simulated_attack"]["target"] == 7
    with pytest.raises(ConfigError, match="strategy"):
        build_transport(exp, fed, trainer)


def test_attack_table_is_validated():
    assert _attack_exp(kind="alie", fraction=0.2)["attack"] == {"kind": "alie", "fraction": 0.2}
    cases = [
        ({"fraction": 0.2}, "attack.kind"),
        ({"kind": "alie"}, "attack.fraction"),
        ({"kind": "krum", "fraction": 0.2}, "attack.kind"),
        ({"kind": "alie", "fraction": 1.0}, "attack.fraction"),
        ({"kind": "alie", "fraction": 0.2, "epsilon": 0.1}, "attack.epsilon"),
        ({"kind": "sign_flip", "fraction": 0.2, "scale": -1}, "attack.scale"),
        ({"kind": "label_flip", "fraction": 0.2, "source": 1}, "attack.target"),
        ({"kind": "label_flip", "fraction": 0.2, "source": 1, "target": 1}, "attack.target"),
        ({"kind": "backdoor", "fraction": 0.2, "poison_fraction": 0}, "attack.poison_fraction"),
        ({"kind": "gaussian", "fraction": 0.2, "colour": "red"}, "attack.colour"),
    ]
    for attack, key in cases:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            _attack_exp(**attack)
    exp = _attack_exp(kind="backdoor", fraction=0.2, target=10)
    with pytest.raises(ConfigError, match=r"attack\.target"):
        build_data(exp)  # digits has 10 classes
    exp = _attack_exp(kind="sign_flip", fraction=0.01)
    with pytest.raises(ConfigError, match="fraction"):
        build_data(exp)  # 1% of 10 clients is nobody
    # Without the table the experiment's identity is what it was before attacks existed.
    plain = validate({"rounds": 2, "data": {"dataset": "digits"}})
    assert "attack" not in plain.identity()


def test_fedmosaic_run_with_an_attack_table_reports_it(tmp_path):
    import json

    from typer.testing import CliRunner

    from fedmosaic.cli import app

    cfg = tmp_path / "attacked.toml"
    cfg.write_text('rounds = 2\n[data]\ndataset = "digits"\n[partition]\nclients = 10\n'
                   '[model]\nhidden = [16]\n[attack]\nkind = "ipm"\nfraction = 0.3\n'
                   'epsilon = 2.0\n')
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(cfg), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "simulated attack: ipm on 3 of 10 clients" in result.output
    history = json.loads((out / "metrics.json").read_text())
    assert [r["attack_malicious_updates"] for r in history] == [3, 3]
    report = json.loads((out / "guarantees.json").read_text())["guarantees"]
    assert report["simulated_attack"]["name"] == "ipm"
    assert report["simulated_attack"]["epsilon"] == 2.0


def test_attackers_sit_below_secure_aggregation():
    from fedmosaic.privacy.secagg.transport import SecAggPlusTransport

    raw = {"rounds": 2, "data": {"dataset": "digits"}, "partition": {"clients": 10},
           "runtime": {"secure_aggregation": True}, "attack": {"kind": "sign_flip",
                                                               "fraction": 0.2}}
    exp = validate(raw)
    fed = build_data(exp)
    trainer = build_trainer(exp, fed)
    strategy = build_strategy(exp, fed)
    transport = build_transport(exp, fed, trainer, strategy)
    # Attackers are clients: their crafted updates are masked like everyone else's.
    assert isinstance(transport, SecAggPlusTransport)
    assert isinstance(transport.inner, AdversarialTransport)
    # ... and the run report says the run was attacked, next to what SecAgg+ protects.
    report = transport.guarantees()
    assert report["simulated_attack"]["malicious_clients"] == 2
    assert "secure_aggregation" in report
