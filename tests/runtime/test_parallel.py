"""ParallelTransport: worker processes on this machine, against SequentialTransport."""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import psutil
import pytest
import torch

import fedmosaic as fm
from fedmosaic.algorithms.strategy import ClientTask
from fedmosaic.core import ClientUpdate
from fedmosaic.data import IID, ArrayDataset, ClientData, FederatedDataset, load_digits, partition
from fedmosaic.models import MLP
from fedmosaic.privacy.dp_fedavg import DPFedAvg
from fedmosaic.privacy.secagg.transport import SecAggPlusTransport
from fedmosaic.robust import make_robust
from fedmosaic.runtime import (
    ClientFailure,
    ParallelTransport,
    PartialAggregate,
    SequentialTransport,
)
from fedmosaic.runtime.evaluation import EvalReport
from fedmosaic.runtime.ray_transport import balance_tasks
from fedmosaic.train import FitConfig
from tests.runtime.parallel_helpers import BatchNormNet, KillOnce, make_trainer, nudge


@pytest.fixture(scope="module")
def digits() -> FederatedDataset:
    """Twenty digits clients; each keeps a fifth of its samples as a local test split (the
    last client none, to see its evaluation fail)."""
    train, test = load_digits()
    fed = partition(train, IID(), 20, seed=0, test=test, name="digits")
    clients = []
    for i, c in enumerate(fed.clients):
        cut = len(c.train) * 4 // 5
        keep, held = np.arange(cut), np.arange(cut, len(c.train))
        clients.append(ClientData(c.client_id, c.train.subset(keep),
                                  None if i == 19 else c.train.subset(held)))
    return FederatedDataset(name="digits", clients=clients, test=fed.test,
                            num_classes=10, feature_shape=fed.feature_shape)


@pytest.fixture(scope="module")
def par(digits):
    torch.set_num_threads(1)  # the module fixture runs before the per-test thread fixture
    with ParallelTransport(make_trainer(), digits, num_workers=2) as transport:
        yield transport


def _run(digits, strategy, transport=None, rounds=2, **kw):
    """A run over ``transport``; None is the baseline, an explicit SequentialTransport (not
    ``fm.simulate``'s automatic choice, which may itself pick worker processes)."""
    if transport is None:
        transport = SequentialTransport(make_trainer(), digits)
    return fm.simulate(make_trainer(), digits, strategy, rounds=rounds, seed=3,
                       transport=transport, **kw)


def _same_records(a, b):
    for ra, rb in zip(a.history, b.history, strict=True):
        for key in ("updates", "failures", "rejected", "bytes_up"):
            assert ra.get(key) == rb.get(key), key
        for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), key


# -- results unchanged -------------------------------------------------------------------------
def test_fedavg_equals_sequential_within_rounding_and_repeats_bit_for_bit(digits, par):
    seq = _run(digits, fm.FedAvg(clients_per_round=10))
    one = _run(digits, fm.FedAvg(clients_per_round=10), par)
    two = _run(digits, fm.FedAvg(clients_per_round=10), par)
    # Streaming FedAvg: each worker sums its clients, so the sum is added in another order.
    assert torch.allclose(seq.weights, one.weights, rtol=1e-5, atol=1e-7)
    assert not torch.equal(seq.weights, make_trainer().initial_weights(3))
    assert torch.equal(one.weights, two.weights), "same seed and workers: same model"
    _same_records(seq, one)
    assert one.history[0]["updates"] == 10


def test_fedprox_equals_sequential(digits, par):
    seq = _run(digits, fm.FedProx(mu=0.5, clients_per_round=8))
    got = _run(digits, fm.FedProx(mu=0.5, clients_per_round=8), par)
    assert torch.allclose(seq.weights, got.weights, rtol=1e-5, atol=1e-7)
    _same_records(seq, got)


