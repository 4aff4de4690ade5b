import numpy as np
import pytest
import torch

import fedmosaic as fm
from fedmosaic.algorithms.strategy import ClientTask
from fedmosaic.core import ClientUpdate, RoundFailedError
from fedmosaic.core.errors import CheckpointError
from fedmosaic.models import MLP
from fedmosaic.runtime import ClientFailure, SequentialTransport
from fedmosaic.train import FitConfig


def _trainer():
    return fm.TorchTrainer(lambda: MLP(5, [8], 3), lr=0.1, batch_size=8)


def _strategy(**kw):
    kw.setdefault("clients_per_round", 4)
    return fm.FedAvg(**kw)


def test_fedavg_learns_and_records_round_metrics(blobs_fed):
    res = fm.simulate(_trainer(), blobs_fed, _strategy(), rounds=10, seed=0)
    assert len(res.history) == 10
    first, last = res.history[0], res.history[-1]
    assert last["test_accuracy"] > 0.8 and last["test_loss"] < first["test_loss"]
    spec_bytes = _trainer().spec.nbytes
    for rec in res.history:
        assert rec["clients_selected"] == 4 and rec["updates"] == 4
        assert rec["bytes_down"] == 4 * spec_bytes and rec["bytes_up"] == 4 * spec_bytes
        assert rec["wall_time"] > 0 and "train_loss" in rec


def test_one_round_equals_hand_computed_weighted_average(blobs_fed):
    tr = _trainer()
    w0 = tr.initial_weights(0)
    strategy = fm.FedAvg(fraction=1.0)
    res = fm.simulate(tr, blobs_fed, strategy, rounds=1, seed=0, initial_weights=w0)
    deltas, weights = [], []
    tasks = fm.FedAvg(fraction=1.0).configure_fit(1, blobs_fed.client_ids,
                                                  np.random.default_rng(0), run_seed=0)
    for task in tasks:
        data = blobs_fed.client(task.client_id).train
        deltas.append(tr.fit(w0, data, task.config).weights - w0)
        weights.append(len(data))
    expected = w0 + sum(w * d for w, d in zip(weights, deltas)) / sum(weights)
    assert torch.allclose(res.weights, expected, atol=1e-6)


def test_same_seed_same_result_and_other_seed_differs(blobs_fed):
    a = fm.simulate(_trainer(), blobs_fed, _strategy(), rounds=3, seed=1)
    b = fm.simulate(_trainer(), blobs_fed, _strategy(), rounds=3, seed=1)
    c = fm.simulate(_trainer(), blobs_fed, _strategy(), rounds=3, seed=2)
    assert torch.equal(a.weights, b.weights)
    assert a.metric("test_loss") == b.metric("test_loss")
    assert not torch.equal(a.weights, c.weights)


def test_fedprox_with_mu_zero_equals_fedavg_exactly(blobs_fed):
    a = fm.simulate(_trainer(), blobs_fed, fm.FedAvg(clients_per_round=3), rounds=3, seed=4)
    b = fm.simulate(_trainer(), blobs_fed, fm.FedProx(mu=0.0, clients_per_round=3), rounds=3,
                    seed=4)
    assert torch.equal(a.weights, b.weights)
    c = fm.simulate(_trainer(), blobs_fed, fm.FedProx(mu=1.0, clients_per_round=3), rounds=3,
                    seed=4)
    assert not torch.equal(a.weights, c.weights)


@pytest.mark.parametrize("opt", [fm.FedAdam(lr=0.05), fm.FedYogi(lr=0.05),
                                 fm.FedAdagrad(lr=0.2), fm.FedAvgM(lr=1.0, momentum=0.5)])
def test_server_optimizers_run_and_learn(blobs_fed, opt):
    res = fm.simulate(_trainer(), blobs_fed, _strategy(server_opt=opt), rounds=10, seed=0)
    assert res.final["test_accuracy"] > 0.7


def test_resume_after_interruption_gives_identical_model(blobs_fed, tmp_path):
    def strategy():
        return _strategy(server_opt=fm.FedAdam(lr=0.05), clients_per_round=3)

    full = fm.simulate(_trainer(), blobs_fed, strategy(), rounds=6, seed=3)
    fm.simulate(_trainer(), blobs_fed, strategy(), rounds=6, seed=3, out_dir=tmp_path,
                stop_after=2)
    resumed = fm.simulate(_trainer(), blobs_fed, strategy(), rounds=6, seed=3,
                          out_dir=tmp_path, resume=True)
    assert torch.equal(full.weights, resumed.weights)
    assert [r["round"] for r in resumed.history] == [1, 2, 3, 4, 5, 6]
    assert full.metric("test_loss") == resumed.metric("test_loss")
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "metrics.json").is_file()


def test_resume_refuses_a_different_experiment(blobs_fed, tmp_path):
    fm.simulate(_trainer(), blobs_fed, _strategy(), rounds=3, seed=3, out_dir=tmp_path,
                stop_after=1)
    with pytest.raises(CheckpointError, match="made with seed = 3; the experiment now says 4 "):
        fm.simulate(_trainer(), blobs_fed, _strategy(), rounds=3, seed=4, out_dir=tmp_path,
                    resume=True)


