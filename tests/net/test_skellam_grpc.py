"""Distributed Skellam over gRPC: the server sends the round's public mechanism parameters with
the SecAgg+ task, each client checks them (wire validation, its privacy policy) and encodes its
own update with noise from its own SecureNoise, the server decodes the unmasked ring sum.

In process: ``Server`` + ``GrpcTransport`` + ``start_server`` on loopback with mutual TLS,
clients as threads calling ``run_client`` (the pattern of ``test_inprocess.py``)."""

from __future__ import annotations

import json
import math
import re
import threading
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from fedmosaic.data import FederatedDataset
from fedmosaic.models import build_model
from fedmosaic.net.certs import create_federation
from fedmosaic.net.policy import PolicyViolation, PrivacyPolicy
from fedmosaic.net.proto import fedmosaic_pb2 as pb
from fedmosaic.net.secagg import SecAggRoundDriver
from fedmosaic.net.wire import WireError, skellam_from_wire, skellam_to_wire
from fedmosaic.privacy.distributed_skellam import DistributedSkellam
from fedmosaic.privacy.secagg.transport import SecAggPlusTransport
from fedmosaic.privacy.skellam import SkellamMechanism
from fedmosaic.runtime.simulate import simulate
from fedmosaic.runtime.transport import SequentialTransport
from fedmosaic.train import TorchTrainer
from tests.net.conftest import CLIENTS, Processes, experiment_toml, wait_for_endpoint
from tests.net.harness import deploy_in_process
from tests.net.test_policy import _client, _task

ROUNDS = 2
Z = 0.02  # the task's noise multiplier: small, so the deployed model stays near the simulated
_FIT_LOCK = threading.Lock()


class _ClientThreadTrainer(TorchTrainer):
    """Client threads share torch's global RNG, which each fit seeds: fits must not
    interleave (separate client processes need no lock)."""

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        with _FIT_LOCK:
            return super().fit(*args, **kwargs)


def _trainer(cls: type[TorchTrainer] = TorchTrainer) -> TorchTrainer:
    return cls(partial(build_model, "mlp", (5,), 3, hidden=(8,)), lr=0.1, batch_size=8)


def _strategy(**kw: Any) -> DistributedSkellam:
    args: dict[str, Any] = dict(clip=1.0, delta=1e-5, noise_multiplier=Z, sampling="fixed",
                                clients_per_round=6, min_contributors=4, bits=32)
    args.update(kw)
    return DistributedSkellam(**args)


@pytest.fixture(scope="module")
def blobs_federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("skellam-fed")
    create_federation(root, clients=[f"c{i}" for i in range(6)], ca_passphrase=None)
    return root


def _deploy(fed: FederatedDataset, credentials: Path, strategy: DistributedSkellam,
            policies: dict[str, PrivacyPolicy] | None = None) -> tuple[Any, dict[str, Any]]:
    return deploy_in_process(
        fed, credentials, strategy, trainer=_trainer(),
        client_trainer=partial(_trainer, _ClientThreadTrainer), rounds=ROUNDS,
        secagg=SecAggRoundDriver(clip=1.0, max_weight=1.0, uniform=True), policies=policies)


def _simulated(fed: FederatedDataset) -> Any:
    tr = _trainer()
    return simulate(tr, fed, _strategy(), ROUNDS, seed=5,
                    transport=SecAggPlusTransport(SequentialTransport(tr, fed), seed=1))


def test_skellam_over_grpc_trains_like_the_simulation_within_the_noise(
        blobs_fed: FederatedDataset, blobs_federation: Path) -> None:
    result, reports = _deploy(blobs_fed, blobs_federation, _strategy())
    assert all(r.rounds == [1, 2] for r in reports.values()) and len(reports) == 6
    assert [r["updates"] for r in result.history] == [6, 6]
    eps = [r["dp_epsilon"] for r in result.history]
    assert 0 < eps[0] < eps[1] and "dp_round_discarded" not in result.history[-1]
    # Same cohort, same local training (the FitConfig seeds come from the same run seed):
    # the models differ only by the two runs' independent noise and rounding. Per round the
    # mean carries Sk(6 mu / m) / gamma / 6, std sqrt(6/4) * Z * clip / 6 per coordinate.
    sim = _simulated(blobs_fed)
    per_round = math.sqrt(6 / 4) * Z / 6
    diff = (result.weights - sim.weights).double()
    expected = per_round * math.sqrt(2 * ROUNDS)  # two independent runs, two rounds each
    assert 0.3 * expected < float(diff.std()) < 3 * expected
    assert result.history[-1]["dp_epsilon"] == pytest.approx(sim.history[-1]["dp_epsilon"])
    dp = result.guarantees["differential_privacy"]
    assert dp["mechanism"].startswith("distributed Skellam") and dp["rounds"] == 2
    assert "SecureNoise" in dp["noise_seed"]
    sa = result.guarantees["secure_aggregation"]
    assert "over gRPC" in sa["protocol"] and sa["ring_bits"] == 32
    assert sa["encoding"]["mechanism"] == "skellam"
    assert "SecureNoise" in sa["client_noise"]


