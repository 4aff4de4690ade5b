"""``[strategy] schedule`` in experiment files, the schedule ``build_strategy`` attaches, and
the refusals of asynchronous schedules (issue #11 item 5)."""

from __future__ import annotations

import pytest

import fedmosaic as fm
from fedmosaic.build import build_schedule, build_strategy
from fedmosaic.config import validate
from fedmosaic.core import ConfigError
from fedmosaic.models import MLP
from fedmosaic.privacy.dp_fedavg import DPFedAvg
from fedmosaic.robust import make_robust
from fedmosaic.runtime import SequentialTransport
from fedmosaic.runtime.schedule import FedAsyncSchedule, FedBuffSchedule, SyncSchedule

FEDBUFF = {"schedule": "fedbuff", "buffer_size": 3, "concurrency": 5}
FEDASYNC = {"schedule": "fedasync", "alpha": 0.6, "concurrency": 4}


def _base(strategy=None, **sections):
    raw = {"rounds": 3, "data": {"dataset": "digits"}, **sections}
    if strategy is not None:
        raw["strategy"] = strategy
    return raw


def test_sync_said_explicitly_keeps_the_identity_of_a_run_without_the_key():
    plain = validate(_base()).identity()
    assert validate(_base({"schedule": "sync"})).identity() == plain
    assert validate(_base(FEDBUFF)).identity() != plain
    assert build_schedule(validate(_base({"schedule": "sync"}))) is None


def test_schedules_are_built_with_their_parameters_and_attached_to_the_strategy():
    buff = build_strategy(validate(_base({**FEDBUFF, "staleness": "polynomial",
                                          "staleness_a": 0.5})))
    assert isinstance(buff.schedule, FedBuffSchedule)
    assert buff.schedule.describe() == {"name": "fedbuff", "concurrency": 5, "buffer_size": 3,
                                        "staleness": {"name": "polynomial", "a": 0.5}}
    fa = build_schedule(validate(_base(FEDASYNC)))
    assert isinstance(fa, FedAsyncSchedule) and fa.mixer.alpha == 0.6
    timed = build_schedule(validate(_base(clock={"speed_sigma": 0.5})))
    assert isinstance(timed, SyncSchedule) and timed.clock is not None


@pytest.mark.parametrize("strategy, sections, key, fragment", [
    ({"schedule": "fedbuff", "concurrency": 5}, {}, "strategy.buffer_size", "required"),
    ({"schedule": "fedasync", "concurrency": 5}, {}, "strategy.alpha", "required"),
    ({**FEDBUFF, "alpha": 0.5}, {}, "strategy.alpha", "only with strategy.schedule = "
     "'fedasync'"),
    ({"buffer_size": 3}, {}, "strategy.buffer_size", "'fedbuff'"),
    ({**FEDBUFF, "staleness_b": 2.0}, {}, "strategy.staleness_b", "'hinge'"),
    ({**FEDBUFF, "clients_per_round": 3}, {}, "strategy.clients_per_round", "concurrency"),
    ({**FEDBUFF, "stragglers": 0.2}, {}, "strategy.stragglers", "[clock]"),
    (FEDASYNC, {"runtime": {"secure_aggregation": True}}, "strategy.schedule",
     "no sum over several clients to mask"),
    (FEDBUFF, {"runtime": {"secure_aggregation": True},
               "privacy": {"mode": "distributed", "mechanism": "skellam", "clip": 1.0,
                           "delta": 1e-5, "noise_multiplier": 1.0, "min_contributors": 3,
                           "rate": 0.5}},
     "strategy.schedule", "Skellam mechanism"),
    (FEDASYNC, {"privacy": {"mode": "central", "clip": 1.0, "delta": 1e-5,
                            "noise_multiplier": 1.0, "rate": 0.5}},
     "privacy.rate", "asynchronous dispatch is not Poisson sampling"),
    (FEDBUFF, {"robust": {"aggregator": "median"}}, "strategy.schedule", "whole cohort"),
])
def test_config_refusals_name_the_key_and_the_reason(strategy, sections, key, fragment):
    with pytest.raises(ConfigError) as info:
        validate(_base(strategy, **sections))
    assert info.value.key == key and fragment in str(info.value)


def test_the_grpc_deployment_gets_the_live_schedule_and_no_clock():
    # Live mode itself: tests/runtime/test_live_schedules.py.
    buff = build_strategy(validate(_base(FEDBUFF)), deployment=True)
    assert isinstance(buff.schedule, FedBuffSchedule) and buff.schedule.live
    with pytest.raises(ConfigError, match=r"no \[clock\] table with fedmosaic server"):
        build_strategy(validate(_base(FEDBUFF, clock={"speed_sigma": 0.5})), deployment=True)
    assert not hasattr(build_strategy(validate(_base()), deployment=True), "schedule")


