"""The [robust] and [anomaly] experiment sections: validation, building, a run from config."""

import pytest
import torch

from fedmosaic.build import build_data, build_root_data, build_strategy, build_trainer
from fedmosaic.config import validate
from fedmosaic.core import ConfigError
from fedmosaic.data import load_digits
from fedmosaic.robust import AnomalyDetector, FLTrust, Krum, NormBound
from fedmosaic.runtime import simulate


def _base(**sections):
    raw = {"rounds": 2, "data": {"dataset": "digits"}, "partition": {"clients": 8},
           "model": {"hidden": [16]}}
    raw.update(sections)
    return raw


@pytest.mark.parametrize(("raw", "key", "fragment"), [
    (_base(robust={"f": 1}), "robust.aggregator", "required"),
    (_base(robust={"aggregator": "mean"}), "robust.aggregator", "'krum'"),
    (_base(robust={"aggregator": "krum", "f": -1}), "robust.f", ">= 0"),
    (_base(robust={"aggregator": "krum", "tau": 1.0}), "robust.tau", "for aggregator 'krum'"),
    (_base(robust={"aggregator": "norm_bound"}), "robust.max_norm", "required"),
    (_base(robust={"aggregator": "centered_clip"}), "robust.tau", "required"),
    (_base(robust={"aggregator": "trimmed_mean", "beta": 0.5}), "robust.beta", "[0, 0.5)"),
    (_base(robust={"aggregator": "bulyan", "f": 2}, strategy={"clients_per_round": 9}),
     "robust.f", "n >= 4f + 3"),
    (_base(robust={"aggregator": "median"}, runtime={"secure_aggregation": True}),
     "robust.aggregator", "secure aggregation"),
    (_base(robust={"aggregator": "krum", "f": 1},
           privacy={"mode": "central", "clip": 1.0, "delta": 1e-5, "noise_multiplier": 1.0,
                    "rate": 0.5}),
     "robust.aggregator", "central DP"),
    (_base(anomaly={"z_threshold": 3.0}), "anomaly.z_threshold", "enabled = true"),
    (_base(anomaly={"enabled": True, "cos_threshold": 2}), "anomaly.cos_threshold", "[-1, 1]"),
    (_base(anomaly={"enabled": True, "quarantine_after": 0}), "anomaly.quarantine_after",
     ">= 1"),
    (_base(anomaly={"enabled": True}, runtime={"secure_aggregation": True}),
     "anomaly.enabled", "secure aggregation"),
])
def test_bad_robust_and_anomaly_sections_are_refused(raw, key, fragment):
    with pytest.raises(ConfigError) as info:
        validate(raw)
    assert info.value.key == key and fragment in str(info.value)


def test_sections_build_the_rule_and_the_detector():
    exp = validate(_base(robust={"aggregator": "krum", "f": 1},
                         anomaly={"enabled": True, "quarantine_after": 2,
                                  "quarantine_rounds": 5}))
    s = build_strategy(exp)
    assert isinstance(s.robust, Krum) and s.robust.f == 1
    assert isinstance(s.anomaly, AnomalyDetector) and s.anomaly.quarantine_rounds == 5
    assert s.describe()["robust"] == {"name": "krum", "f": 1}
    dp = validate(_base(robust={"aggregator": "norm_bound", "max_norm": 0.5},
                        privacy={"mode": "central", "clip": 1.0, "delta": 1e-5,
                                 "noise_multiplier": 1.0, "rate": 0.5}))
    s = build_strategy(dp)
    assert isinstance(s.norm_bound, NormBound) and s.clip_aggregator.bound == 0.5


def test_no_section_keeps_the_resume_identity():
    assert "robust" not in validate(_base()).identity()
    assert "anomaly" not in validate(_base()).identity()
    assert validate(_base(robust={"aggregator": "median"})).identity()["robust"] == {
        "aggregator": "median"}


def test_fltrust_root_set_is_held_out_of_training_not_taken_from_the_test_set():
    exp = validate(_base(robust={"aggregator": "fltrust", "root_samples": 40}))
    assert exp["robust"]["root_samples"] == 40
    assert validate(_base(robust={"aggregator": "fltrust"}))["robust"]["root_samples"] == 100
    fed, root = build_data(exp), build_root_data(exp)
    train, test = load_digits()
    assert len(root) == 40 and sum(fed.sizes().values()) == len(train) - 40
    assert torch.equal(torch.from_numpy(fed.test.x), torch.from_numpy(test.x))
    # Disjoint from every client's data: no root row appears in a client's train set.
    client_rows = {r.tobytes() + bytes([int(y)]) for c in fed.clients
                   for r, y in zip(c.train.x, c.train.y)}
    root_rows = [r.tobytes() + bytes([int(y)]) for r, y in zip(root.x, root.y)]
    train_counts = {}
    for r, y in zip(train.x, train.y):
        key = r.tobytes() + bytes([int(y)])
        train_counts[key] = train_counts.get(key, 0) + 1
    # (digits has a few duplicate images; a root row may reappear only as such a duplicate)
    assert all(k not in client_rows or train_counts[k] > 1 for k in root_rows)


def test_a_run_from_config_with_fltrust_and_anomaly_detection():
    exp = validate(_base(rounds=3, seed=1, robust={"aggregator": "fltrust", "root_samples": 50},
                         anomaly={"enabled": True},
                         strategy={"weighting": "uniform"}, train={"lr": 0.3}))
    fed = build_data(exp)
    strategy = build_strategy(exp, fed)
    assert isinstance(strategy.robust, FLTrust) and len(strategy.robust.root_data) == 50
    res = simulate(build_trainer(exp, fed), fed, strategy, 3, seed=1)
    # FLTrust rescales every update to the norm of the server's (a 50-sample root set takes
    # few local steps), so it learns more slowly than FedAvg, but it learns.
    losses = res.metric("test_loss")
    assert losses[-1] < losses[0] and res.final["test_accuracy"] > 0.3
    assert all("robust_zero_trust" in r and "anomaly_flagged" in r for r in res.history)
    assert res.guarantees["robustness"]["aggregator"]["root_samples"] == 50