def test_a_client_whose_policy_wants_more_noise_refuses_and_the_round_goes_on(
        blobs_fed: FederatedDataset, blobs_federation: Path, tmp_path: Path) -> None:
    strict = PrivacyPolicy.from_dict({"secagg": {"mode": "secagg+"},
                                      "dp": {"min_noise_multiplier": 0.5},
                                      "ledger": str(tmp_path / "c0.ledger.json")})
    result, reports = _deploy(blobs_fed, blobs_federation, _strategy(), {"c0": strict})
    assert reports["c0"].refused == [1, 2] and reports["c0"].rounds == []
    assert all(reports[c].rounds == [1, 2] for c in blobs_fed.client_ids if c != "c0")
    # Five shares >= min_contributors = 4: the sums are applied and accounted.
    assert [(r["updates"], r["failures"]) for r in result.history] == [(5, 1), (5, 1)]
    assert "dp_round_discarded" not in result.history[-1]
    assert result.guarantees["differential_privacy"]["rounds"] == 2


@pytest.mark.slow
def test_fedmosaic_server_and_client_processes_run_skellam(
        tmp_path: Path, federation: Path, processes: Processes) -> None:
    """``fedmosaic server`` with ``[privacy] mode = "distributed", mechanism = "skellam"`` and
    ten ``fedmosaic client`` processes, one of whose policy asks for more noise."""
    experiment = experiment_toml(
        tmp_path / "exp.toml", federation, rounds=1, server={"wait_for_clients": 60.0},
        extra="[runtime]\nsecure_aggregation = true\n\n[privacy]\nmode = \"distributed\"\n"
              "mechanism = \"skellam\"\nclip = 1.0\ndelta = 1e-5\nnoise_multiplier = 0.5\n"
              "rate = 1.0\nmin_contributors = 5\nbits = 32\nmax_clients = 10\n")
    strict = tmp_path / "strict.toml"
    strict.write_text(f'ledger = "{tmp_path / "strict.ledger.json"}"\n\n[secagg]\n'
                      'mode = "secagg+"\n\n[dp]\nmin_noise_multiplier = 2.0\n')
    out = tmp_path / "out"
    processes.server(experiment, out)
    port = wait_for_endpoint(out, processes)["port"]
    for cid in CLIENTS:
        policy = ("--policy", str(strict)) if cid == "client_09" else ()
        processes.client(cid, port, federation, experiment, *policy)
    assert processes.wait("server", 120) == 0, processes.log("server")
    for cid in CLIENTS:
        assert processes.wait(cid, 120) == 0, processes.log(cid)
    assert "refusing the task (noise_multiplier)" in processes.log("client_09")
    [record] = json.loads((out / "metrics.json").read_text())
    assert (record["updates"], record["failures"]) == (9, 1)
    assert record["dp_epsilon"] > 0 and "dp_round_discarded" not in record
    guarantees = json.loads((out / "guarantees.json").read_text())["guarantees"]
    assert guarantees["differential_privacy"]["mechanism"].startswith("distributed Skellam")
    assert "SecureNoise" in guarantees["differential_privacy"]["noise_seed"]
    assert guarantees["secure_aggregation"]["encoding"]["mechanism"] == "skellam"
    assert "SecureNoise" in guarantees["secure_aggregation"]["client_noise"]


def _mechanism(**kw: Any) -> SkellamMechanism:
    args: dict[str, Any] = dict(dim=75, clip=1.0, gamma=50.0, mu=(50.0 * 0.8) ** 2,
                                min_contributors=4, max_clients=6, bits=32)
    args.update(kw)
    return SkellamMechanism(**args)


