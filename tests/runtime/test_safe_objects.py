"""Objects reused across runs carry nothing over; an output directory is never silently
overwritten; a refused resume names what changed (issue #10, items 4 and 5)."""

from __future__ import annotations

import logging

import pytest
import torch

import fedmosaic as fm
from fedmosaic.core.errors import CheckpointError
from fedmosaic.models import MLP
from fedmosaic.privacy import DPFedAvg
from fedmosaic.robust import AnomalyDetector
from fedmosaic.runtime.checkpoint import describe_identity_change, load_checkpoint, save_checkpoint


def _trainer() -> fm.TorchTrainer:
    return fm.TorchTrainer(lambda: MLP(5, [8], 3), lr=0.1, epochs=1, batch_size=16)


def _same_runs(a: fm.RunResult, b: fm.RunResult) -> None:
    assert torch.equal(a.weights, b.weights)
    drop = {"wall_time"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in a.history] == \
           [{k: v for k, v in r.items() if k not in drop} for r in b.history]


STRATEGIES = {
    "fedadam": lambda: fm.FedAvg(clients_per_round=3, server_opt=fm.FedAdam(lr=0.05)),
    "fedavgm": lambda: fm.FedAvg(clients_per_round=3, server_opt=fm.FedAvgM(lr=1.0)),
    # Calibrated noise and an accountant: both are state a second run must not inherit.
    "dpfedavg": lambda: DPFedAvg(clip=1.0, delta=1e-5, target_epsilon=5.0, rounds=3,
                                 sampling="fixed", clients_per_round=3),
    "anomaly": lambda: fm.FedAvg(weighting="uniform", server_opt=fm.FedAdam(lr=0.05),
                                 anomaly=AnomalyDetector(quarantine_after=1)),
}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_one_strategy_object_gives_the_same_run_twice(blobs_fed, name):
    strategy = STRATEGIES[name]()
    first = fm.simulate(_trainer(), blobs_fed, strategy, rounds=3, seed=4)
    second = fm.simulate(_trainer(), blobs_fed, strategy, rounds=3, seed=4)
    fresh = fm.simulate(_trainer(), blobs_fed, STRATEGIES[name](), rounds=3, seed=4)
    _same_runs(first, second)
    _same_runs(first, fresh)
    if name == "dpfedavg":  # the accountant restarted: the second run reports one run's spend
        assert second.guarantees["differential_privacy"]["epsilon"] == pytest.approx(
            first.guarantees["differential_privacy"]["epsilon"])


def test_readme_sequence_quickstart_then_batched_transport(blobs_fed):
    """The README's own sequence: the quickstart, then the same strategy object on
    BatchedTransport. Before the fix the second run started from the first run's FedAdam
    moments (0.833 then 0.922 for the same seed); now both are the same run up to rounding."""
    trainer = _trainer()
    strategy = fm.FedAvg(clients_per_round=3, server_opt=fm.FedAdam(lr=0.05))
    first = fm.simulate(trainer, blobs_fed, strategy, rounds=3, seed=0)
    second = fm.simulate(trainer, blobs_fed, strategy, rounds=3, seed=0,
                         transport=fm.BatchedTransport(trainer, blobs_fed))
    assert torch.allclose(first.weights, second.weights, atol=1e-5)
    assert second.final["test_accuracy"] == pytest.approx(first.final["test_accuracy"],
                                                          abs=0.01)


def test_resume_with_a_reused_strategy_object(blobs_fed, tmp_path):
    """Interrupt and resume with the same object: the resume loads the checkpoint's state."""
    strategy = STRATEGIES["fedadam"]()
    whole = fm.simulate(_trainer(), blobs_fed, strategy, rounds=4, seed=1)
    fm.simulate(_trainer(), blobs_fed, strategy, rounds=4, seed=1, out_dir=tmp_path,
                stop_after=2)
    resumed = fm.simulate(_trainer(), blobs_fed, strategy, rounds=4, seed=1, out_dir=tmp_path,
                          resume=True)
    assert torch.equal(whole.weights, resumed.weights)


