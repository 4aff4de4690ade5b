"""transport = "auto" (issue #23): the choice for each case, its record, config and build."""

import json
from functools import partial

import numpy as np
import pytest
import torch

import fedmosaic as fm
from fedmosaic.config import validate
from fedmosaic.core import ConfigError
from fedmosaic.data import ArrayDataset, ClientData, FederatedDataset
from fedmosaic.models import MLP, SmallCNN
from fedmosaic.runtime import auto
from fedmosaic.runtime.auto import Workload, choose_transport, decide, estimate_seconds
from fedmosaic.runtime.batched import BatchingFallbackWarning
from fedmosaic.runtime.schedule import FedAsyncSchedule, FedBuffSchedule
from fedmosaic.train.base import TrainerWrapper
from tests.conftest import make_blobs

# The compute-bound task of issue #23 (Fashion-MNIST, SmallCNN: 1.05 M forward MACs a sample,
# 600 samples a client, 19 steps of 32) and the digits peer task (MLP 64-64-10: 4,736 MACs,
# 1-15 samples a client, one step).
CNN_100_100 = Workload(clients_per_round=100, steps_per_client=19, samples_per_round=60_000,
                       rounds=3, macs_per_sample=1.05e6)
MLP_1000_1000 = Workload(clients_per_round=1000, steps_per_client=1, samples_per_round=1437,
                         rounds=2, macs_per_sample=4736)


def test_cnn_on_cpu_with_two_cores_is_parallel():
    choice = decide(CNN_100_100, cores=2, model="conv")
    assert choice.kind == "parallel" and choice.workers == 2
    assert "batched" in choice.ruled_out and "convolution" in choice.ruled_out["batched"]
    assert choice.estimates["parallel"] < choice.estimates["sequential"]
    assert "fastest by estimate" in choice.reason and "2 usable cores" in choice.reason


def test_small_mlp_is_batched_and_the_cheapest_estimate_wins():
    choice = decide(MLP_1000_1000, cores=2, model="chain")
    assert choice.kind == "batched"
    assert set(choice.estimates) == {"sequential", "batched", "parallel", "parallel-batched"}
    assert choice.estimates["batched"] == min(choice.estimates.values())
    # Enough compute per client and rounds: the batched cohort split over both cores wins.
    heavy = Workload(clients_per_round=200, steps_per_client=20, samples_per_round=128_000,
                     rounds=50, macs_per_sample=1e6)
    assert decide(heavy, cores=2, model="chain").kind == "parallel-batched"


def test_gpu_is_batched_unless_batching_cannot_reproduce_the_trainer():
    assert decide(CNN_100_100, device="cuda", cores=16, model="conv").kind == "batched"
    choice = decide(CNN_100_100, device="cuda:0", cores=16, model="conv",
                    batched_blocker="the local optimizer is not plain SGD")
    assert choice.kind == "sequential" and "plain SGD" in choice.reason


def test_one_core_never_parallel():
    choice = decide(CNN_100_100, cores=1, model="conv")
    assert choice.kind == "sequential" and choice.ruled_out["parallel"] == "one usable core"
    assert decide(CNN_100_100, cores=8, model="conv", max_workers=1).kind == "sequential"
    assert decide(CNN_100_100, cores=8, model="conv", max_workers=3).workers == 3


def test_a_tiny_run_is_not_worth_the_workers_start_up():
    tiny = Workload(clients_per_round=10, steps_per_client=2, samples_per_round=600,
                    rounds=1, macs_per_sample=1.05e6)
    choice = decide(tiny, cores=2, model="conv")
    assert choice.kind == "sequential"
    assert choice.estimates["parallel"] > choice.estimates["sequential"] + 1.0
    with pytest.raises(ValueError, match="unknown transport kind"):
        estimate_seconds("grpc", tiny)


