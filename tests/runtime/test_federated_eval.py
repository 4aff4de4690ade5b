"""Federated evaluation: clients evaluate the global model on their local test splits and the
server records the sample-weighted mean (runtime/evaluation.py, Transport.evaluate)."""

import math

import numpy as np
import pytest
import torch

import fedmosaic as fm
from fedmosaic.core.errors import ConfigError
from fedmosaic.data import ClientData, FederatedDataset
from fedmosaic.models import MLP
from fedmosaic.runtime import BatchedTransport, ClientFailure, SequentialTransport
from fedmosaic.runtime.evaluation import EvalReport, FederatedEvaluation, weighted_metrics
from fedmosaic.train.base import TrainerWrapper
from tests.conftest import make_blobs

SIZES = [40, 25, 60, 13, 33, 50]
TEST_SIZES = [10, 7, 15, 3, 9, 12]


def _trainer():
    return fm.TorchTrainer(lambda: MLP(5, [8], 3), lr=0.1, batch_size=8)


@pytest.fixture
def local_fed() -> FederatedDataset:
    """Six clients of different sizes, each with a local test split, plus a global test set."""
    clients = [ClientData(f"c{i}", make_blobs(n, seed=i), make_blobs(t, seed=50 + i))
               for i, (n, t) in enumerate(zip(SIZES, TEST_SIZES))]
    return FederatedDataset(name="blobs", clients=clients, test=make_blobs(100, seed=99),
                            num_classes=3, feature_shape=(5,))


# -- aggregation -------------------------------------------------------------------------------
def test_sample_weighted_mean_is_exact_against_a_hand_computation():
    reports = [EvalReport("a", 10, {"loss": 0.5, "accuracy": 0.9}),
               EvalReport("b", 30, {"loss": 1.5, "accuracy": 0.6}),
               EvalReport("c", 60, {"loss": 1.0, "accuracy": 0.7, "f1": 0.4})]
    got = weighted_metrics(reports)
    assert got["loss"] == (10 * 0.5 + 30 * 1.5 + 60 * 1.0) / 100 == 1.1
    assert got["accuracy"] == pytest.approx((10 * 0.9 + 30 * 0.6 + 60 * 0.7) / 100, abs=0)
    assert got["f1"] == 0.4  # reported by c only: averaged over c only
    # Order-independent (exact sums).
    assert weighted_metrics(reports[::-1]) == got


def test_summarize_counts_only_valid_selected_reports_once():
    fe = FederatedEvaluation()
    results = [
        EvalReport("a", 10, {"accuracy": 1.0}),
        EvalReport("a", 90, {"accuracy": 0.0}),          # second report: ignored
        EvalReport("z", 50, {"accuracy": 0.0}),          # not selected: ignored
        EvalReport("b", 0, {"accuracy": 0.0}),           # no samples: invalid
        EvalReport("c", 5, {"accuracy": math.nan}),      # non-finite metric: invalid
        ClientFailure("d", "no local test split"),
        EvalReport("e", 30, {"accuracy": 0.5}),
    ]
    rec = fe.summarize(results, ["a", "b", "c", "d", "e", "f"], 3, model_bytes=100)
    assert rec == {"fed_eval_clients": 2, "fed_eval_samples": 40, "fed_eval_failures": 4,
                   "fed_eval_bytes_down": 600, "fed_test_accuracy": (10 + 15) / 40}


def test_below_min_clients_the_record_says_so_and_has_no_metrics():
    fe = FederatedEvaluation(min_clients=3)
    rec = fe.summarize([EvalReport("a", 10, {"accuracy": 1.0}),
                        ClientFailure("b", "boom")], ["a", "b", "c"], 1)
    assert rec["fed_eval_skipped"] == ("1 of 3 selected clients reported an evaluation, fewer "
                                       "than min_clients = 3")
    assert rec["fed_eval_clients"] == 1 and rec["fed_eval_failures"] == 2
    assert not any(k.startswith("fed_test_") for k in rec)


def test_a_transport_that_raises_midway_keeps_what_arrived():
    def results():
        yield EvalReport("a", 4, {"accuracy": 0.25})
        raise RuntimeError("connection lost")

    rec = FederatedEvaluation().summarize(results(), ["a", "b"], 1)
    assert rec["fed_test_accuracy"] == 0.25 and rec["fed_eval_failures"] == 1