def test_central_dp_fedavg_is_bit_identical_to_sequential(digits, par):
    # Server-side clipping needs every update: they come back one by one, in task order, so
    # the server sees exactly the sequential sequence (and draws the same noise).
    def dp():
        return DPFedAvg(clip=0.5, delta=1e-5, noise_multiplier=0.8, sampling="fixed",
                        clients_per_round=8, population=20)

    seq = _run(digits, dp())
    got = _run(digits, dp(), par)
    assert torch.equal(seq.weights, got.weights)
    assert got.guarantees["differential_privacy"] == seq.guarantees["differential_privacy"]


def test_client_stages_run_in_the_workers_with_the_clients_seeds(digits, par):
    from fedmosaic.privacy import LocalDP

    def strategy():
        return fm.FedAvg(clients_per_round=8, client_stages=(LocalDP(clip=1.0,
                                                                     noise_multiplier=0.5),))

    seq = _run(digits, strategy())
    got = _run(digits, strategy(), par)
    assert torch.allclose(seq.weights, got.weights, rtol=1e-5, atol=1e-6)
    _same_records(seq, got)


def test_a_dispatch_transform_is_applied_in_the_workers_and_a_lambda_one_refused(digits, par):
    from fedmosaic.core import ConfigError

    seq = _run(digits, fm.FedAvg(clients_per_round=6, dispatch_transform=nudge))
    got = _run(digits, fm.FedAvg(clients_per_round=6, dispatch_transform=nudge), par)
    plain = _run(digits, fm.FedAvg(clients_per_round=6), par)
    assert torch.allclose(seq.weights, got.weights, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(plain.weights, got.weights, rtol=1e-5, atol=1e-7)
    marked = fm.FedAvg(dispatch_transform=lambda cid, w: w)
    reason = ParallelTransport.unsupported_strategy_reason(marked)
    assert reason is not None and "dispatch_transform cannot be pickled" in reason
    assert ParallelTransport.unsupported_strategy_reason(fm.FedAvg()) is None
    with pytest.raises(ConfigError, match=r"dispatch_transform cannot be pickled.*not a lambda"):
        _run(digits, marked, par)


@pytest.mark.parametrize("rule", ["krum", "trimmed_mean"])
def test_robust_rules_get_individual_updates_and_the_sequential_model(digits, par, rule):
    def strategy():
        return fm.FedAvg(clients_per_round=8, weighting="uniform",
                         robust=make_robust(rule, f=1))

    seq = _run(digits, strategy())
    got = _run(digits, strategy(), par)
    assert torch.equal(seq.weights, got.weights)
    _same_records(seq, got)


def test_secagg_plus_over_the_parallel_transport(digits, par):
    def secure(inner):
        return SecAggPlusTransport(inner, clip=1.0, max_weight=100.0, seed=1)

    seq = _run(digits, fm.FedAvg(clients_per_round=6),
               secure(SequentialTransport(make_trainer(), digits)))
    got = _run(digits, fm.FedAvg(clients_per_round=6), secure(par))
    assert torch.equal(seq.weights, got.weights)
    assert got.history[-1]["updates"] == 6
    assert got.guarantees["server_sees"] == seq.guarantees["server_sees"]


def test_checkpoint_and_resume_give_the_uninterrupted_model(digits, par, tmp_path):
    whole = _run(digits, fm.FedAvg(clients_per_round=6), par, rounds=3)
    stopped = _run(digits, fm.FedAvg(clients_per_round=6), par, rounds=3,
                   out_dir=tmp_path, stop_after=1)
    assert len(stopped.history) == 1
    resumed = _run(digits, fm.FedAvg(clients_per_round=6), par, rounds=3, out_dir=tmp_path,
                   resume=True)
    assert torch.equal(whole.weights, resumed.weights)
    assert [r["round"] for r in resumed.history] == [1, 2, 3]


def test_batched_workers_equal_sequential(digits):
    with ParallelTransport(make_trainer, digits, num_workers=2, inner="batched") as transport:
        seq = _run(digits, fm.FedAvg(clients_per_round=10))
        got = _run(digits, fm.FedAvg(clients_per_round=10), transport)
        assert transport.batched_fallback is None  # the MLP trains batched in every worker
    assert torch.allclose(seq.weights, got.weights, rtol=1e-4, atol=1e-6)
    _same_records(seq, got)


def test_batched_workers_that_cannot_batch_say_why_once(digits, caplog):
    bn = functools.partial(fm.TorchTrainer, BatchNormNet, lr=0.05, batch_size=32)
    with caplog.at_level(logging.WARNING, logger="fedmosaic.runtime.parallel"), \
            ParallelTransport(bn, digits, num_workers=2, inner="batched") as transport:
        got = fm.simulate(bn(), digits, fm.FedAvg(clients_per_round=6), rounds=1, seed=3,
                          transport=transport)
    assert "BatchNorm1d" in transport.batched_fallback
    assert caplog.text.count("workers train sequentially because") == 1
    seq = fm.simulate(bn(), digits, fm.FedAvg(clients_per_round=6), rounds=1, seed=3,
                      transport=SequentialTransport(bn(), digits))
    assert torch.allclose(seq.weights, got.weights, rtol=1e-5, atol=1e-7)


# -- what comes back ---------------------------------------------------------------------------
def _tasks(fed: FederatedDataset, round_num: int, k: int) -> list[ClientTask]:
    return fm.FedAvg(clients_per_round=k).configure_fit(
        round_num, fed.client_ids, np.random.default_rng(0), run_seed=0)


def test_individual_updates_come_in_task_order_and_equal_sequential(digits, par):
    tasks = _tasks(digits, 1, 7)
    w0 = make_trainer().initial_weights(0)
    got = list(par.fit(w0, tasks))
    want = list(SequentialTransport(make_trainer(), digits).fit(w0, tasks))
    assert [r.client_id for r in got] == [t.client_id for t in tasks]
    for g, w in zip(got, want, strict=True):
        assert isinstance(g, ClientUpdate) and g.delta.dtype == torch.float32
        assert torch.equal(g.delta, w.delta) and g.metrics == w.metrics
        assert g.num_samples == w.num_samples and g.base_round == 1
    got[0].delta.add_(1.0)  # the caller owns what it gets


def test_with_a_weighting_each_worker_returns_one_partial_sum(digits, par):
    tasks = _tasks(digits, 1, 7)
    results = list(par.fit(make_trainer().initial_weights(0), tasks, fm.FedAvgAggregator()))
    groups = balance_tasks(tasks, digits.sizes(), 2)
    assert len(results) == 2 and all(isinstance(r, PartialAggregate) for r in results)
    for r, g in zip(results, groups, strict=True):
        assert r.client_ids == [t.client_id for t in g] and r.count == len(g)
        assert r.weighted_sum.dtype == torch.float32 and r.weighted_sum.shape == (
            make_trainer().spec.numel,)


def test_federated_evaluation_runs_on_the_workers_in_client_order(digits, par):
    w = make_trainer().initial_weights(1)
    ids = list(reversed(digits.client_ids))
    got = list(par.evaluate(w, ids, 1))
    want = list(SequentialTransport(make_trainer(), digits).evaluate(w, ids, 1))
    assert got == want
    assert isinstance(got[0], ClientFailure) and got[0].reason == "no local test split"
    assert all(isinstance(r, EvalReport) for r in got[1:])


def test_an_abandoned_round_does_not_disturb_the_next(digits, par):
    w0 = make_trainer().initial_weights(0)
    tasks = _tasks(digits, 1, 8)
    gen = par.fit(w0, tasks)
    next(gen)
    gen.close()  # the consumer stopped early: the busy worker is replaced
    got = list(par.fit(w0, tasks))
    want = list(SequentialTransport(make_trainer(), digits).fit(w0, tasks))
    assert all(torch.equal(g.delta, w.delta) for g, w in zip(got, want, strict=True))


def test_a_call_superseded_while_suspended_fails_its_clients_instead_of_hanging(digits, par):
    w0 = make_trainer().initial_weights(0)
    tasks = _tasks(digits, 1, 8)
    first = par.fit(w0, tasks)
    next(first)  # suspended: the other worker's group may still be training
    ids = digits.client_ids[:4]
    assert [r.client_id for r in par.evaluate(w0, ids, 1)] == ids
    rest = list(first)
    assert len(rest) == 7
    assert all(isinstance(r, ClientUpdate) or "superseded" in r.reason for r in rest)
    assert len(list(par.fit(w0, tasks))) == 8


def test_shared_arrays_keep_their_values_and_strides_and_are_read_only():
    from fedmosaic.runtime.parallel import _mapped_data, _release_shm, _share_data

    rng = np.random.default_rng(0)
    # An (n, 1, 4, 4) image array whose size-1 channel axis has a one-element stride (what a
    # reshape gives): torch reads it as channels-last, so the layout must survive sharing.
    x = np.lib.stride_tricks.as_strided(rng.normal(size=(6, 1, 4, 4)).astype(np.float32),
                                        strides=(64, 4, 16, 4))
    gappy = rng.normal(size=(3, 1, 4, 8)).astype(np.float32)[..., ::2]  # not dense: packed
    fed = FederatedDataset(
        name="s", test=None, num_classes=2, feature_shape=(1, 4, 4),
        clients=[ClientData("a", ArrayDataset(x, np.arange(6) % 2),
                            ArrayDataset(x[:2].copy(), np.zeros(2, np.int64))),
                 ClientData("b", ArrayDataset(gappy, np.ones(3, np.int64)))])
    shm, layout = _share_data(fed)
    try:
        mapped = _mapped_data(shm, layout)
        pairs = [(g.train, w.train) for g, w in zip(mapped.clients, fed.clients, strict=True)]
        pairs.append((mapped.clients[0].test, fed.clients[0].test))
        for got, want in pairs:
            assert np.array_equal(got.x, want.x) and np.array_equal(got.y, want.y)
            assert not got.x.flags.writeable and not got.y.flags.writeable
        assert mapped.clients[0].train.x.strides == (64, 4, 16, 4)
        assert mapped.clients[1].train.x.flags.c_contiguous
        assert mapped.clients[1].test is None
        del mapped, pairs, got, want
    finally:
        _release_shm(shm)


# -- failures ----------------------------------------------------------------------------------
def test_a_client_whose_training_raises_is_only_that_clients_failure(digits, par):
    bad = digits.clients[2]
    # Label 10 is out of range for the 10-output MLP: this client's training raises.
    clients = [ClientData(c.client_id, c.train) for c in digits.clients[:6]]
    clients[2] = ClientData(bad.client_id,
                            ArrayDataset(bad.train.x, np.full_like(bad.train.y, 10)))
    fed = FederatedDataset(name="poisoned", clients=clients, test=None, num_classes=11,
                           feature_shape=(64,))
    tasks = [ClientTask(c.client_id, FitConfig(round=1)) for c in clients]
    with ParallelTransport(make_trainer(), fed, num_workers=2) as transport:
        results = list(transport.fit(make_trainer().initial_weights(0), tasks))
        partials = list(transport.fit(make_trainer().initial_weights(0), tasks,
                                      fm.FedAvgAggregator()))
    assert [type(r) for r in results] == [ClientUpdate] * 2 + [ClientFailure] + \
        [ClientUpdate] * 3
    assert results[2].client_id == bad.client_id and "IndexError" in results[2].reason
    assert sum(p.count for p in partials) == 5
    assert [f.client_id for p in partials for f in p.failures] == [bad.client_id]


def test_a_killed_worker_fails_its_clients_and_is_replaced(digits, tmp_path, caplog):
    # One client of a unique size (13 samples) is the one whose training kills its worker.
    clients = [ClientData(c.client_id, c.train) for c in digits.clients[:8]]
    victim = clients[5]
    clients[5] = ClientData(victim.client_id, victim.train.subset(np.arange(13)))
    fed = FederatedDataset(name="digits8", clients=clients, test=digits.test, num_classes=10,
                           feature_shape=(64,))
    marker = tmp_path / "killed"
    tasks = [ClientTask(c.client_id, FitConfig(round=2)) for c in clients]
    group = next(g for g in balance_tasks(tasks, fed.sizes(), 2)
                 if victim.client_id in [t.client_id for t in g])
    with ParallelTransport(KillOnce(13, str(marker)), fed, num_workers=2) as transport:
        before = transport.pids
        with caplog.at_level(logging.WARNING, logger="fedmosaic.runtime.parallel"):
            res = fm.simulate(make_trainer(), fed, fm.FedAvg(fraction=1.0), rounds=3,
                              seed=0, transport=transport)
        killed = int(marker.read_text())
        idx = before.index(killed)
        first, second, third = res.history
        assert first["failures"] == len(group) and first["updates"] == 8 - len(group)
        assert second["failures"] == 0 and second["updates"] == 8
        assert third["failures"] == 0 and third["updates"] == 8
        assert f"parallel worker {idx} lost: exit code -9 (SIGKILL)" in caplog.text
        after = transport.pids
        assert after[1 - idx] == before[1 - idx] and after[idx] != killed
        assert not psutil.pid_exists(killed)


def test_close_stops_every_worker_and_frees_the_shared_memory(digits):
    transport = ParallelTransport(make_trainer, digits, num_workers=2)
    pids = transport.pids
    list(transport.fit(make_trainer().initial_weights(0), _tasks(digits, 1, 4)))
    shm = [f"/dev/shm/{s.name}" for s in transport._pool.segments]
    assert len(shm) == 2 and all(os.path.exists(p) for p in shm)  # data, weights
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    assert set(pids) <= children
    assert repr(transport) == ("ParallelTransport(num_workers=2, inner='sequential', "
                               "torch_threads=1)")
    transport.close()
    transport.close()  # idempotent
    assert repr(transport).endswith(", closed)")
    assert not any(psutil.pid_exists(p) for p in pids)
    assert not any(os.path.exists(p) for p in shm)
    with pytest.raises(RuntimeError, match="closed"):
        list(transport.fit(make_trainer().initial_weights(0), _tasks(digits, 1, 2)))


def test_a_transport_never_closed_is_stopped_when_collected(digits):
    transport = ParallelTransport(make_trainer, digits, num_workers=1)
    pids = transport.pids
    del transport
    import gc

    gc.collect()
    assert not any(psutil.pid_exists(p) for p in pids)


@pytest.mark.slow
def test_workers_and_shared_memory_do_not_outlive_a_killed_parent(tmp_path):
    code = (
        "import os, signal, functools\n"
        "import fedmosaic as fm\n"
        "from fedmosaic.data import IID, load_digits, partition\n"
        "from fedmosaic.models import MLP\n"
        "tr, te = load_digits()\n"
        "fed = partition(tr, IID(), 10, seed=0, test=te)\n"
        "p = fm.ParallelTransport(functools.partial(fm.TorchTrainer, functools.partial(\n"
        "    MLP, 64, [8], 10)), fed, num_workers=2)\n"
        "print(*p.pids, *(s.name for s in p._pool.segments), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr
    *pids, shm = out.stdout.split()

    def gone(pid: str) -> bool:
        try:
            return psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (
            all(gone(p) for p in pids) and not os.path.exists(f"/dev/shm/{shm}")):
        time.sleep(0.1)
    assert all(gone(p) for p in pids), "a worker outlived its killed parent"
    assert not os.path.exists(f"/dev/shm/{shm}"), "shared memory left behind"


@pytest.mark.slow
def test_an_unguarded_script_gets_a_clear_error_not_a_hang(tmp_path):
    # Workers import the main module: a script that builds the transport at top level would
    # build one in every worker, which multiprocessing refuses there.
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import functools\n"
        "import fedmosaic as fm\n"
        "from fedmosaic.data import IID, load_digits, partition\n"
        "from fedmosaic.models import MLP\n"
        "tr, te = load_digits()\n"
        "fed = partition(tr, IID(), 10, seed=0, test=te)\n"
        "fm.ParallelTransport(functools.partial(fm.TorchTrainer, functools.partial(\n"
        "    MLP, 64, [8], 10)), fed, num_workers=1)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: parallel worker 0 failed to start: it exited")
    assert "if __name__ == \"__main__\":" in last


# -- start-up and arguments ----------------------------------------------------------------------
def test_a_factory_that_fails_in_the_workers_fails_the_constructor(digits):
    broken = functools.partial(fm.TorchTrainer, functools.partial(MLP, 64, [32], 10),
                               loss="no-such-loss")
    with pytest.raises(RuntimeError, match=r"parallel workers failed to start: .*no-such-loss"):
        ParallelTransport(broken, digits, num_workers=2)


def test_a_trainer_that_cannot_be_pickled_is_refused_with_the_reason(digits):
    lam = fm.TorchTrainer(lambda: MLP(64, [32], 10))
    reason = ParallelTransport.unsupported_reason(lam)
    assert reason is not None and "cannot be pickled" in reason and "lambda" in reason
    with pytest.raises(ValueError, match="cannot be pickled"):
        ParallelTransport(lam, digits, num_workers=1)
    assert ParallelTransport.unsupported_reason(make_trainer()) is None
    assert ParallelTransport.unsupported_reason(make_trainer) is None
    assert "Trainer or a callable" in ParallelTransport.unsupported_reason(42)


def test_a_dp_sgd_trainer_is_refused_its_accounting_would_be_split(digits):
    from fedmosaic.train.dp_trainer import DPSGDTrainer

    factory = functools.partial(DPSGDTrainer, functools.partial(MLP, 64, [32], 10))
    reason = ParallelTransport.unsupported_reason(factory)
    assert reason is not None and "per-client privacy accounting" in reason
    assert ParallelTransport.unsupported_reason(DPSGDTrainer) == reason
    with pytest.raises(ValueError, match="per-client privacy accounting"):
        ParallelTransport(factory, digits, num_workers=1)


class Net(torch.nn.Linear):
    def __init__(self) -> None:
        super().__init__(4, 2)


def test_a_model_class_from_an_interactive_main_is_refused(monkeypatch, tmp_path):
    # As in a notebook or ``python -c``: a __main__ with no file that workers could import.
    trainer = fm.TorchTrainer(Net)
    monkeypatch.setattr(Net, "__module__", "__main__")
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    sys.modules["__main__"].Net = Net
    reason = ParallelTransport.unsupported_reason(trainer)
    assert reason is not None and "refers to 'Net', defined in an interactive __main__" in reason
    # A script's __main__ is imported by the workers: the same class is fine there.
    (tmp_path / "script.py").write_text("")
    sys.modules["__main__"].__file__ = str(tmp_path / "script.py")
    assert ParallelTransport.unsupported_reason(trainer) is None


def test_a_main_module_read_from_stdin_does_not_stop_the_workers(digits, monkeypatch):
    # ``python - < script.py``: __main__.__file__ is "<stdin>", which multiprocessing would
    # make every worker run as its main module (and fail); the transport hides it.
    main = types.ModuleType("__main__")
    main.__file__ = "<stdin>"
    monkeypatch.setitem(sys.modules, "__main__", main)
    with ParallelTransport(make_trainer, digits, num_workers=1) as transport:
        w = make_trainer().initial_weights(0)
        assert len(list(transport.fit(w, _tasks(digits, 1, 2)))) == 2
    assert main.__file__ == "<stdin>"
    monkeypatch.setattr(Net, "__module__", "__main__")
    main.Net = Net
    reason = ParallelTransport.unsupported_reason(fm.TorchTrainer(Net))
    assert reason is not None and "interactive __main__" in reason


def test_a_model_from_a_file_loaded_under_a_made_up_name_is_refused(tmp_path, monkeypatch):
    from fedmosaic.task import load_object

    monkeypatch.setattr(sys, "path", list(sys.path))  # the loader puts tmp_path first
    (tmp_path / "my-model.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Linear):\n"
        "    def __init__(self):\n"
        "        super().__init__(4, 2)\n")
    net = load_object("my-model.py:Net", tmp_path)
    try:
        reason = ParallelTransport.unsupported_reason(fm.TorchTrainer(net))
    finally:
        sys.modules.pop(net.__module__, None)
    assert reason is not None and "refers to 'Net', defined in module '_fedmosaic_user_" in reason
    assert "loaded from a file that is not on sys.path" in reason
    # Under its own name (an importable file name) the same code is fine.
    (tmp_path / "mymodel.py").write_text((tmp_path / "my-model.py").read_text())
    ok = load_object("mymodel.py:Net", tmp_path)
    try:
        assert ParallelTransport.unsupported_reason(fm.TorchTrainer(ok)) is None
    finally:
        sys.modules.pop("mymodel", None)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_workers": 0}, "num_workers must be a positive integer"),
    ({"num_workers": True}, "num_workers must be a positive integer"),
    ({"num_workers": 2.0}, "num_workers must be a positive integer"),
    ({"torch_threads": 0}, "torch_threads must be a positive integer"),
    ({"inner": "vmap"}, "inner must be one of"),
    ({"start_timeout": 0}, "start_timeout must be a number of seconds > 0"),
])
def test_bad_arguments_are_refused_before_anything_starts(digits, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelTransport(make_trainer, digits, **kwargs)


def test_the_default_is_one_worker_per_usable_core(digits):
    with ParallelTransport(make_trainer, digits) as transport:
        assert transport.num_workers == len(os.sched_getaffinity(0)) == len(transport.pids)
        assert transport.full_steps(digits.client_ids[0], FitConfig(round=1)) == \
            make_trainer().full_steps(len(digits.clients[0].train), FitConfig(round=1))


# -- central evaluation on the idle workers ---------------------------------------------------
def test_central_evaluation_is_shared_by_the_idle_workers(digits, par, monkeypatch):
    calls = []
    original = par.predict_test
    monkeypatch.setattr(par, "predict_test", lambda w: calls.append(1) or original(w))
    seq = _run(digits, fm.FedAvg(clients_per_round=10))
    one = _run(digits, fm.FedAvg(clients_per_round=10), par)
    assert len(calls) == 2, "one shared evaluation per round"
    _same_records(seq, one)  # test_loss and test_accuracy as a single process computes them
    w = make_trainer().initial_weights(0)
    shared = original(w)
    assert shared.shape == (len(digits.test), 10)
    assert torch.allclose(shared, make_trainer().predict(w, digits.test), atol=1e-6)


def test_central_evaluation_survives_a_lost_worker_and_falls_back_when_it_must(
        digits, monkeypatch):
    from fedmosaic.runtime.auto import central_evaluator

    w = make_trainer().initial_weights(0)
    want = make_trainer().evaluate(w, digits.test)
    with ParallelTransport(make_trainer(), digits, num_workers=2) as transport:
        evaluate = central_evaluator(transport, make_trainer(), digits.test)
        assert evaluate is not None
        # A share that cannot be predicted: the evaluator says so, and the server evaluates
        # by itself, with the same metrics.
        with monkeypatch.context() as m:
            m.setattr(transport, "predict_test", lambda weights: None)
            assert evaluate(w, digits.test) is None
            seq = _run(digits, fm.FedAvg(clients_per_round=10))
            _same_records(seq, _run(digits, fm.FedAvg(clients_per_round=10), transport))
        # A worker killed between rounds is replaced before the shared evaluation.
        os.kill(transport.pids[0], signal.SIGKILL)
        assert transport.predict_test(w) is not None
        assert evaluate(w, digits.test) == pytest.approx(want, rel=1e-6)
    # Only a plain TorchTrainer beside a ParallelTransport holding that test set.
    assert central_evaluator(SequentialTransport(make_trainer(), digits), make_trainer(),
                             digits.test) is None