def _images(clients: int = 4, n: int = 32) -> FederatedDataset:
    rng = np.random.default_rng(0)
    parts = [ClientData(f"c{i}", ArrayDataset(rng.random((n, 1, 28, 28), dtype=np.float32),
                                              rng.integers(0, 10, n).astype(np.int64)))
             for i in range(clients)]
    return FederatedDataset(name="images", clients=parts, test=parts[0].train, num_classes=10,
                            feature_shape=(1, 28, 28))


def test_choose_reads_the_model_and_refuses_workers_an_unpicklable_trainer():
    fed = _images(n=96)  # 3 steps of 32 a client: enough compute for workers to pay
    strategy = fm.FedAvg(fraction=1.0)
    ok = choose_transport(fm.TorchTrainer(SmallCNN, lr=0.05), fed, strategy, 1000, cores=2)
    assert ok.kind == "parallel"
    # SmallCNN's forward MACs a sample: conv 16x24x24 outputs x 25, conv 32x8x8 x 400,
    # linear 512x128 and 128x10.
    macs = 16 * 24 * 24 * 25 + 32 * 8 * 8 * 400 + 512 * 128 + 128 * 10
    assert auto._model_facts(fm.TorchTrainer(SmallCNN), fed) == ("conv", macs, "cpu")
    bad = choose_transport(fm.TorchTrainer(lambda: SmallCNN(), lr=0.05), fed, strategy, 1000,
                           cores=2)
    assert bad.kind == "sequential" and "pickle" in bad.ruled_out["parallel"]
    assert "pickle" in bad.reason
    mlp = choose_transport(fm.TorchTrainer(partial(MLP, 784, [8], 10)), fed, strategy, 1000,
                           cores=1)
    assert mlp.kind == "batched" and "parallel" in mlp.ruled_out


class _Accounting(TrainerWrapper):
    """A trainer with per-client privacy accounting, as DP-SGD's."""

    def accounting_state(self) -> dict:
        return {}


def test_unsound_combinations_pick_a_transport_that_supports_them():
    fed = _images()
    tr = fm.TorchTrainer(SmallCNN, lr=0.05)
    dp = choose_transport(_Accounting(tr), fed, fm.FedAvg(fraction=1.0), 1000, cores=2)
    assert dp.kind == "sequential" and "accounting" in dp.ruled_out["parallel"]
    assert "TorchTrainer" in dp.ruled_out["batched"]
    buff = choose_transport(tr, fed, fm.FedAvg(), 1000, cores=2,
                            schedule=FedBuffSchedule(buffer_size=2, concurrency=4))
    assert buff.kind == "sequential" and "fedbuff" in buff.ruled_out["parallel"]
    chain = fm.TorchTrainer(partial(MLP, 784, [8], 10))
    fedasync = choose_transport(chain, fed, fm.FedAvg(), 1000, cores=2,
                                schedule=FedAsyncSchedule(alpha=0.5, concurrency=2))
    assert fedasync.kind == "sequential" and "nothing to batch" in fedasync.ruled_out["batched"]
    marked = fm.FedAvg(fraction=1.0, dispatch_transform=lambda cid, w: w)
    fp = choose_transport(chain, fed, marked, 1000, cores=2)
    assert fp.kind == "sequential" and "dispatch" in fp.ruled_out["batched"]
    assert "dispatch_transform cannot be pickled" in fp.ruled_out["parallel"]
    secret = choose_transport(tr, fed, fm.FedAvg(), 1000, cores=2,
                              constraints={"x": "not with this"})
    assert secret.kind == "sequential" and secret.ruled_out["parallel"] == "not with this"


def _base(**sections):
    raw = {"rounds": 2, "data": {"dataset": "digits"}, "partition": {"clients": 4}}
    raw.update(sections)
    return raw


