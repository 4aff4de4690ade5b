"""Robust aggregation and anomaly detection inside real runs (digits, small MLP)."""

import pytest
import torch

import fedmosaic as fm
from fedmosaic.core import ConfigError
from fedmosaic.data import IID, load_digits, partition
from fedmosaic.models import MLP
from fedmosaic.privacy import DPFedAvg
from fedmosaic.privacy.secagg.transport import SecAggPlusTransport
from fedmosaic.robust import (
    AnomalyDetector,
    IndividualUpdates,
    RobustPreconditionError,
    make_robust,
)
from fedmosaic.runtime import ClientFailure, RoundTally, SequentialTransport

ROUNDS = 8
BAD = "client_03"


@pytest.fixture(scope="module")
def fed():
    # Module fixtures run before conftest's per-test single-thread fixture.
    torch.set_num_threads(1)
    train, test = load_digits()
    return partition(train, IID(), 10, seed=0, test=test, name="digits")


def _trainer():
    return fm.TorchTrainer(lambda: MLP(64, [32], 10), lr=0.3, batch_size=32)


class Garbage(SequentialTransport):
    """Honest clients, except one that always uploads its update flipped and boosted 20x."""

    def fit(self, weights, tasks, weighting=None):
        for result in super().fit(weights, tasks, weighting):
            if getattr(result, "client_id", None) == BAD:
                result.delta = result.delta * -20.0
            yield result


def _run(fed, strategy, *, attacked=True, rounds=ROUNDS, **kw):
    tr = _trainer()
    transport = Garbage(tr, fed) if attacked else SequentialTransport(tr, fed)
    return fm.simulate(tr, fed, strategy, rounds=rounds, seed=0, transport=transport, **kw)


@pytest.fixture(scope="module")
def clean_accuracy(fed):
    return _run(fed, fm.FedAvg(weighting="uniform"), attacked=False).final["test_accuracy"]


def test_attack_ruins_plain_fedavg_but_not_a_robust_rule(fed, clean_accuracy):
    assert clean_accuracy > 0.8
    plain = _run(fed, fm.FedAvg(weighting="uniform"))
    assert plain.final["test_accuracy"] < 0.5
    strategy = fm.FedAvg(weighting="uniform", robust=make_robust("trimmed_mean", f=1))
    assert not strategy.aggregator.streaming  # transports hand over individual updates
    robust = _run(fed, strategy)
    assert robust.final["test_accuracy"] > clean_accuracy - 0.05
    rec = robust.history[-1]
    assert rec["robust_trimmed_per_side"] == 1.0 and rec["updates"] == 10
    assert robust.guarantees["robustness"]["aggregator"]["name"] == "trimmed_mean"


def test_anomaly_detection_quarantines_the_garbage_client(fed, clean_accuracy):
    res = _run(fed, fm.FedAvg(weighting="uniform", robust=make_robust("trimmed_mean", f=1),
                              anomaly=AnomalyDetector(quarantine_after=3)))
    flagged_rounds = [r["round"] for r in res.history if BAD in r["anomaly_flagged_ids"]]
    assert flagged_rounds[:3] == [1, 2, 3]
    assert res.history[2]["anomaly_newly_quarantined_ids"] == [BAD]
    # Quarantined: no longer selected from round 4 on.
    assert all(r["clients_selected"] == 9 and r["anomaly_quarantined"] == 1
               for r in res.history[3:])
    report = res.guarantees["robustness"]["anomaly"]
    assert report["quarantined"] == [BAD]
    assert report["reputations"][BAD] < 0.5 < min(v for c, v in report["reputations"].items()
                                                  if c != BAD)
    assert res.final["test_accuracy"] > clean_accuracy - 0.05
    assert all(r["anomaly_cos_min"] < 0 for r in res.history[:3])  # the flipped update


def test_anomaly_detection_alone_scores_against_the_median(fed):
    """Without a robust rule the detector still quarantines (the mean is used meanwhile)."""
    res = _run(fed, fm.FedAvg(weighting="uniform", anomaly=AnomalyDetector(quarantine_after=2)),
               rounds=3)
    assert res.history[1]["anomaly_newly_quarantined_ids"] == [BAD]
    assert res.history[2]["clients_selected"] == 9


def test_robust_rule_composes_with_a_server_optimizer(fed):
    def strategy():
        return fm.FedAvg(weighting="uniform", robust=make_robust("median", f=1),
                         server_opt=fm.FedAvgM(lr=1.0, momentum=0.5))

    res = _run(fed, strategy(), rounds=4)
    assert res.final["test_accuracy"] > 0.7
    # The optimizer applied exactly the median: redo one round by hand.
    tr = _trainer()
    w0 = tr.initial_weights(0)
    one = _run(fed, strategy(), rounds=1)
    s = strategy()
    tasks = s.configure_fit(1, fed.client_ids, __import__("numpy").random.default_rng(0),
                            run_seed=0)
    deltas = torch.stack([u.delta for u in Garbage(tr, fed).fit(w0, tasks)])
    expected = s.server_opt.step(w0, deltas.median(dim=0).values.clone()
                                 if len(deltas) % 2 else
                                 deltas.sort(dim=0).values[4:6].mean(dim=0))
    assert torch.allclose(one.weights, expected, atol=1e-6)