def test_settings_are_validated():
    with pytest.raises(ValueError, match="at most one of fraction and clients"):
        FederatedEvaluation(fraction=0.5, clients=2)
    with pytest.raises(ValueError, match="fraction must be in"):
        FederatedEvaluation(fraction=0.0)
    with pytest.raises(ValueError, match="clients_per_round must be an integer >= 1"):
        FederatedEvaluation(clients=0)
    with pytest.raises(ValueError, match="min_clients must be an integer >= 1"):
        FederatedEvaluation(min_clients=0)


# -- selection ---------------------------------------------------------------------------------
def test_selection_is_seeded_per_round_and_sized_as_asked():
    ids = [f"c{i}" for i in range(20)]
    fe = FederatedEvaluation(clients=5)
    a = fe.select(ids, seed=3, round_num=2)
    assert a == fe.select(list(reversed(ids)), seed=3, round_num=2) == sorted(a)
    assert len(a) == 5 and len(set(a)) == 5
    assert len({tuple(fe.select(ids, seed=3, round_num=r)) for r in range(1, 11)}) > 5
    assert fe.select(ids, seed=4, round_num=2) != a
    assert len(FederatedEvaluation(fraction=0.26).select(ids, seed=0, round_num=1)) == 6
    assert FederatedEvaluation(clients=50).select(ids, seed=0, round_num=1) == sorted(ids)
    assert FederatedEvaluation().select(ids, seed=0, round_num=1) == sorted(ids)
    assert FederatedEvaluation().select([], seed=0, round_num=1) == []


# -- the server loop ---------------------------------------------------------------------------
def _hand_federated_accuracy(trainer, fed, weights, ids):
    num = den = 0.0
    for cid in ids:
        test = fed.client(cid).test
        num += len(test) * trainer.evaluate(weights, test)["accuracy"]
        den += len(test)
    return num / den


def test_records_and_same_model_with_and_without_federated_evaluation(local_fed):
    strategy = dict(clients_per_round=3)
    plain = fm.simulate(_trainer(), local_fed, fm.FedAvg(**strategy), rounds=4, seed=7)
    fe = FederatedEvaluation(clients=4)
    both = fm.simulate(_trainer(), local_fed, fm.FedAvg(**strategy), rounds=4, seed=7,
                       federated_eval=fe)
    assert torch.equal(plain.weights, both.weights)
    for a, b in zip(plain.history, both.history):
        assert a["test_accuracy"] == b["test_accuracy"]
        assert b["fed_eval_clients"] == 4 and b["fed_eval_failures"] == 0
    last = both.history[-1]
    ids = fe.select(local_fed.client_ids, seed=7, round_num=4)
    want = _hand_federated_accuracy(_trainer(), local_fed, both.weights, ids)
    assert last["fed_test_accuracy"] == pytest.approx(want, abs=1e-12)
    assert last["fed_eval_samples"] == sum(len(local_fed.client(c).test) for c in ids)
    assert "fed_test_loss" in last
    g = both.guarantees["federated_evaluation"]
    assert g["clients"] == {"clients": 4} and "without noise" in g["server_sees"]
    assert "federated evaluation" in both.guarantees["server_sees"]
    assert "federated_evaluation" not in plain.guarantees


def test_federated_only_runs_and_follows_eval_every(local_fed):
    res = fm.simulate(_trainer(), local_fed, fm.FedAvg(clients_per_round=3), rounds=5, seed=0,
                      eval_every=2, central_eval=False, federated_eval=FederatedEvaluation())
    assert [("fed_test_accuracy" in r) for r in res.history] == [False, True, False, True,
                                                                 True]
    assert not any("test_accuracy" in r for r in res.history)
    assert res.history[-1]["fed_eval_clients"] == 6


class _FailingEval(TrainerWrapper):
    """Raises when evaluating on the test split with exactly ``n`` samples."""

    def __init__(self, inner, n):
        super().__init__(inner)
        self.n = n

    def evaluate(self, weights, data):
        if len(data) == self.n:
            raise RuntimeError("disk on fire")
        return self.inner.evaluate(weights, data)


