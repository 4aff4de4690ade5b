"""RayTransport on a real local Ray instance with two workers."""

import functools
import logging
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import fedmosaic as fm
from fedmosaic.algorithms.strategy import ClientTask
from fedmosaic.core import ClientUpdate
from fedmosaic.data import IID, ArrayDataset, ClientData, FederatedDataset, load_digits, partition
from fedmosaic.models import MLP
from fedmosaic.runtime import ClientFailure, PartialAggregate, SequentialTransport
from fedmosaic.runtime.ray_transport import RayTransport, balance_tasks
from fedmosaic.train import FitConfig

ray = pytest.importorskip("ray")

# A partial of library callables: Ray pickles it by reference to fedmosaic, which the
# workers can import (a function defined in this test module could not be imported there).
make_trainer = functools.partial(fm.TorchTrainer, functools.partial(MLP, 64, [64], 10),
                                 lr=0.05, epochs=1, batch_size=32)


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray for the module. Eight logical CPUs: the shared transport's two actors
    plus a per-test transport fit beside it (idle actors use no real CPU)."""
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=8, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False, configure_logging=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def digits() -> FederatedDataset:
    train, test = load_digits()
    return partition(train, IID(), 20, seed=0, test=test, name="digits")


@pytest.fixture(scope="module")
def digits_ray(ray_instance, digits):
    with RayTransport(make_trainer, digits, num_workers=2) as transport:
        yield transport


def _tasks(fed: FederatedDataset, round_num: int, k: int, seed: int = 0) -> list[ClientTask]:
    return fm.FedAvg(clients_per_round=k).configure_fit(
        round_num, fed.client_ids, np.random.default_rng(seed), run_seed=seed)


def test_same_model_and_round_records_as_sequential_transport(digits, digits_ray):
    seq = fm.simulate(make_trainer(), digits, fm.FedAvg(clients_per_round=10), rounds=2,
                      seed=0)
    par = fm.simulate(make_trainer(), digits, fm.FedAvg(clients_per_round=10), rounds=2,
                      seed=0, transport=digits_ray)
    assert torch.allclose(seq.weights, par.weights, atol=1e-5)
    again = fm.simulate(make_trainer(), digits, fm.FedAvg(clients_per_round=10), rounds=2,
                        seed=0, transport=digits_ray)
    assert torch.equal(par.weights, again.weights), "same seed must give the same model"
    assert len(par.history) == 2
    for a, b in zip(seq.history, par.history):
        assert b["updates"] == a["updates"] == 10 and b["failures"] == 0
        assert b["rejected"] == 0 and b["bytes_up"] == a["bytes_up"]
        for key in ("train_loss", "train_accuracy", "steps", "test_loss", "test_accuracy"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


def test_without_weighting_yields_one_update_per_task(digits, digits_ray):
    tasks = _tasks(digits, 1, 6)
    w0 = make_trainer().initial_weights(0)
    results = list(digits_ray.fit(w0, tasks))
    expected = {u.client_id: u for u in SequentialTransport(make_trainer(), digits).fit(w0, tasks)}
    assert len(results) == 6 and all(isinstance(r, ClientUpdate) for r in results)
    assert {r.client_id for r in results} == {t.client_id for t in tasks}
    for r in results:
        want = expected[r.client_id]
        assert r.delta.dtype == torch.float32 and r.delta.device.type == "cpu"
        assert torch.allclose(r.delta, want.delta, atol=1e-6)
        assert r.num_samples == want.num_samples and r.base_round == 1
        assert r.metrics == pytest.approx(want.metrics) and "steps" in r.metrics


def test_with_weighting_each_actor_returns_one_partial_sum(digits, digits_ray):
    tasks = _tasks(digits, 1, 6)
    results = list(digits_ray.fit(make_trainer().initial_weights(0), tasks,
                                  fm.FedAvgAggregator()))
    assert len(results) == 2 and all(isinstance(r, PartialAggregate) for r in results)
    assert sorted(c for r in results for c in r.client_ids) == sorted(t.client_id for t in tasks)
    for r in results:
        assert r.count == 3 and r.weighted_sum.dtype == torch.float32
        assert r.weighted_sum.device.type == "cpu"


def test_balance_is_greedy_by_sample_count_and_deterministic():
    cfg = FitConfig(round=1)
    sizes = {"a": 10, "b": 9, "c": 5, "d": 4, "e": 1}
    tasks = [ClientTask(c, cfg) for c in ["e", "d", "c", "b", "a"]]
    bins = balance_tasks(tasks, sizes, 2)
    # a -> 0, b -> 1, c -> 1 (9 < 10), d -> 0 (10 < 14), e -> 0 (14 = 14: lower index).
    assert [[t.client_id for t in b] for b in bins] == [["e", "d", "a"], ["c", "b"]]
    assert balance_tasks(tasks, sizes, 2) == bins
    assert [len(b) for b in balance_tasks(tasks[:1], sizes, 3)] == [1, 0, 0]


def test_a_client_whose_training_fails_is_a_failure_and_the_round_completes(
        ray_instance, digits):
    # Label 10 is valid for an 11-class data set but out of range for the 10-output MLP,
    # so training this one client raises inside the actor.
    clients = [ClientData(c.client_id, c.train) for c in digits.clients[:6]]
    bad = clients[2]
    clients[2] = ClientData(bad.client_id, ArrayDataset(bad.train.x, np.full_like(bad.train.y, 10)))
    fed = FederatedDataset(name="poisoned", clients=clients, test=digits.test, num_classes=11,
                           feature_shape=(64,))
    with RayTransport(make_trainer, fed, num_workers=2) as transport:
        res = fm.simulate(make_trainer(), fed, fm.FedAvg(fraction=1.0), rounds=1, seed=0,
                          transport=transport)
        rec = res.history[0]
        assert rec["failures"] == 1 and rec["updates"] == 5 and rec["rejected"] == 0
        tasks = [ClientTask(c.client_id, FitConfig(round=1)) for c in clients]
        results = list(transport.fit(res.weights, tasks))
    failures = [r for r in results if isinstance(r, ClientFailure)]
    assert [f.client_id for f in failures] == [bad.client_id]
    assert "IndexError" in failures[0].reason
    assert ray.is_initialized()  # closing a transport leaves a Ray it did not start running
    assert sum(isinstance(r, ClientUpdate) for r in results) == 5


def test_a_killed_actors_clients_train_on_the_other_actor_and_a_replacement_joins(
        digits, digits_ray, caplog):
    killed = []

    def kill_first_actor(record):
        if record["round"] == 1:
            killed.append(digits_ray.actors[0])
            ray.kill(killed[0])

    with caplog.at_level(logging.WARNING, logger="fedmosaic.runtime.ray_transport"):
        res = fm.simulate(make_trainer(), digits, fm.FedAvg(clients_per_round=10), rounds=3,
                          seed=0, transport=digits_ray, callbacks=[kill_first_actor])
    # The dead actor's five clients train again on the other actor within round 2: every
    # round aggregates all ten, and the model is the sequential one.
    assert [(r["updates"], r["failures"]) for r in res.history] == [(10, 0)] * 3
    seq = fm.simulate(make_trainer(), digits, fm.FedAvg(clients_per_round=10), rounds=3,
                      seed=0, transport="sequential")
    assert torch.allclose(seq.weights, res.weights, atol=1e-5)
    assert "Ray worker 0 lost: ActorDiedError" in caplog.text
    assert "its 5 clients train again on worker 0" in caplog.text
    assert all(a._actor_id != killed[0]._actor_id for a in digits_ray.actors)
    deadline = time.monotonic() + 60
    while len(digits_ray.actors) < 2 and time.monotonic() < deadline:
        digits_ray._admit_started()  # what the next round's dispatch does
        time.sleep(0.2)
    assert len(digits_ray.actors) == 2, "the replacement never joined the pool"


def _wait_for_cpus(expected: float, timeout: float = 20.0) -> float:
    # Ray frees an actor's resources asynchronously after the kill.
    deadline = time.monotonic() + timeout
    while True:
        cpus = ray.available_resources().get("CPU", 0.0)
        if cpus >= expected or time.monotonic() > deadline:
            return cpus
        time.sleep(0.2)


def _dies(actor: object, timeout: float = 30.0) -> bool:
    # ray.kill is asynchronous: a call submitted just after it may still be answered by the
    # actor before the kill reaches its worker, so wait for the first call that fails.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ready.remote(), timeout=max(0.1, deadline - time.monotonic()))
        except ray.exceptions.RayActorError:
            return True
        except ray.exceptions.GetTimeoutError:
            return False
        time.sleep(0.2)
    return False


def test_close_kills_the_actors_and_shuts_down_only_a_ray_it_started(
        ray_instance, digits, digits_ray, monkeypatch):
    before = _wait_for_cpus(ray.cluster_resources()["CPU"] - 2)
    # Restarting Ray would cost seconds: stand-ins for init/shutdown record what a transport
    # that finds no Ray does, while its actors run on the module's instance.
    calls: dict[str, dict] = {}
    with monkeypatch.context() as m:
        m.setattr(ray, "is_initialized", lambda: False)
        m.setattr(ray, "init", lambda **kw: calls.setdefault("init", kw))
        transport = RayTransport(make_trainer, digits, num_workers=1, cpus_per_worker=1.5,
                                 ray_init_kwargs={"namespace": "fl"})
    assert calls["init"]["num_cpus"] == 2 and calls["init"]["include_dashboard"] is False
    assert calls["init"]["namespace"] == "fl" and calls["init"]["address"] == "local"
    actors = transport.actors
    assert len(actors) == 1 and ray.available_resources().get("CPU", 0.0) <= before - 1.5
    shutdowns: list[bool] = []
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(True))
    with transport:
        pass
    transport.close()
    assert shutdowns == [True] and transport.actors == []
    for actor in actors:
        assert _dies(actor), "a closed transport's actor still answers after 30 s"
    assert _wait_for_cpus(before) >= before
    with pytest.raises(RuntimeError, match="closed"):
        list(transport.fit(torch.zeros(3), _tasks(digits, 1, 2)))


def test_a_factory_that_raises_fails_at_construction(ray_instance, digits):
    broken = functools.partial(fm.TorchTrainer, functools.partial(MLP, 64, [64], 10),
                               loss="no-such-loss")
    with pytest.raises(RuntimeError, match="Ray workers failed to start"):
        RayTransport(broken, digits, num_workers=1)


def test_importing_needs_no_ray_and_a_missing_ray_says_how_to_install():
    code = (
        "import sys\n"
        "import fedmosaic.runtime.ray_transport as rt\n"
        "assert 'ray' not in sys.modules, 'ray imported eagerly'\n"
        "sys.modules['ray'] = None\n"
        "try:\n"
        "    rt.RayTransport(lambda: None, None)\n"
        "except ImportError as exc:\n"
        "    assert 'pip install fedmosaic[ray]' in str(exc), exc\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_stragglers_get_their_full_step_counts_from_the_driver(digits, digits_ray):
    def strategy():
        return fm.FedAvg(clients_per_round=6, stragglers=0.5)

    seq = fm.simulate(make_trainer(), digits, strategy(), rounds=1, seed=1)
    par = fm.simulate(make_trainer(), digits, strategy(), rounds=1, seed=1,
                      transport=digits_ray)
    assert digits_ray.full_steps(digits.client_ids[0], FitConfig(round=1, batch_size=8)) == 9
    assert torch.allclose(seq.weights, par.weights, atol=1e-5)
    assert par.history[0]["steps"] == pytest.approx(seq.history[0]["steps"])
    assert par.history[0]["steps"] < 3  # some clients stopped early


def test_batched_workers_train_cohorts_and_give_the_sequential_model(ray_instance, digits):
    seq = fm.simulate(make_trainer(), digits, fm.FedAvg(clients_per_round=10), rounds=2,
                      seed=0, transport="sequential")
    with RayTransport(make_trainer, digits, num_workers=2, inner="batched") as transport:
        got = fm.simulate(make_trainer(), digits, fm.FedAvg(clients_per_round=10), rounds=2,
                          seed=0, transport=transport)
        training = [w["training"] for w in transport.where()]
    assert all(t.startswith("batched: a flatten/Linear/ReLU chain") for t in training), training
    assert torch.allclose(seq.weights, got.weights, atol=1e-5)
    assert [r["updates"] for r in got.history] == [10, 10]


def test_bad_ray_options_are_refused_before_anything_starts(digits):
    with pytest.raises(ValueError, match="num_workers must be a positive integer or 'auto'"):
        RayTransport(make_trainer, digits, num_workers="many")
    with pytest.raises(ValueError, match="inner must be"):
        RayTransport(make_trainer, digits, inner="vmap")
    with pytest.raises(ValueError, match="gpus_per_worker"):
        RayTransport(make_trainer, digits, gpus_per_worker=-1)


def test_start_up_causes_ray_hides_are_named_with_what_to_do():
    from fedmosaic.runtime.ray_transport import _cause

    auth = RuntimeError("The actor died unexpectedly\nrpc failed: Missing authorization header")
    assert "same RAY_AUTH_TOKEN" in _cause(auth)
    missing = RuntimeError("The actor died\nModuleNotFoundError: No module named 'task'")
    assert "runtime_env" in _cause(missing) and "install it there" in _cause(missing)
    body = RuntimeError("ActorDiedError: died\n  at worker.py\nValueError: bad loss 'x'")
    assert "(ValueError: bad loss 'x')" in _cause(body)


def test_tasks_travel_packed_and_unpack_to_the_same_tasks(digits):
    import dataclasses
    import pickle

    from fedmosaic.runtime.ray_transport import _TaskPack

    tasks = fm.FedAvg(clients_per_round=8, stragglers=0.5).configure_fit(
        3, digits.client_ids, np.random.default_rng(0), run_seed=5,
        full_steps={c: 9 for c in digits.client_ids})
    assert len({t.config.max_steps for t in tasks}) > 1  # stragglers: caps differ
    pack = pickle.loads(pickle.dumps(_TaskPack(tasks)))
    assert pack.tasks is None and pack.unpack() == tasks
    mixed = [tasks[0], dataclasses.replace(tasks[1], config=dataclasses.replace(
        tasks[1].config, lr=0.5))]
    assert _TaskPack(mixed).unpack() == mixed and _TaskPack(mixed).tasks is not None


def test_fedbuff_on_source_fed_ray_workers_gives_the_sequential_model(ray_instance, digits,
                                                                      tmp_path):
    """The event-driven core's asynchronous schedules draw on the Ray workers like any
    transport: lazy batches of pending tasks go to the actors, which load from a source."""
    from fedmosaic.data.source import FileSource, LazyFederation
    from fedmosaic.runtime.schedule import FedBuffSchedule

    paths = {}
    for c in digits.clients:
        paths[c.client_id] = str(tmp_path / f"{c.client_id}.npz")
        np.savez(paths[c.client_id], x=c.train.x, y=c.train.y)
    source = FileSource(paths)

    def run(transport, data):
        return fm.simulate(make_trainer(), data, fm.FedAvg(), rounds=4, seed=0,
                           transport=transport,
                           schedule=FedBuffSchedule(buffer_size=3, concurrency=6))

    want = run("sequential", digits)
    with RayTransport(make_trainer, source=source, num_workers=2, inner="batched") as ray_t:
        got = run(ray_t, LazyFederation(source, test=digits.test))
    assert [r["updates"] for r in got.history] == [r["updates"] for r in want.history]
    assert torch.allclose(got.weights, want.weights, atol=1e-5)
