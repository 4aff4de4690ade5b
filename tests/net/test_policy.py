"""The client's privacy policy (``fedmosaic.net.policy``): the file, the checks of a task, the
persisted epsilon ledger, and the validation of refusal messages (``wire.check_refusal``)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch

from fedmosaic.net.policy import (
    PolicyError,
    PolicyViolation,
    PrivacyLedger,
    PrivacyPolicy,
    default_ledger_path,
)
from fedmosaic.net.proto import fedmosaic_pb2 as pb
from fedmosaic.net.wire import (
    MAX_REFUSAL_REASON,
    REFUSAL_CODES,
    WireError,
    check_refusal,
    printable_reason,
)
from fedmosaic.privacy.local_dp import DistributedNoiseShare, LocalDP

REPO = Path(__file__).resolve().parents[2]


def _policy(**tables: dict[str, object]) -> PrivacyPolicy:
    return PrivacyPolicy.from_dict(dict(tables))


def _violation(policy: PrivacyPolicy, stages: list[object], bits: int | None,
               ledger: PrivacyLedger | None = None) -> PolicyViolation:
    with pytest.raises(PolicyViolation) as info:
        policy.check(stages, bits, ledger)  # type: ignore[arg-type]
    assert info.value.code in REFUSAL_CODES
    return info.value


# -- the file ----------------------------------------------------------------------------------

def test_example_policy_loads_with_every_key() -> None:
    policy = PrivacyPolicy.load(REPO / "examples" / "client_policy.toml")
    assert policy.secagg.required and policy.secagg.min_bits == 32
    assert (policy.secagg.min_population, policy.secagg.max_population) == (5, 1000)
    assert policy.secagg.corrupted_fraction == policy.secagg.dropout_fraction == 0.2
    assert policy.dp.min_noise_multiplier == 1.0 and policy.dp.max_clip == 1.0
    assert policy.dp.epsilon_budget == 20.0 and policy.dp.delta == 1e-5
    assert policy.dp.assumed_contributors == 10 and policy.ledger is None


def test_secagg_bounds_reach_the_secagg_client_under_its_own_names() -> None:
    from fedmosaic.privacy.secagg import SecAggBounds

    policy = _policy(secagg={"min_population": 4, "max_population": 50,
                             "corrupted_fraction": 0.1, "dropout_fraction": 0.3,
                             "security_bits": 30, "every_graph": True})
    bounds = policy.secagg.bounds()
    assert isinstance(bounds, SecAggBounds) and bounds.every_graph
    assert (bounds.min_clients, bounds.max_clients) == (4, 50)
    assert (bounds.corrupted_fraction, bounds.dropout_rate, bounds.security_bits) == \
        (0.1, 0.3, 30)
    assert _policy(secagg={"mode": "secagg+"}).secagg.bounds() is None  # the client's defaults


@pytest.mark.parametrize(("text", "key"), [
    ("[dp]\nmin_noise = 1.0\n", "dp.min_noise"),
    ("[secagg]\nmode = \"plaintext\"\n", "secagg.mode"),
    ("[secagg]\nmin_bits = 1\n", "secagg.min_bits"),
    ("[secagg]\nmin_bits = 32.5\n", "secagg.min_bits"),
    ("[secagg]\nmin_population = 10\nmax_population = 5\n", "secagg.max_population"),
    ("[secagg]\ncorrupted_fraction = 1.0\n", "secagg.corrupted_fraction"),
    ("[secagg]\ndropout_fraction = -0.1\n", "secagg.dropout_fraction"),
    ("[secagg]\nsecurity_bits = 0\n", "secagg.security_bits"),
    ("[secagg]\nevery_graph = 1\n", "secagg.every_graph"),
    ("[dp]\nmin_noise_multiplier = -1\n", "dp.min_noise_multiplier"),
    ("[dp]\nmax_clip = \"1\"\n", "dp.max_clip"),
    ("[dp]\nepsilon_budget = nan\n", "dp.epsilon_budget"),
    ("[dp]\ndelta = 1.5\n", "dp.delta"),
    ("[dp]\nassumed_contributors = 0\n", "dp.assumed_contributors"),
    ("[dp]\nepsilon_budget = true\n", "dp.epsilon_budget"),
    ("dp = 3\n", "dp"),
    ("budget = 3\n", "budget"),
    ("ledger = \"\"\n", "ledger"),
])
def test_a_wrong_policy_file_is_an_error_naming_the_file_and_key(
        tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        PrivacyPolicy.load(path)
    assert f"config key '{key}'" in str(info.value) and str(path) in str(info.value)


def test_unparsable_or_missing_policy_file_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[dp\n")
    with pytest.raises(PolicyError, match=r"bad\.toml"):
        PrivacyPolicy.load(bad)
    with pytest.raises(PolicyError, match=r"missing\.toml"):
        PrivacyPolicy.load(tmp_path / "missing.toml")


def test_ledger_path_is_relative_to_the_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "policy.toml"
    path.parent.mkdir()
    path.write_text('ledger = "state/ledger.json"\n')
    assert PrivacyPolicy.load(path).ledger == tmp_path / "conf" / "state" / "ledger.json"
    assert default_ledger_path(tmp_path / "clients" / "c1.key") == \
        tmp_path / "clients" / "c1.privacy-ledger.json"


# -- the checks --------------------------------------------------------------------------------

def test_an_empty_policy_accepts_everything_as_before() -> None:
    accepted = PrivacyPolicy().check([], None)
    assert accepted.releases == () and accepted.epsilon_after is None


def test_required_secure_aggregation_refuses_a_plaintext_task() -> None:
    policy = _policy(secagg={"mode": "secagg+", "min_bits": 32})
    assert _violation(policy, [], None).code == "secagg_required"
    assert _violation(policy, [], 16).code == "secagg_bits"
    assert policy.check([], 32).releases == ()
    assert _policy(secagg={"mode": "none"}).check([], None).releases == ()


def test_minimum_noise_multiplier_and_maximum_clip_for_local_dp() -> None:
    policy = _policy(dp={"min_noise_multiplier": 2.0, "max_clip": 1.0})
    refused = _violation(policy, [LocalDP(clip=1.0, noise_multiplier=1.0)], None)
    assert refused.code == "noise_multiplier" and "below this client's minimum of 2" in \
        refused.reason
    assert _violation(policy, [LocalDP(clip=2.0, noise_multiplier=3.0)], None).code == "clip"
    accepted = policy.check([LocalDP(clip=1.0, noise_multiplier=2.0)], None)
    assert [(r.mechanism, r.noise) for r in accepted.releases] == [("gaussian", 1.0)]
    # Omitting the stage does not get around the floor.
    assert _violation(policy, [], None).code == "no_dp"
    assert _violation(policy, [], 32).code == "no_dp"


def test_distributed_noise_counts_assumed_contributors_only_under_secure_aggregation() -> None:
    share = DistributedNoiseShare(clip=1.0, noise_std=1.0)  # z = 1 per share
    policy = _policy(dp={"min_noise_multiplier": 2.0, "assumed_contributors": 4})
    # Under SecAgg+ the sum of 4 shares has z = sqrt(4) * 1 = 2: accepted, not charged.
    assert policy.check([share], 32).releases == ()
    # Uploaded alone (no secure aggregation) the server sees z = 1: refused.
    refused = _violation(policy, [share], None)
    assert refused.code == "noise_multiplier" and "alone" in refused.reason
    assert _violation(_policy(dp={"min_noise_multiplier": 2.0, "assumed_contributors": 3}),
                      [share], 32).code == "noise_multiplier"  # sqrt(3) < 2
    # Without the floor, a plaintext share is charged as local DP with z = noise_std / clip.
    charged = _policy().check([share], None).releases
    assert [(r.mechanism, r.noise) for r in charged] == [("gaussian", 0.5)]


def test_laplace_must_be_as_private_as_the_weakest_accepted_gaussian() -> None:
    policy = _policy(dp={"min_noise_multiplier": 2.0})
    # z = 2 local Gaussian: one round is (4.73, 1e-5)-DP.
    assert policy.check([LocalDP(clip=1.0, mechanism="laplace", epsilon=4.5)], None).releases
    refused = _violation(policy, [LocalDP(clip=1.0, mechanism="laplace", epsilon=5.0)], None)
    assert refused.code == "noise_multiplier" and "Laplace" in refused.reason


def test_maximum_epsilon_per_round() -> None:
    policy = _policy(dp={"max_epsilon_per_round": 5.0})
    assert policy.check([LocalDP(clip=1.0, noise_multiplier=2.0)], None)  # 4.73
    refused = _violation(policy, [LocalDP(clip=1.0, noise_multiplier=1.9)], None)
    assert refused.code == "epsilon_per_round"


# -- the ledger --------------------------------------------------------------------------------

def test_epsilon_budget_stops_the_client_after_n_rounds_and_survives_a_restart(
        tmp_path: Path) -> None:
    stage = LocalDP(clip=1.0, noise_multiplier=2.0)
    two = stage.guarantee(rounds=2)["epsilon_total"]
    three = stage.guarantee(rounds=3)["epsilon_total"]
    budget = (two + three) / 2
    policy = _policy(dp={"epsilon_budget": budget})
    path = tmp_path / "c1.privacy-ledger.json"
    with PrivacyLedger(path) as ledger:
        for round_num in (1, 2):
            accepted = policy.check([stage], None, ledger)
            spent = ledger.charge(accepted.releases, budget=budget, round_num=round_num,
                                  experiment="x")
            assert spent == pytest.approx(accepted.epsilon_after)
        # The client's own accountant agrees with LocalDP's guarantee for two reports.
        assert ledger.epsilon() == pytest.approx(two, rel=1e-9)
        assert _violation(policy, [stage], None, ledger).code == "epsilon_budget"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text())
    assert [r["round"] for r in data["releases"]] == [1, 2]
    # A restart reads the ledger back: the budget is not reset.
    with PrivacyLedger(path) as again:
        assert again.epsilon() == pytest.approx(two, rel=1e-9)
        refused = _violation(policy, [stage], None, again)
        assert f"released epsilon {two:.4g}" in refused.reason
        with pytest.raises(PolicyViolation):
            again.charge(PrivacyPolicy().check([stage], None).releases, budget=budget,
                         round_num=3, experiment="x")
        assert again.epsilon() == pytest.approx(two, rel=1e-9)  # nothing recorded


def test_budget_refuses_an_unnoised_plaintext_upload_but_not_an_unnoised_secure_sum(
        tmp_path: Path) -> None:
    policy = _policy(dp={"epsilon_budget": 10.0})
    with PrivacyLedger(tmp_path / "l.json") as ledger:
        assert _violation(policy, [], None, ledger).code == "epsilon_budget"
        assert policy.check([], 32, ledger).releases == ()
        # Local DP is charged under SecAgg+ too: a server can try to isolate one client.
        assert policy.check([LocalDP(clip=1.0, noise_multiplier=3.0)], 32, ledger).releases


def test_one_ledger_per_process_and_an_unreadable_ledger_stops_the_client(
        tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    with PrivacyLedger(path), pytest.raises(PolicyError, match="in use"):
        PrivacyLedger(path)
    with PrivacyLedger(path):  # the lock was released
        pass
    path.write_text("{not json")
    with pytest.raises(PolicyError, match="unreadable"):
        PrivacyLedger(path)
    path.write_text(json.dumps({"format": "something else", "version": 1}))
    with pytest.raises(PolicyError, match="unreadable"):
        PrivacyLedger(path)


def test_ledger_composes_mixed_mechanisms_with_the_rdp_accountant(tmp_path: Path) -> None:
    from fedmosaic.privacy.accountant import PrivacyAccountant

    policy = PrivacyPolicy()
    gauss = policy.check([LocalDP(clip=1.0, noise_multiplier=3.0)], None).releases
    lap = policy.check([LocalDP(clip=1.0, mechanism="laplace", epsilon=0.5)], None).releases
    with PrivacyLedger(tmp_path / "l.json") as ledger:
        ledger.charge(gauss, budget=None, round_num=1, experiment="x")
        ledger.charge(lap, budget=None, round_num=2, experiment="x")
        reference = PrivacyAccountant("rdp", "add_remove")
        reference.record_gaussian_round(1.5, "none")
        reference.record_laplace(2.0)
        assert ledger.epsilon() == pytest.approx(reference.epsilon(1e-5), rel=1e-12)
        assert 0 < ledger.epsilon() < LocalDP(clip=1.0, noise_multiplier=3.0).guarantee(
            1)["epsilon_total"] + 0.5 + 1e-9


# -- refusal messages --------------------------------------------------------------------------

@pytest.mark.parametrize(("code", "reason"), [
    ("not_a_code", "fine"),
    ("", "fine"),
    ("clip", ""),
    ("clip", "line one\nforged log line"),
    ("clip", "bell\x07"),
    ("clip", "x" * (MAX_REFUSAL_REASON + 1)),
])
def test_malformed_refusals_are_wire_errors(code: str, reason: str) -> None:
    with pytest.raises(WireError):
        check_refusal(pb.TaskRefusal(code=code, reason=reason))


def test_what_a_client_sends_always_passes_the_servers_check() -> None:
    for text in ("plain", "tab\there\nnewline", "\x00\x01", "", "é" * 2000):
        reason = printable_reason(text)
        assert check_refusal(pb.TaskRefusal(code="clip", reason=reason)) == ("clip", reason)
    assert len(printable_reason("y" * 5000)) == MAX_REFUSAL_REASON


# -- the client's task handling (no server: the RPCs are recorded) -----------------------------

class _FakeStubs:
    """Stands in for the client's RPC stubs; records refusals, fails a download or upload."""

    def __init__(self) -> None:
        self.refusals: list[pb.TaskRefusal] = []
        self.downloads = 0

    def refuse_task(self, msg: pb.TaskRefusal, timeout: float) -> pb.RefusalReply:
        self.refusals.append(msg)
        return pb.RefusalReply(detail="recorded")

    def download(self, msg: pb.ModelRequest, timeout: float) -> list[pb.TensorChunk]:
        self.downloads += 1
        raise AssertionError("a refused task must not be downloaded")

    def upload(self, messages: object, timeout: float) -> pb.UploadReply:
        raise AssertionError("a refused task must not be uploaded")