def _server(strategy, fed, schedule, transport=None):
    trainer = fm.TorchTrainer(lambda: MLP(5, [8], 3), lr=0.1, batch_size=8)
    return fm.Server(trainer=trainer, strategy=strategy, rounds=2, schedule=schedule,
                     transport=transport or SequentialTransport(trainer, fed))


@pytest.mark.parametrize("schedule", [lambda: FedBuffSchedule(2, 3),
                                      lambda: FedAsyncSchedule(0.5, 3)])
def test_python_api_refuses_dp_robust_stragglers_and_secure_aggregation(blobs_fed, schedule):
    dp = DPFedAvg(clip=1.0, noise_multiplier=1.0, delta=1e-5, sampling="fixed",
                  clients_per_round=3)
    with pytest.raises(ConfigError, match=r"accounting assumes sampled synchronous rounds"):
        _server(dp, blobs_fed, schedule())
    robust = fm.FedAvg(weighting="uniform", robust=make_robust("median", f=1))
    with pytest.raises(ConfigError, match="whole cohort"):
        _server(robust, blobs_fed, schedule())
    with pytest.raises(ConfigError, match="slow clients come from the clock"):
        _server(fm.FedAvg(stragglers=0.3), blobs_fed, schedule())
    from fedmosaic.privacy.secagg.transport import SecAggPlusTransport

    trainer = fm.TorchTrainer(lambda: MLP(5, [8], 3), lr=0.1, batch_size=8)
    secure = SecAggPlusTransport(SequentialTransport(trainer, blobs_fed), clip=1.0,
                                 max_weight=100.0)
    # FedBuff runs SecAgg+ per buffer (tests/privacy/test_secagg_fedbuff.py), but not over 2.
    sched = schedule()
    with pytest.raises(ConfigError, match="no sum over several clients" if
                       isinstance(sched, FedAsyncSchedule) else "buffer size SecAgg\\+ can run"):
        _server(fm.FedAvg(), blobs_fed, sched, transport=secure)


def test_fedmosaic_run_executes_the_experiments_fedbuff_schedule_under_its_clock(tmp_path):
    import json
    import subprocess
    import sys

    (tmp_path / "exp.toml").write_text("""
name = "buff"
seed = 2
rounds = 4

[data]
dataset = "digits"

[partition]
clients = 8

[model]
hidden = [16]

[strategy]
schedule = "fedbuff"
buffer_size = 2
concurrency = 4

[clock]
speed_sigma = 1.0
""")
    run = subprocess.run([sys.executable, "-m", "fedmosaic.cli", "run", "exp.toml", "-o", "out"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    records = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [r["version"] for r in records] == [1, 2, 3, 4]
    assert all(r["updates"] == 2 and r["sim_time"] > 0 for r in records)


def test_a_hinge_without_slope_is_a_config_error_naming_the_key():
    exp = validate(_base({**FEDASYNC, "staleness": "hinge", "staleness_a": 0.0}))
    with pytest.raises(ConfigError) as info:
        build_schedule(exp)
    assert info.value.key == "strategy.staleness_a"


ASYNC_CLI = """
name = "buff"
seed = 4
rounds = {rounds}

[data]
dataset = "digits"

[partition]
method = "dirichlet"
clients = 20

[model]
hidden = [32]

[train]
epochs = 2

[strategy]
schedule = "fedbuff"
buffer_size = 3
concurrency = 6

[server_opt]
name = "fedadam"
lr = 0.01

[clock]
speed_sigma = 1.0
jitter = 0.2
"""


@pytest.mark.slow
def test_fedbuff_killed_with_sigkill_and_resumed_equals_the_uninterrupted_run(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    import torch

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "fedmosaic.cli", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)

    rounds = 60
    (tmp_path / "exp.toml").write_text(ASYNC_CLI.format(rounds=rounds))
    full = cli("run", "exp.toml", "-o", "full")
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen([sys.executable, "-m", "fedmosaic.cli", "run", "exp.toml", "-o",
                             "cut"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("round 3/"):
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert 3 <= saved["round"] < rounds, f"kill came too late (step {saved['round']})"
    assert saved["schedule"]["tasks"]
    res = cli("resume", "cut")
    assert res.returncode == 0, res.stderr
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    import json

    whole = json.loads((tmp_path / "full" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    drop = ("wall_time",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in whole] == \
        [{k: v for k, v in r.items() if k not in drop} for r in resumed]