def test_corrupt_checkpoint_is_reported_not_loaded(blobs_fed, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        fm.simulate(_trainer(), blobs_fed, _strategy(), rounds=2, out_dir=tmp_path, resume=True)


class _HostileTransport(SequentialTransport):
    """Honest clients plus one that crashes and one that sends garbage."""

    def fit(self, weights, tasks, weighting=None):
        for i, result in enumerate(super().fit(weights, tasks, weighting)):
            if i == 0:
                yield ClientFailure(result.client_id, "connection lost")
            elif i == 1:
                result.delta = torch.full_like(result.delta, float("nan"))
                yield result
            elif i == 2:
                yield ClientUpdate(result.client_id, torch.zeros(3), 5, base_round=1)
            else:
                yield result


def test_failed_and_invalid_clients_are_skipped_not_fatal(blobs_fed):
    tr = _trainer()
    transport = _HostileTransport(tr, blobs_fed)
    res = fm.simulate(tr, blobs_fed, fm.FedAvg(fraction=1.0), rounds=2, transport=transport)
    for rec in res.history:
        assert rec["failures"] == 1 and rec["rejected"] == 2 and rec["updates"] == 3
    assert torch.isfinite(res.weights).all()


def test_round_fails_clearly_when_too_few_updates(blobs_fed):
    class Silent(SequentialTransport):
        def fit(self, weights, tasks, weighting=None):
            for t in tasks:
                yield ClientFailure(t.client_id, "timeout")

    tr = _trainer()
    with pytest.raises(RoundFailedError, match="0 valid updates"):
        fm.simulate(tr, blobs_fed, _strategy(), rounds=1, transport=Silent(tr, blobs_fed))


def test_client_exception_becomes_failure(blobs_fed):
    tr = _trainer()
    transport = SequentialTransport(tr, blobs_fed)
    task = ClientTask("nope", FitConfig(round=1))
    (out,) = list(transport.fit(tr.initial_weights(0), [task]))
    assert isinstance(out, ClientFailure) and out.client_id == "nope"


def test_stragglers_do_fewer_steps_or_are_dropped(blobs_fed):
    tr = _trainer()
    res = fm.simulate(tr, blobs_fed, _strategy(fraction=1.0, clients_per_round=None,
                                               stragglers=0.5), rounds=2, seed=0)
    assert all(r["updates"] == 6 for r in res.history)
    dropped = fm.simulate(tr, blobs_fed, _strategy(fraction=1.0, clients_per_round=None,
                                                   stragglers=0.5, drop_stragglers=True),
                          rounds=2, seed=0)
    assert all(r["updates"] == 3 for r in dropped.history)


def test_result_table_and_plot(blobs_fed, tmp_path):
    res = fm.simulate(_trainer(), blobs_fed, _strategy(), rounds=2)
    rows = res.table()
    assert rows[0][0] == "round" and len(rows) == 3
    path = res.plot(tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(res.state_dict()) == set(_trainer().spec.names)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_simulation_on_cuda_matches_cpu(blobs_fed):
    cpu = fm.simulate(_trainer(), blobs_fed, _strategy(server_opt=fm.FedAdam(lr=0.05)),
                      rounds=3, seed=0)
    gpu_trainer = fm.TorchTrainer(lambda: MLP(5, [8], 3), lr=0.1, batch_size=8, device="cuda")
    gpu = fm.simulate(gpu_trainer, blobs_fed, _strategy(server_opt=fm.FedAdam(lr=0.05)),
                      rounds=3, seed=0)
    assert torch.allclose(cpu.weights, gpu.weights, atol=1e-4)


def test_partial_aggregates_merge_to_the_same_model_as_individual_updates(blobs_fed):
    """A transport that sums on its side (like Ray actors) gives the same global model."""
    from fedmosaic.runtime import RoundTally

    class Summing(SequentialTransport):
        def fit(self, weights, tasks, weighting=None):
            assert weighting is not None
            halves = [tasks[: len(tasks) // 2], tasks[len(tasks) // 2 :]]
            for part in halves:
                tally = RoundTally(weighting, weights.numel(), part[0].config.round)
                for result in super().fit(weights, part):
                    tally.add(result)
                yield tally.to_partial()

    tr = _trainer()
    plain = fm.simulate(tr, blobs_fed, _strategy(), rounds=3, seed=0)
    summed = fm.simulate(tr, blobs_fed, _strategy(), rounds=3, seed=0,
                         transport=Summing(tr, blobs_fed))
    assert torch.allclose(plain.weights, summed.weights, atol=1e-6)
    assert [r["bytes_up"] for r in plain.history] == [r["bytes_up"] for r in summed.history]
    assert plain.metric("train_loss") == pytest.approx(summed.metric("train_loss"))


def test_duplicate_updates_from_one_client_are_rejected(blobs_fed):
    class Replaying(SequentialTransport):
        def fit(self, weights, tasks, weighting=None):
            for result in super().fit(weights, tasks, weighting):
                yield result
                yield result

    tr = _trainer()
    res = fm.simulate(tr, blobs_fed, _strategy(), rounds=1, transport=Replaying(tr, blobs_fed))
    assert res.history[0]["updates"] == 4 and res.history[0]["rejected"] == 4