def test_missing_test_split_and_raising_trainer_are_failures_not_crashes(local_fed, caplog):
    local_fed.clients[1] = ClientData("c1", local_fed.clients[1].train)  # no test split
    trainer = _FailingEval(_trainer(), TEST_SIZES[2])
    transport = SequentialTransport(trainer, local_fed)
    w = trainer.initial_weights(0)
    results = {r.client_id: r for r in transport.evaluate(w, ["c0", "c1", "c2", "nobody"], 1)}
    assert results["c1"] == ClientFailure("c1", "no local test split")
    assert results["c2"] == ClientFailure("c2", "RuntimeError: disk on fire")
    assert isinstance(results["nobody"], ClientFailure)
    assert "KeyError" in results["nobody"].reason
    assert isinstance(results["c0"], EvalReport) and results["c0"].num_samples == TEST_SIZES[0]
    res = fm.simulate(trainer, local_fed, fm.FedAvg(clients_per_round=3), rounds=1, seed=0,
                      federated_eval=FederatedEvaluation())
    rec = res.history[0]
    assert rec["fed_eval_clients"] == 4 and rec["fed_eval_failures"] == 2
    ok = [c for c in local_fed.client_ids if c not in ("c1", "c2")]
    assert rec["fed_test_accuracy"] == pytest.approx(
        _hand_federated_accuracy(trainer.inner, local_fed, res.weights, ok), abs=1e-12)
    assert "disk on fire" in caplog.text


def test_batched_transport_reports_what_sequential_reports(local_fed):
    trainer = _trainer()
    w = trainer.initial_weights(1)
    ids = [*local_fed.client_ids, "ghost"]
    seq = list(SequentialTransport(trainer, local_fed).evaluate(w, ids, 1))
    bat = list(BatchedTransport(_trainer(), local_fed).evaluate(w, ids, 1))
    assert [type(r) for r in bat] == [type(r) for r in seq]
    for a, b in zip(seq, bat):
        assert a == b if isinstance(a, EvalReport) else a.client_id == b.client_id
    res = fm.simulate(_trainer(), local_fed, fm.FedAvg(clients_per_round=3), rounds=2, seed=0,
                      transport=BatchedTransport(_trainer(), local_fed),
                      federated_eval=FederatedEvaluation())
    ref = fm.simulate(_trainer(), local_fed, fm.FedAvg(clients_per_round=3), rounds=2, seed=0,
                      federated_eval=FederatedEvaluation())
    assert res.history[-1]["fed_test_accuracy"] == pytest.approx(
        ref.history[-1]["fed_test_accuracy"], abs=1e-5)


def test_resume_is_exact_with_federated_evaluation_on(local_fed, tmp_path):
    fe = FederatedEvaluation(fraction=0.5)
    full = fm.simulate(_trainer(), local_fed, fm.FedAvg(clients_per_round=3), rounds=4,
                       seed=5, federated_eval=fe)
    fm.simulate(_trainer(), local_fed, fm.FedAvg(clients_per_round=3), rounds=4, seed=5,
                federated_eval=fe, out_dir=tmp_path, stop_after=2)
    resumed = fm.simulate(_trainer(), local_fed, fm.FedAvg(clients_per_round=3), rounds=4,
                          seed=5, federated_eval=fe, out_dir=tmp_path, resume=True)
    assert torch.equal(full.weights, resumed.weights)
    keys = ("fed_test_accuracy", "fed_test_loss", "fed_eval_samples", "fed_eval_clients")
    assert [{k: r[k] for k in keys} for r in full.history] == \
        [{k: r[k] for k in keys} for r in resumed.history]
    # Switched off on resume: still the same model (evaluation is not part of the identity).
    fm.simulate(_trainer(), local_fed, fm.FedAvg(clients_per_round=3), rounds=4, seed=5,
                federated_eval=fe, out_dir=tmp_path / "b", stop_after=2)
    off = fm.simulate(_trainer(), local_fed, fm.FedAvg(clients_per_round=3), rounds=4, seed=5,
                      out_dir=tmp_path / "b", resume=True)
    assert torch.equal(full.weights, off.weights)