def test_config_default_is_auto_and_old_configs_stay_valid():
    exp = validate(_base())
    assert exp["runtime"]["transport"] == "auto"
    for rt in ({"transport": "sequential"}, {"transport": "batched", "memory_budget_mb": 64.0},
               {"transport": "ray", "workers": 2}, {"transport": "auto", "workers": 2},
               {"transport": "parallel", "workers": 2, "inner": "batched"},
               {"transport": "batched", "batching": "always"}):
        other = validate(_base(runtime=rt))
        assert other.identity() == exp.identity()  # the transport never changes the model
    for rt, key in (({"transport": "parallel", "memory_budget_mb": 64.0}, "memory_budget_mb"),
                    ({"transport": "auto", "inner": "batched"}, "inner"),
                    ({"transport": "parallel", "inner": "vmap"}, "inner"),
                    ({"transport": "sequential", "batching": "always"}, "batching")):
        with pytest.raises(ConfigError, match=f"runtime.{key}"):
            validate(_base(runtime=rt))


def test_build_auto_records_the_choice_and_explicit_parallel_refuses_dp_sgd():
    from fedmosaic.build import build_data, build_strategy, build_trainer, build_transport

    exp = validate(_base())
    fed = build_data(exp)
    trainer = build_trainer(exp, fed)
    transport = build_transport(exp, fed, trainer, build_strategy(exp, fed))
    assert transport.auto_choice.kind in auto.KINDS
    exp = validate(_base(runtime={"transport": "parallel"}))
    with pytest.raises(ConfigError, match=r"runtime\.transport.*accounting"):
        build_transport(exp, fed, _Accounting(trainer), build_strategy(exp, fed))


def test_simulate_without_transport_records_auto_choice(tmp_path):
    fed = _images(clients=3, n=16)
    result = fm.simulate(fm.TorchTrainer(SmallCNN, lr=0.05, batch_size=8), fed,
                         fm.FedAvg(fraction=1.0), rounds=1, seed=0, out_dir=tmp_path)
    rec = result.transport
    assert rec["chosen_by"] == "auto" and rec["transport"] == "sequential"
    assert "fastest by estimate" in rec["reason"] and "parallel" in rec["estimated_seconds"]
    saved = json.loads((tmp_path / "guarantees.json").read_text())
    assert saved["transport"] == rec
    tr = fm.TorchTrainer(SmallCNN, lr=0.05, batch_size=8)
    with pytest.warns(BatchingFallbackWarning, match="convolution"):
        given = fm.simulate(tr, fed, fm.FedAvg(fraction=1.0), rounds=1, seed=0,
                            transport=fm.BatchedTransport(tr, fed))
    assert given.transport["transport"] == "batched" and given.transport["chosen_by"] == "caller"
    assert given.transport["batching"].startswith("sequential: ")  # a convolution on CPU


@pytest.mark.skipif(auto.usable_cores() < 2, reason="needs 2 usable cores")
def test_simulate_auto_picks_parallel_for_a_cnn_and_matches_sequential(monkeypatch):
    # The plumbing of a run where workers pay: the workers' fixed costs are zeroed in the
    # estimate so that a tiny task makes the choice the Fashion-MNIST task makes (the
    # benchmarks measure that one); simulate builds the workers, records them, closes them.
    for name in ("PARALLEL_START_SECONDS", "PARALLEL_ROUND_SECONDS", "PARALLEL_CLIENT_SECONDS"):
        monkeypatch.setattr(auto, name, 0.0)
    fed = _images(clients=2, n=32)

    def trainer():
        return fm.TorchTrainer(SmallCNN, lr=0.05, batch_size=16)

    built = []
    real = auto.build_chosen
    monkeypatch.setattr(auto, "build_chosen", lambda *a, **k: built.append(real(*a, **k))
                        or built[-1])
    result = fm.simulate(trainer(), fed, fm.FedAvg(fraction=1.0), rounds=1, seed=1)
    assert result.transport["transport"] == "parallel" and result.transport["workers"] == 2
    assert built[0]._closed  # simulate closes the transport it built
    want = fm.simulate(trainer(), fed, fm.FedAvg(fraction=1.0), rounds=1, seed=1,
                       transport=fm.SequentialTransport(trainer(), fed))
    torch.testing.assert_close(result.weights, want.weights, rtol=1e-5, atol=1e-6)


