"""``[privacy] mode = "distributed"`` with ``mechanism = "skellam"`` in experiment files."""

import pytest

from fedmosaic.build import build_data, build_strategy, build_trainer, build_transport
from fedmosaic.config import validate
from fedmosaic.core import ConfigError
from fedmosaic.privacy.distributed_skellam import DistributedSkellam
from fedmosaic.privacy.dp_fedavg import DPFedAvg
from fedmosaic.privacy.secagg.transport import SecAggPlusTransport
from fedmosaic.runtime import Server


def _exp(**privacy):
    p = {"mode": "distributed", "clip": 0.5, "delta": 1e-5, "noise_multiplier": 1.0,
         "rate": 0.5, "min_contributors": 2}
    p.update(privacy)
    return {"rounds": 2, "data": {"dataset": "digits"}, "partition": {"clients": 10},
            "model": {"kind": "logreg"},
            "runtime": {"secure_aggregation": True}, "privacy": p}


def test_skellam_from_the_experiment_file_builds_and_runs_a_round():
    exp = validate(_exp(mechanism="skellam", bits=24, max_clients=10,
                        rate=1.0))
    fed = build_data(exp)
    trainer = build_trainer(exp, fed)
    transport = build_transport(exp, fed, trainer)
    strategy = build_strategy(exp)
    assert isinstance(strategy, DistributedSkellam) and isinstance(transport, SecAggPlusTransport)
    assert strategy.bits == 24 and strategy.max_clients == 10 and strategy.rate == 1.0
    server = Server(trainer=trainer, strategy=strategy, transport=transport, rounds=1, seed=0)
    state = server.run()
    assert state.history[0]["dp_epsilon"] > 0
    assert strategy.mechanism is not None and strategy.mechanism.bits == 24
    # The Gaussian default is unchanged.
    assert isinstance(build_strategy(validate(_exp())), DPFedAvg)


def test_skellam_keys_are_checked():
    with pytest.raises(ConfigError, match=r"only with privacy\.mechanism = 'skellam'"):
        validate(_exp(bits=20))
    with pytest.raises(ConfigError, match="own RDP accountant"):
        validate(_exp(mechanism="skellam", accountant="pld"))
    with pytest.raises(ConfigError, match="'gaussian' or 'skellam'"):
        validate(_exp(mechanism="laplace"))
    with pytest.raises(ConfigError, match="distributed mechanism"):
        validate({"rounds": 1, "data": {"dataset": "digits"},
                  "privacy": {"mode": "local", "clip": 1.0, "mechanism": "skellam"}})
    with pytest.raises(ConfigError, match=r"privacy\.bits"):
        validate(_exp(mechanism="skellam", bits=80))