# -- guarantees and refusals -------------------------------------------------------------------
def test_refused_under_dp_and_for_a_transport_without_evaluate(local_fed):
    from fedmosaic.privacy.dp_fedavg import DPFedAvg

    dp = DPFedAvg(clip=1.0, noise_multiplier=1.0, delta=1e-5, sampling="fixed",
                  clients_per_round=3)
    with pytest.raises(ConfigError, match="off under central or distributed DP"):
        fm.simulate(_trainer(), local_fed, dp, rounds=1, federated_eval=FederatedEvaluation())

    class NoEval:
        def __init__(self, inner):
            self.inner = inner

        def available_clients(self):
            return self.inner.available_clients()

        def full_steps(self, c, cfg):
            return None

        def fit(self, weights, tasks, weighting=None):
            return self.inner.fit(weights, tasks, weighting)

    with pytest.raises(ConfigError, match=r"a transport with evaluate\(\) \(NoEval has none\)"):
        fm.simulate(_trainer(), local_fed, fm.FedAvg(), rounds=1,
                    transport=NoEval(SequentialTransport(_trainer(), local_fed)),
                    federated_eval=FederatedEvaluation())


def test_secure_aggregation_delegates_and_says_what_the_server_sees(local_fed):
    from fedmosaic.privacy.secagg.transport import SecAggPlusTransport

    transport = SecAggPlusTransport(SequentialTransport(_trainer(), local_fed), clip=10.0,
                                    max_weight=60.0, seed=1)
    res = fm.simulate(_trainer(), local_fed, fm.FedAvg(), rounds=1, seed=0,
                      transport=transport, federated_eval=FederatedEvaluation(clients=3))
    rec = res.history[0]
    assert rec["fed_eval_clients"] == 3 and "fed_test_accuracy" in rec
    sees = res.guarantees["server_sees"]
    assert sees.startswith("only the sum of the surviving clients' updates")
    assert sees.endswith("also each evaluating client's test metrics and test sample count "
                         "(federated evaluation)")


def test_adversarial_transport_passes_evaluation_through(local_fed):
    from fedmosaic.attacks import AdversarialTransport, make_attack

    inner = SequentialTransport(_trainer(), local_fed)
    adv = AdversarialTransport(inner, make_attack("sign_flip"), ["c0"])
    w = _trainer().initial_weights(0)
    assert list(adv.evaluate(w, ["c0", "c3"], 1)) == list(inner.evaluate(w, ["c0", "c3"], 1))


def test_local_dp_guarantee_lists_evaluation_metrics_as_not_covered(local_fed):
    from fedmosaic.privacy.local_dp import LocalDP

    strategy = fm.FedAvg(clients_per_round=2, client_stages=(LocalDP(clip=1.0,
                                                                     noise_multiplier=1.0),))
    res = fm.simulate(_trainer(), local_fed, strategy, rounds=1,
                      federated_eval=FederatedEvaluation())
    (ldp,) = res.guarantees["local_differential_privacy"]
    assert any("federated evaluation" in n for n in ldp["not_covered"])
    assert np.isfinite(res.history[0]["fed_test_loss"])


# -- Ray ---------------------------------------------------------------------------------------
@pytest.mark.slow  # starts a Ray instance and two actor processes (about 6-15 s on 2 cores)
def test_ray_transport_evaluates_on_its_actors(local_fed):
    ray = pytest.importorskip("ray")
    import functools
    import logging

    from fedmosaic.runtime.ray_transport import RayTransport

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False, configure_logging=False)
    # A partial of library callables: Ray pickles it by reference (importable by workers).
    factory = functools.partial(fm.TorchTrainer, functools.partial(MLP, 5, [8], 3), lr=0.1,
                                batch_size=8)
    local_fed.clients[3] = ClientData("c3", local_fed.clients[3].train)  # no test split
    try:
        with RayTransport(factory, local_fed, num_workers=2) as transport:
            w = factory().initial_weights(2)
            ids = local_fed.client_ids
            got = {r.client_id: r for r in transport.evaluate(w, ids, 1)}
            want = {r.client_id: r for r in
                    SequentialTransport(factory(), local_fed).evaluate(w, ids, 1)}
            assert got == want and got["c3"] == ClientFailure("c3", "no local test split")
            res = fm.simulate(factory(), local_fed, fm.FedAvg(clients_per_round=3), rounds=1,
                              seed=0, transport=transport, federated_eval=FederatedEvaluation())
            ref = fm.simulate(factory(), local_fed, fm.FedAvg(clients_per_round=3), rounds=1,
                              seed=0, federated_eval=FederatedEvaluation())
            for key in ("fed_eval_clients", "fed_eval_failures", "fed_eval_samples"):
                assert res.history[0][key] == ref.history[0][key]
            assert res.history[0]["fed_test_accuracy"] == pytest.approx(
                ref.history[0]["fed_test_accuracy"], abs=1e-5)
    finally:
        if started:
            ray.shutdown()