def test_a_second_fresh_run_of_one_server_starts_clean(blobs_fed):
    trainer, strategy = _trainer(), STRATEGIES["fedavgm"]()
    server = fm.Server(trainer=trainer, strategy=strategy, rounds=2, seed=3,
                       transport=fm.SequentialTransport(trainer, blobs_fed))
    a, b = server.run(), server.run()
    assert torch.equal(a.weights, b.weights)


def test_dp_sgd_trainer_accounting_restarts_with_each_run(blobs_fed):
    pytest.importorskip("opacus")
    from fedmosaic.train.dp_trainer import DPSGDTrainer

    trainer = DPSGDTrainer(lambda: MLP(5, [8], 3), lr=0.5, batch_size=16, noise_multiplier=1.0,
                           max_grad_norm=1.0, noise="seeded")
    strategy = fm.FedAvg(clients_per_round=2)
    fm.simulate(trainer, blobs_fed, strategy, rounds=2, seed=0)
    first = dict(trainer.client_epsilons())
    fm.simulate(trainer, blobs_fed, strategy, rounds=2, seed=0)
    assert first and trainer.client_epsilons() == pytest.approx(first)


def test_out_dir_holding_a_run_is_refused_without_resume_or_overwrite(blobs_fed, tmp_path):
    strategy = STRATEGIES["fedadam"]()
    first = fm.simulate(_trainer(), blobs_fed, strategy, rounds=2, seed=0, out_dir=tmp_path)
    with pytest.raises(CheckpointError) as info:
        fm.simulate(_trainer(), blobs_fed, strategy, rounds=2, seed=0, out_dir=tmp_path)
    assert str(info.value) == (f"{tmp_path} already holds a run; pass resume=True to continue "
                               "it or overwrite=True to replace it")
    assert load_checkpoint(tmp_path)["round"] == 2  # untouched
    again = fm.simulate(_trainer(), blobs_fed, strategy, rounds=1, seed=0, out_dir=tmp_path,
                        overwrite=True)
    assert load_checkpoint(tmp_path)["round"] == 1 and len(again.history) == 1
    assert not torch.equal(first.weights, again.weights)


def test_refused_resume_names_the_key_that_changed(blobs_fed, tmp_path):
    exp = {"train": {"lr": 0.05, "epochs": 1}, "": {"name": "x", "seed": 0}}
    fm.simulate(_trainer(), blobs_fed, STRATEGIES["fedadam"](), rounds=3, seed=0,
                out_dir=tmp_path, identity=exp, stop_after=1)
    changed = {"train": {"lr": 0.1, "epochs": 1}, "": {"name": "x", "seed": 0}}
    with pytest.raises(CheckpointError) as info:
        fm.simulate(_trainer(), blobs_fed, STRATEGIES["fedadam"](), rounds=3, seed=0,
                    out_dir=tmp_path, identity=changed, resume=True)
    assert str(info.value) == (f"cannot resume the run in {tmp_path}: the checkpoint was made "
                               "with train.lr = 0.05; the experiment now says 0.1 (a different "
                               "experiment)")
    # A change made only in Python (no experiment file) is named from the strategy.
    with pytest.raises(CheckpointError, match=r"strategy\.server_opt\.lr = 0\.05; the "
                                              r"experiment now says 0\.01 \(a different "
                                              r"experiment\)$"):
        fm.simulate(_trainer(), blobs_fed,
                    fm.FedAvg(clients_per_round=3, server_opt=fm.FedAdam(lr=0.01)), rounds=3,
                    seed=0, out_dir=tmp_path, identity=exp, resume=True)