def test_a_run_of_milliseconds_stays_sequential():
    fed = FederatedDataset(name="blobs", clients=[ClientData(f"c{i}", make_blobs(8, seed=i))
                                                  for i in range(2)],
                           test=make_blobs(40, seed=99), num_classes=3, feature_shape=(5,))
    choice = choose_transport(fm.TorchTrainer(partial(MLP, 5, [8], 3), batch_size=8), fed,
                              fm.FedAvg(fraction=1.0), 1, cores=2)
    assert choice.kind == "sequential"  # batched's set-up costs more than it would save
    assert choice.estimates["batched"] > choice.estimates["sequential"]


def test_simulate_takes_a_transport_by_name():
    fed = _images(clients=2, n=8)
    res = fm.simulate(fm.TorchTrainer(SmallCNN, batch_size=8), fed, fm.FedAvg(fraction=1.0),
                      rounds=1, transport="sequential")
    assert res.transport == {"transport": "sequential", "chosen_by": "caller",
                             "reason": "given by name"}
    with pytest.raises(ValueError, match="cannot be pickled"):  # named: refused, not replaced
        fm.simulate(fm.TorchTrainer(lambda: SmallCNN()), fed, fm.FedAvg(), rounds=1,
                    transport="parallel")
    with pytest.raises(ValueError, match="'auto' or one of"):
        fm.simulate(fm.TorchTrainer(SmallCNN), fed, fm.FedAvg(), rounds=1, transport="grpc")


def test_fedmosaic_run_prints_and_records_the_choice(tmp_path):
    from typer.testing import CliRunner

    from fedmosaic.cli import app

    cfg = tmp_path / "exp.toml"
    cfg.write_text('name = "auto"\nrounds = 2\n[data]\ndataset = "digits"\n'
                   "[partition]\nclients = 4\n")
    res = CliRunner().invoke(app, ["run", str(cfg), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "out" / "guarantees.json").read_text())["transport"]
    assert saved["chosen_by"] == "auto" and saved["transport"] in auto.KINDS
    assert f"transport {saved['transport']}" in res.output and "chosen by auto" in res.output


def test_central_evaluation_uses_the_cores_that_idle_workers_hold(monkeypatch):
    # Between rounds a ParallelTransport's workers wait: the server evaluates on their cores.
    class ParallelTransport:  # stands in by name for the real one: only its sizes are read
        inner, num_workers, torch_threads = "sequential", 2, 1

    class Wrapper:
        def __init__(self, inner):
            self.inner = inner

    monkeypatch.setattr(auto, "usable_cores", lambda: 2)
    assert auto.central_eval_threads(Wrapper(ParallelTransport())) == 2
    assert auto.central_eval_threads(ParallelTransport(), FedBuffSchedule(buffer_size=2,
                                                                          concurrency=2)) is None
    assert auto.central_eval_threads(fm.SequentialTransport(None, None)) is None
    monkeypatch.setattr(auto, "usable_cores", lambda: 1)
    assert auto.central_eval_threads(ParallelTransport()) is None  # one core: nothing to add

    seen = []

    class Counting(fm.TorchTrainer):
        def evaluate(self, weights, data):
            seen.append(torch.get_num_threads())
            return super().evaluate(weights, data)

    fed = FederatedDataset(name="blobs", clients=[ClientData(f"c{i}", make_blobs(8, seed=i))
                                                  for i in range(2)],
                           test=make_blobs(16, seed=9), num_classes=3, feature_shape=(5,))
    trainer = Counting(partial(MLP, 5, [4], 3), lr=0.1)
    with pytest.raises(ValueError, match="eval_threads"):
        fm.Server(trainer=trainer, strategy=fm.FedAvg(), transport=fm.SequentialTransport(
            trainer, fed), rounds=1, eval_threads=0)
    server = fm.Server(trainer=trainer, strategy=fm.FedAvg(fraction=1.0), rounds=2,
                       transport=fm.SequentialTransport(trainer, fed), test_data=fed.test,
                       eval_threads=2)
    server.run()
    assert seen == [2, 2] and torch.get_num_threads() == 1  # restored after each evaluation