def _settings(mech: SkellamMechanism) -> pb.SecAggSettings:
    return pb.SecAggSettings(clip=mech.clip, max_weight=1.0, uniform_weighting=True,
                             bits=mech.bits, skellam=skellam_to_wire(mech))


def test_the_mechanism_round_trips_through_the_wire() -> None:
    mech = _mechanism(rotation_seed=2**63 + 5)
    assert skellam_from_wire(_settings(mech), 75) == mech
    assert skellam_from_wire(pb.SecAggSettings(clip=1.0, bits=32), 75) is None


@pytest.mark.parametrize(("field", "value", "problem"), [
    ("gamma", float("nan"), "not finite"),
    ("mu", float("inf"), "not finite"),
    ("clip", -1.0, "clip must be a positive"),
    ("mu", 0.0, "mu (Skellam variance) must be"),
    ("beta", 1.5, "beta must be in"),
    ("min_contributors", 0, "min_contributors"),
    ("max_clients", 3, "max_clients"),  # below min_contributors = 4
    ("max_clients", 10**7, "max_clients"),
    ("max_wrap_probability", 0.5, "max_wrap_probability"),
    ("encoded_dim", 75, "encoded coordinates"),  # d' is 128 with the rotation
    ("gamma", 1e9, "modular clipping"),  # the sum could wrap around mod 2^32
])
def test_malformed_skellam_settings_are_refused(field: str, value: float, problem: str) -> None:
    settings = _settings(_mechanism())
    setattr(settings.skellam, field, value)
    with pytest.raises(WireError, match=re.escape(problem)):
        skellam_from_wire(settings, 75)


def test_weighted_or_wrong_ring_skellam_settings_are_refused() -> None:
    settings = _settings(_mechanism())
    settings.uniform_weighting = False
    with pytest.raises(WireError, match="uniform_weighting"):
        skellam_from_wire(settings, 75)
    settings = _settings(_mechanism())
    settings.bits = 80
    with pytest.raises(WireError, match="bits must be in"):
        skellam_from_wire(settings, 75)


def test_the_client_refuses_malformed_skellam_settings_before_downloading() -> None:
    client, stubs = _client(None)
    numel = 6  # the fake client's model: Linear(2, 2)
    task = _task(numel, [], secagg_bits=32)
    task.secagg.CopyFrom(_settings(_mechanism(dim=numel)))
    task.secagg.skellam.mu = float("nan")
    client._run_task(task)  # type: ignore[attr-defined]
    assert [r.code for r in stubs.refusals] == ["malformed_task"]
    assert "Skellam" in stubs.refusals[0].reason and stubs.downloads == 0


def test_the_policy_checks_the_skellam_noise_multiplier_and_clip() -> None:
    # z = sqrt(assumed * mu / m) / (gamma * clip): mu = (50 * 0.8)^2, m = 4.
    mech = _mechanism()
    policy = PrivacyPolicy.from_dict({"dp": {"min_noise_multiplier": 0.5}})
    with pytest.raises(PolicyViolation) as caught:
        policy.check([], 32, skellam=mech)  # z = 0.8 / 2 = 0.4 with one assumed share
    assert caught.value.code == "noise_multiplier" and "0.4" in caught.value.reason
    trusting = PrivacyPolicy.from_dict({"dp": {"min_noise_multiplier": 0.5,
                                               "assumed_contributors": 4}})
    assert trusting.check([], 32, skellam=mech).releases == ()  # z = 0.8: accepted
    # A server that raises m to shrink each client's share lowers z below the floor.
    with pytest.raises(PolicyViolation, match=r"noise multiplier 0\.4"):
        trusting.check([], 32, skellam=_mechanism(min_contributors=16, max_clients=16))
    with pytest.raises(PolicyViolation) as caught:
        PrivacyPolicy.from_dict({"dp": {"max_clip": 0.5}}).check([], 32, skellam=mech)
    assert caught.value.code == "clip"
    # Skellam counts as DP noise for a policy that requires some.
    assert PrivacyPolicy.from_dict({"dp": {"min_noise_multiplier": 0.1}}).check(
        [], 32, skellam=mech).releases == ()