def test_resume_keeps_reputations_and_centered_clip_state(fed, tmp_path):
    def strategy():
        return fm.FedAvg(weighting="uniform", robust=make_robust("centered_clip", tau=2.0),
                         anomaly=AnomalyDetector(quarantine_after=2))

    full = _run(fed, strategy(), rounds=5)
    _run(fed, strategy(), rounds=5, out_dir=tmp_path, stop_after=2)
    resumed = _run(fed, strategy(), rounds=5, out_dir=tmp_path, resume=True)
    assert torch.equal(full.weights, resumed.weights)
    assert full.guarantees["robustness"] == resumed.guarantees["robustness"]
    assert resumed.guarantees["robustness"]["anomaly"]["quarantined"] == [BAD]


def test_rounds_with_too_few_updates_for_the_rule_leave_the_model_unchanged(fed):
    class Flaky(SequentialTransport):
        def fit(self, weights, tasks, weighting=None):
            for i, result in enumerate(super().fit(weights, tasks, weighting)):
                yield ClientFailure(result.client_id, "lost") if i >= 4 else result

    tr = _trainer()
    w0 = tr.initial_weights(0)
    res = fm.simulate(tr, fed, fm.FedAvg(robust=make_robust("krum", f=2)), rounds=1,
                      transport=Flaky(tr, fed), initial_weights=w0)
    assert res.history[0]["robust_skipped"] == 1 and res.history[0]["updates"] == 4
    assert torch.equal(res.weights, w0)


def test_cohort_that_cannot_meet_the_precondition_is_refused_up_front(fed):
    with pytest.raises(RobustPreconditionError, match=r"n >= 4f \+ 3"):
        fm.FedAvg(clients_per_round=9, robust=make_robust("bulyan", f=2))
    strategy = fm.FedAvg(fraction=0.5, robust=make_robust("krum", f=2))
    with pytest.raises(RobustPreconditionError, match=r"n=5"):
        _run(fed, strategy, rounds=1)


def test_secure_aggregation_refuses_robust_and_anomaly_strategies(fed):
    tr = _trainer()
    for strategy in (fm.FedAvg(robust=make_robust("median")),
                     fm.FedAvg(anomaly=AnomalyDetector())):
        transport = SecAggPlusTransport(SequentialTransport(tr, fed), seed=0)
        with pytest.raises(ConfigError, match="robust aggregation"):
            fm.simulate(tr, fed, strategy, rounds=1, transport=transport)


def test_tally_keeps_updates_only_for_robust_weightings(fed):
    tr = _trainer()
    w0 = tr.initial_weights(0)
    tasks = fm.FedAvg().configure_fit(1, fed.client_ids[:3],
                                      __import__("numpy").random.default_rng(0), run_seed=0)
    updates = list(SequentialTransport(tr, fed).fit(w0, tasks))
    plain = RoundTally(fm.FedAvgAggregator(), w0.numel(), 1)
    kept = RoundTally(IndividualUpdates(), w0.numel(), 1)
    for u in updates:
        plain.add(u)
        kept.add(u)
    assert plain.updates == [] and len(kept.updates) == 3
    deltas, weights, ids = kept.stacked_updates()
    assert deltas.shape == (3, w0.numel()) and ids == [u.client_id for u in updates]
    assert torch.allclose(weights.float(), torch.tensor([float(u.num_samples) for u in updates]))
    # A partial sum cannot be split back into updates: refused, not merged.
    fresh = RoundTally(IndividualUpdates(), w0.numel(), 1)
    fresh.add(plain.to_partial())
    assert fresh.count == 0 and "needs each update" in fresh.rejected[-1]


def test_central_dp_composes_only_with_norm_bounding(fed):
    common = dict(clip=1.0, delta=1e-5, noise_multiplier=1.0, sampling="fixed",
                  clients_per_round=10)
    for robust in (make_robust("krum", f=1), make_robust("median"), make_robust("fltrust")):
        with pytest.raises(ConfigError, match="'norm_bound' only under central DP"):
            DPFedAvg(**common, robust=robust)
    with pytest.raises(ConfigError, match="no anomaly detection under central DP"):
        DPFedAvg(**common, anomaly=AnomalyDetector())
    with pytest.raises(ConfigError, match="noise_std"):
        DPFedAvg(**common, robust=make_robust("norm_bound", max_norm=0.5, noise_std=0.1))
    # norm_bound tighter than the clip: updates clipped to 0.1 and the noise scaled to 0.1.
    bounded = DPFedAvg(**common, robust=make_robust("norm_bound", max_norm=0.1))
    plain = DPFedAvg(**{**common, "clip": 0.1})
    a = _run(fed, bounded, attacked=False, rounds=2)
    b = _run(fed, plain, attacked=False, rounds=2)
    assert torch.equal(a.weights, b.weights)
    assert a.history[-1]["dp_clip"] == 0.1 and a.history[-1]["dp_epsilon"] == \
        b.history[-1]["dp_epsilon"]
    assert a.guarantees["robustness"]["aggregator"]["name"] == "norm_bound"