def _client(policy: PrivacyPolicy | None) -> tuple[object, _FakeStubs]:
    import grpc

    from fedmosaic.net.client import FederationClient
    from fedmosaic.train import TorchTrainer

    trainer = TorchTrainer(lambda: torch.nn.Linear(2, 2))
    client = FederationClient(grpc.insecure_channel("127.0.0.1:9"), trainer, None,  # type: ignore[arg-type]
                              policy=policy)
    stubs = _FakeStubs()
    client.stubs = stubs  # type: ignore[assignment]
    return client, stubs


def _task(numel: int, stages: list[pb.StageSpec], secagg_bits: int | None = None) -> pb.Task:
    task = pb.Task(kind=pb.Task.FIT, task_id=b"t" * 16, round=3, numel=numel,
                   config=pb.FitSettings(round=3, seed=1), stages=stages)
    if secagg_bits is not None:
        task.secagg.CopyFrom(pb.SecAggSettings(clip=1.0, max_weight=1.0, bits=secagg_bits))
    return task


def test_the_client_refuses_before_downloading_and_never_uploads() -> None:
    client, stubs = _client(_policy(secagg={"mode": "secagg+"}))
    client._run_task(_task(6, []))  # type: ignore[attr-defined]
    assert [(r.code, r.round, r.task_id) for r in stubs.refusals] == \
        [("secagg_required", 3, b"t" * 16)]
    assert check_refusal(stubs.refusals[0])[0] == "secagg_required"
    assert stubs.downloads == 0 and client.report.refused == [3]  # type: ignore[attr-defined]


def test_the_client_refuses_a_malformed_task_with_a_reason() -> None:
    client, stubs = _client(None)  # even without a policy: the server learns why at once
    client._run_task(_task(6, [pb.StageSpec(kind="bogus", params={"x": 1.0})]))  # type: ignore[attr-defined]
    assert [r.code for r in stubs.refusals] == ["malformed_task"]
    assert "unknown client stage 'bogus'" in stubs.refusals[0].reason
    wrong_size = _task(7, [])
    client._run_task(wrong_size)  # type: ignore[attr-defined]
    assert [r.code for r in stubs.refusals] == ["malformed_task"] * 2 and stubs.downloads == 0


def test_fedmosaic_client_rejects_a_bad_policy_before_connecting(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedmosaic.cli import app

    bad = tmp_path / "policy.toml"
    bad.write_text("[dp]\nmin_noise_multiplier = -1\n")
    result = CliRunner().invoke(app, [
        "client", "--server", "127.0.0.1:9", "--ca", "ca.pem", "--cert", "c.pem", "--key",
        "c.key", "--data", "x.npz", "--trainer", "m:t", "--policy", str(bad)])
    assert result.exit_code == 2
    assert "dp.min_noise_multiplier" in " ".join(result.output.split())