def test_identity_change_wording():
    saved = {"user": {"train": {"lr": 0.05}, "strategy": {"name": "fedavg"}, "": {"seed": 0}},
             "seed": 0, "strategy": {"lr": None}, "spec": [["w", [3, 5]]]}
    now = {"user": {"train": {"lr": 0.1, "momentum": 0.9}, "strategy": {}, "": {"seed": 1}},
           "seed": 1, "strategy": {"lr": 0.3}, "spec": [["w", [3, 6]]]}
    # The experiment file's keys first, at most three, and the strategy's echo of them not
    # repeated; an empty table is as if absent.
    assert describe_identity_change(saved, now) == (
        "the checkpoint was made with seed = 0; the experiment now says 1; the checkpoint was "
        'made with strategy.name = "fedavg"; the experiment now does not set it; the checkpoint '
        "was made with train.lr = 0.05; the experiment now says 0.1 (and 2 more differences)")
    assert describe_identity_change(saved, saved) is None
    python_only = {**saved, "user": {}}
    assert describe_identity_change(python_only, {**now, "user": {}, "seed": 0}) == (
        "the checkpoint was made with strategy.lr = None; the experiment now says 0.3; the "
        "model's parameter layout differs (another architecture or data shape)")


def test_checkpoints_without_identity_detail_still_resume(blobs_fed, tmp_path):
    """Checkpoints written before the identity's parts were saved: same experiment resumes;
    a changed one gets the earlier generic refusal."""
    whole = fm.simulate(_trainer(), blobs_fed, STRATEGIES["fedadam"](), rounds=3, seed=2)
    fm.simulate(_trainer(), blobs_fed, STRATEGIES["fedadam"](), rounds=3, seed=2,
                out_dir=tmp_path, stop_after=2)
    ckpt = load_checkpoint(tmp_path)
    del ckpt["identity_detail"]
    del ckpt["format_version"]
    save_checkpoint(tmp_path, ckpt)
    resumed = fm.simulate(_trainer(), blobs_fed, STRATEGIES["fedadam"](), rounds=3, seed=2,
                          out_dir=tmp_path, resume=True)
    assert torch.equal(whole.weights, resumed.weights)
    fm.simulate(_trainer(), blobs_fed, STRATEGIES["fedadam"](), rounds=3, seed=2,
                out_dir=tmp_path, stop_after=2, overwrite=True)
    ckpt = load_checkpoint(tmp_path)
    del ckpt["identity_detail"]
    del ckpt["format_version"]
    save_checkpoint(tmp_path, ckpt)
    with pytest.raises(CheckpointError, match="belongs to a different experiment"):
        fm.simulate(_trainer(), blobs_fed, STRATEGIES["fedadam"](), rounds=3, seed=3,
                    out_dir=tmp_path, resume=True)


def test_resume_with_fewer_rounds_than_were_run_is_refused(blobs_fed, tmp_path):
    fm.simulate(_trainer(), blobs_fed, STRATEGIES["fedadam"](), rounds=3, seed=0,
                out_dir=tmp_path)
    with pytest.raises(CheckpointError) as info:
        fm.simulate(_trainer(), blobs_fed, STRATEGIES["fedadam"](), rounds=2, seed=0,
                    out_dir=tmp_path, resume=True)
    assert str(info.value) == (f"the run in {tmp_path} already completed 3 rounds; "
                               "rounds = 2 is fewer")


def test_more_clients_per_round_than_available_is_logged_and_recorded(blobs_fed, caplog):
    with caplog.at_level(logging.WARNING, logger="fedmosaic.runtime.server"):
        res = fm.simulate(_trainer(), blobs_fed, fm.FedAvg(clients_per_round=10), rounds=2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["clients_per_round = 10 but only 6 clients are available: the round "
                        "takes all of them (recorded as clients_available in each such round)"]
    assert [r["clients_available"] for r in res.history] == [6, 6]
    assert [r["clients_selected"] for r in res.history] == [6, 6]
    exact = fm.simulate(_trainer(), blobs_fed, fm.FedAvg(clients_per_round=6), rounds=1)
    assert "clients_available" not in exact.final