# -- configuration: [evaluation] ---------------------------------------------------------------
def _exp(data, **sections):
    from fedmosaic.config import validate

    return validate({"rounds": 2, "data": data, **sections})


FILES = {"dataset": "files", "clients": {"a": "a.csv", "b": "b.csv"}, "label": "y"}


@pytest.mark.parametrize(("data", "evaluation", "message"), [
    (FILES, {"central": True},
     "config key 'evaluation.central': got True; allowed: false: there is no central test set; "
     "add [data] test (the server's test set), or evaluate on the clients' local test splits "
     "(evaluation.federated)"),
    ({"dataset": "custom", "loader": "task:load", "clients": ["a"]}, {"central": True},
     "config key 'evaluation.central': got True; allowed: false: there is no central test set; "
     "add [data] test_loader (the server's test set), or evaluate on the clients' local test "
     "splits (evaluation.federated)"),
    ({**FILES, "test": "t.csv"}, {"federated": True},
     "config key 'evaluation.federated': got True; allowed: false: the clients have no local "
     "test splits; add [data] test_fraction (each client holds out that fraction of its data "
     "for evaluation)"),
    ({"dataset": "digits"}, {"federated": True},
     "config key 'evaluation.federated': got True; allowed: false: dataset 'digits' gives the "
     "clients no local test splits; use its central test set (evaluation.central), or dataset "
     "'files' or 'custom' with [data] test_fraction"),
    ({"dataset": "heart_disease"}, {"fraction": 0.5, "clients": 2},
     "config key 'evaluation.clients': got 2; allowed: only one of evaluation.fraction and "
     "evaluation.clients"),
    ({"dataset": "digits"}, {"clients": 2},
     "config key 'evaluation.clients': got 2; allowed: only with federated evaluation "
     "(evaluation.federated = true)"),
    ({"dataset": "heart_disease"}, {"federated": False, "min_clients": 2},
     "config key 'evaluation.min_clients': got 2; allowed: only with federated evaluation "
     "(evaluation.federated = true)"),
    ({"dataset": "heart_disease"}, {"fraction": 0},
     "config key 'evaluation.fraction': got 0; allowed: a number in (0, 1]"),
])
def test_config_refusals_name_what_to_add(data, evaluation, message):
    with pytest.raises(ConfigError) as err:
        _exp(data, evaluation=evaluation)
    assert str(err.value) == message


def test_config_refuses_federated_evaluation_under_central_dp():
    privacy = {"mode": "central", "clip": 1.0, "delta": 1e-5, "noise_multiplier": 1.0,
               "rate": 0.5}
    with pytest.raises(ConfigError) as err:
        _exp({"dataset": "heart_disease"}, privacy=privacy, evaluation={"federated": True})
    assert str(err.value) == (
        "config key 'evaluation.federated': got True; allowed: false under central DP: each "
        "client's evaluation metrics and test sample count would reach the server without "
        "noise, outside the DP accounting; evaluate on a central test set instead")
    from fedmosaic.build import build_evaluation

    exp = _exp({"dataset": "heart_disease"}, privacy=privacy)
    assert build_evaluation(exp) is None  # never on by default under DP


def test_build_evaluation_defaults_follow_the_data(local_fed):
    from fedmosaic.build import build_evaluation, central_evaluation

    # A central test set: central only, unless asked.
    exp = _exp({"dataset": "heart_disease"})
    assert central_evaluation(exp, local_fed) and build_evaluation(exp, local_fed) is None
    exp = _exp({"dataset": "heart_disease"}, evaluation={"federated": True, "clients": 2,
                                                         "min_clients": 2})
    fe = build_evaluation(exp, local_fed)
    assert (fe.clients, fe.fraction, fe.min_clients) == (2, None, 2)
    # No central test set, local splits: federated only.
    no_central = FederatedDataset(name="x", clients=local_fed.clients, test=None,
                                  num_classes=3, feature_shape=(5,))
    exp = _exp({**FILES, "test_fraction": 0.2})
    assert not central_evaluation(exp, no_central)
    assert build_evaluation(exp, no_central).fraction == 1.0
    # The data decides where the table cannot (a custom loader's own splits).
    exp = _exp({"dataset": "custom", "loader": "task:load", "clients": ["a"]},
               evaluation={"federated": True})
    bare = FederatedDataset(name="x", clients=[ClientData(c.client_id, c.train)
                                               for c in local_fed.clients],
                            test=None, num_classes=3, feature_shape=(5,))
    assert build_evaluation(exp, local_fed) is not None
    with pytest.raises(ConfigError, match="add \\[data\\] test_fraction"):
        build_evaluation(exp, bare)
    # Deployment (no federation at hand): the [data] table decides.
    assert build_evaluation(_exp({**FILES, "test_fraction": 0.2})) is not None
    # Client metrics suppressed (local DP here): not on by default, allowed when asked.
    ldp = {"mode": "local", "clip": 1.0, "noise_multiplier": 1.0, "client_metrics": "suppress"}
    assert build_evaluation(_exp({**FILES, "test_fraction": 0.2}, privacy=ldp)) is None
    assert build_evaluation(_exp({**FILES, "test_fraction": 0.2}, privacy=ldp,
                                 evaluation={"federated": True})) is not None


def test_evaluation_table_is_not_part_of_the_resume_identity():
    a = _exp({"dataset": "heart_disease"})
    b = _exp({"dataset": "heart_disease"}, evaluation={"federated": True, "fraction": 0.5})
    assert a.identity() == b.identity()


# -- display -----------------------------------------------------------------------------------
def test_progress_line_and_plot_fall_back_to_federated_accuracy(tmp_path, capsys):
    from fedmosaic.cli import RoundProgress
    from fedmosaic.runtime.result import default_plot_metrics

    rec = {"round": 2, "fed_test_accuracy": 0.8125, "fed_test_loss": 0.5, "wall_time": 0.1}
    with RoundProgress(3, 1, "x") as progress:
        progress(rec)
    assert "fed acc 0.8125" in capsys.readouterr().out
    assert default_plot_metrics({"r": [rec]}) == ("fed_test_accuracy", "fed_test_loss")
    both = {**rec, "test_accuracy": 0.7}
    assert default_plot_metrics({"r": [both]}) == ("test_accuracy", "test_loss")


def test_fedmosaic_run_with_federated_evaluation_only(tmp_path):
    import json

    from typer.testing import CliRunner

    from fedmosaic.cli import app

    cfg = tmp_path / "exp.toml"
    cfg.write_text('name = "fe"\nrounds = 3\neval_every = 2\n[data]\ndataset = "heart_disease"\n'
                   "[model]\nkind = \"logreg\"\n[evaluation]\ncentral = false\n"
                   "federated = true\nmin_clients = 4\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", str(cfg), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "fed acc" in res.output
    history = json.loads((out / "metrics.json").read_text())
    assert [("fed_test_accuracy" in r) for r in history] == [False, True, True]
    assert not any("test_accuracy" in r for r in history)
    assert history[-1]["fed_eval_clients"] == 4 and history[-1]["fed_eval_failures"] == 0
    guarantees = json.loads((out / "guarantees.json").read_text())["guarantees"]
    assert guarantees["federated_evaluation"]["min_clients"] == 4


def test_a_transport_whose_evaluate_raises_costs_the_reports_not_the_round(local_fed):
    class Broken(SequentialTransport):
        def evaluate(self, weights, client_ids, round_num):  # raises on the call itself
            raise ConnectionError("evaluation service down")

    res = fm.simulate(_trainer(), local_fed, fm.FedAvg(clients_per_round=3), rounds=2, seed=0,
                      transport=Broken(_trainer(), local_fed),
                      federated_eval=FederatedEvaluation())
    ref = fm.simulate(_trainer(), local_fed, fm.FedAvg(clients_per_round=3), rounds=2, seed=0)
    assert torch.equal(res.weights, ref.weights)
    rec = res.history[-1]
    assert rec["fed_eval_clients"] == 0 and rec["fed_eval_failures"] == 6
    assert rec["fed_eval_skipped"] == ("0 of 6 selected clients reported an evaluation, fewer "
                                       "than min_clients = 1")
