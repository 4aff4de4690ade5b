"""Client refusals against a live in-process gRPC server (loopback, mutual TLS): the
``RefuseTask`` RPC, hostile refusal messages, and ``run_client`` threads whose privacy
policies refuse the server's tasks (minimum noise, epsilon budget)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from fedmosaic.algorithms.aggregate import FedAvgAggregator
from fedmosaic.algorithms.strategy import ClientTask, FedAvg
from fedmosaic.data import FederatedDataset
from fedmosaic.models import build_model
from fedmosaic.net.certs import FederationPaths, create_federation
from fedmosaic.net.client import _Stubs, run_client
from fedmosaic.net.monitoring import ServerMetrics
from fedmosaic.net.policy import PrivacyLedger, PrivacyPolicy, default_ledger_path
from fedmosaic.net.proto import fedmosaic_pb2 as pb
from fedmosaic.net.server import start_server
from fedmosaic.net.settings import DeploySettings
from fedmosaic.net.transport import GrpcTransport
from fedmosaic.net.wire import MAX_REFUSAL_REASON, iter_chunks, spec_hash
from fedmosaic.privacy.local_dp import LocalDP
from fedmosaic.runtime.simulate import simulate
from fedmosaic.runtime.tally import ClientFailure, RoundTally
from fedmosaic.train import TorchTrainer
from fedmosaic.train.base import FitConfig
from tests.net.harness import LiveClients, live_clients

NUMEL = 1000
CHUNK = 1024
CLIENTS = ["c0", "c1", "c2"]


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("policy-fed")
    create_federation(root, clients=CLIENTS, ca_passphrase=None)
    return root


class Live(LiveClients):
    """A running server (real transport, service and TLS) and raw client calls."""

    def task(self, stubs: _Stubs, instance: str) -> pb.Task:
        task = stubs.get_task(pb.TaskRequest(server_instance=instance, wait_seconds=10),
                              timeout=20)
        assert task.kind == pb.Task.FIT
        return task

    def start_round(self, clients: list[str]) -> tuple[threading.Thread, RoundTally]:
        tasks = [ClientTask(c, FitConfig(round=1, seed=i)) for i, c in enumerate(clients)]
        tally = RoundTally(FedAvgAggregator(), NUMEL, 1)

        def loop() -> None:
            for result in self.transport.fit(torch.zeros(NUMEL), tasks, None):
                tally.add(result)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        return thread, tally


@pytest.fixture
def live(credentials: Path, tmp_path: Path) -> Iterator[Live]:
    fed = Path(shutil.copytree(credentials, tmp_path / "fed"))
    with live_clients(Live, fed, numel=NUMEL, chunk_bytes=CHUNK) as srv:
        yield srv


def _upload(stubs: _Stubs, task: pb.Task) -> pb.UploadReply:
    header = pb.UploadHeader(task_id=task.task_id, round=task.round, num_samples=10,
                             numel=NUMEL)
    messages = [pb.UploadMessage(header=header)] + [
        pb.UploadMessage(chunk=c) for c in iter_chunks(torch.ones(NUMEL), CHUNK)]
    return stubs.upload(iter(messages), timeout=20)


def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details() or ""


def _refusal(task: pb.Task, code: str = "secagg_required",
             reason: str = "policy requires SecAgg+") -> pb.TaskRefusal:
    return pb.TaskRefusal(task_id=task.task_id, round=task.round, code=code, reason=reason)


def test_a_refusal_fails_the_task_at_once_and_no_update_is_taken_for_it(
        live: Live, fedlog: pytest.LogCaptureFixture) -> None:
    a, ia = live.joined("c0")
    b, ib = live.joined("c1")
    start = time.monotonic()
    thread, tally = live.start_round(["c0", "c1"])
    ta, tb = live.task(a, ia), live.task(b, ib)
    reply = a.refuse_task(_refusal(ta), timeout=10)
    assert "recorded" in reply.detail
    status = _Stubs(live.channel("operator")).status(pb.StatusRequest(), timeout=10)
    assert status.round_refused == 1
    # The refused task is spent: no upload and no second refusal for it.
    code, detail = _code(lambda: _upload(a, ta))
    assert code == grpc.StatusCode.FAILED_PRECONDITION, detail
    code, _ = _code(lambda: a.refuse_task(_refusal(ta), timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert _upload(b, tb).accepted
    thread.join(timeout=15)
    assert not thread.is_alive() and time.monotonic() - start < 10  # no deadline wait
    assert tally.count == 1
    assert tally.failures == [ClientFailure("c0", "refused by client: policy requires SecAgg+")]
    assert list(live.transport.refusals) == [(1, "c0", "secagg_required",
                                              "policy requires SecAgg+")]
    snap = live.metrics.snapshot()
    assert snap["clients_dropped"]["refused_by_client"] == 1
    assert "client c0 refused its task (secagg_required): policy requires SecAgg+" in fedlog.text


def test_malformed_or_foreign_refusals_are_refused_and_leave_the_task_open(
        live: Live, fedlog: pytest.LogCaptureFixture) -> None:
    a, ia = live.joined("c0")
    b, ib = live.joined("c1")
    thread, tally = live.start_round(["c0", "c1"])
    ta, tb = live.task(a, ia), live.task(b, ib)
    hostile = [
        _refusal(ta, code="because"),                        # not a known category
        _refusal(ta, code="clip\nINFO forged"),
        _refusal(ta, reason=""),
        _refusal(ta, reason="ok\nWARNING round 1: client c1 refused its task"),  # forged line
        _refusal(ta, reason="\x1b[31mred"),
        _refusal(ta, reason="x" * (MAX_REFUSAL_REASON + 1)),
    ]
    for message in hostile:
        code, detail = _code(lambda m=message: a.refuse_task(m, timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, detail
    undecodable = live.channel("c0").unary_unary("/fedmosaic.v1.Federation/RefuseTask")
    code, detail = _code(lambda: undecodable(b"\x0a\x7f", timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "undecodable" in detail
    # Another client's task, a wrong round, an unknown task id.
    code, _ = _code(lambda: b.refuse_task(_refusal(ta), timeout=10))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    wrong_round = _refusal(ta)
    wrong_round.round = 7
    code, _ = _code(lambda: a.refuse_task(wrong_round, timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    code, _ = _code(lambda: a.refuse_task(pb.TaskRefusal(
        task_id=b"\x00" * 16, round=1, code="clip", reason="r"), timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    # Nothing was failed or logged from the hostile text; both tasks are still open.
    assert _upload(a, ta).accepted and _upload(b, tb).accepted
    thread.join(timeout=15)
    assert tally.count == 2 and tally.failures == []
    assert list(live.transport.refusals) == []
    snap = live.metrics.snapshot()
    assert snap["rejected_messages"]["malformed"] == len(hostile) + 1
    assert snap["clients_dropped"]["refused_by_client"] == 0
    assert "forged" not in fedlog.text and "\x1b" not in fedlog.text
    assert not [r for r in fedlog.records if r.levelno >= 40 or r.exc_info]


def test_refusals_in_a_secure_aggregation_round_end_it_without_waiting(
        credentials: Path, tmp_path: Path) -> None:
    """Under SecAgg+ a refusal arrives before the client says "ready": the secure sum stops
    waiting for it, and with every member refusing the round ends at once."""
    from fedmosaic.net.secagg import SecAggRoundDriver

    fed = Path(shutil.copytree(credentials, tmp_path / "fed"))
    settings = DeploySettings(credentials=fed, address="127.0.0.1", port=0,
                              heartbeat_interval=0.5, round_deadline=30.0, min_clients=1,
                              wait_for_clients=5.0, chunk_bytes=CHUNK, max_workers=16)
    metrics = ServerMetrics()
    transport = GrpcTransport(settings, numel=NUMEL, spec_hash="spec", experiment="test",
                              rounds=1, metrics=metrics,
                              secagg=SecAggRoundDriver(clip=1.0, max_weight=100.0,
                                                       uniform=False, bits=16))
    running = start_server(settings, transport, traffic=metrics)
    live = Live(fed, transport, running.port, metrics)
    try:
        joined = {cid: live.joined(cid) for cid in CLIENTS}
        start = time.monotonic()
        tasks = [ClientTask(c, FitConfig(round=1, seed=i)) for i, c in enumerate(CLIENTS)]
        seen: list[Any] = []
        thread = threading.Thread(target=lambda: seen.extend(transport.fit(
            torch.zeros(NUMEL), tasks, FedAvgAggregator())), daemon=True)
        thread.start()
        for cid, (stubs, instance) in joined.items():
            task = live.task(stubs, instance)
            assert task.HasField("secagg") and task.secagg.bits == 16
            stubs.refuse_task(_refusal(task, code="secagg_bits",
                                       reason=f"{cid}: 16 ring bits, policy needs 32"),
                              timeout=10)
        thread.join(timeout=15)
        assert not thread.is_alive() and time.monotonic() - start < 10
    finally:
        transport.finish()
        for ch in live.channels:
            ch.close()
        running.stop(0)
    failures = sorted((f.client_id, f.reason) for f in seen if isinstance(f, ClientFailure))
    assert failures == [(c, f"refused by client: {c}: 16 ring bits, policy needs 32")
                        for c in CLIENTS]
    assert metrics.snapshot()["clients_dropped"]["refused_by_client"] == len(CLIENTS)


# -- run_client with policies ---------------------------------------------------------------

_FIT_LOCK = threading.Lock()


class _LockedTrainer(TorchTrainer):
    """Client threads share torch's global RNG, which each fit seeds: no interleaving."""

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        with _FIT_LOCK:
            return super().fit(*args, **kwargs)


def _trainer(cls: type[TorchTrainer] = TorchTrainer, hidden: int = 8) -> TorchTrainer:
    return cls(partial(build_model, "mlp", (5,), 3, hidden=(hidden,)), lr=0.1, batch_size=8)


def _deploy(fed: FederatedDataset, credentials: Path, strategy: FedAvg, rounds: int,
            policies: dict[str, Path | None], hidden: int = 8) -> tuple[Any, dict[str, Any],
                                                                   GrpcTransport, ServerMetrics]:
    """Serve ``rounds`` rounds of ``strategy`` to ``run_client`` threads, one per client of
    ``fed``, each with its policy file (None: no policy)."""
    paths = FederationPaths(credentials)
    settings = DeploySettings(credentials=credentials, address="127.0.0.1", port=0,
                              min_clients=len(fed.client_ids), heartbeat_interval=1.0,
                              round_deadline=30.0, wait_for_clients=60.0, chunk_bytes=256,
                              max_workers=32)
    server_trainer = _trainer(hidden=hidden)
    metrics = ServerMetrics()
    transport = GrpcTransport(settings, numel=server_trainer.spec.numel,
                              spec_hash=spec_hash(server_trainer.spec), experiment="blobs",
                              rounds=rounds, metrics=metrics)
    running = start_server(settings, transport, traffic=metrics)
    # Built here, not in the threads: building a model draws from torch's global RNG too.
    trainers = {cid: _trainer(_LockedTrainer, hidden) for cid in fed.client_ids}
    reports: dict[str, Any] = {}

    def client(cid: str) -> None:
        reports[cid] = run_client(
            f"127.0.0.1:{running.port}", ca=paths.ca_cert, cert=paths.client_cert(cid),
            key=paths.client_key(cid), trainer=trainers[cid], data=fed.client(cid).train,
            retry_budget=60, poll_seconds=1.0, policy=policies.get(cid))

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in fed.client_ids]
    for t in threads:
        t.start()
    try:
        result = simulate(server_trainer, fed, strategy, rounds, seed=5, transport=transport)
        transport.finish()
        for t in threads:
            t.join(timeout=30)
    finally:
        running.stop(0)
    return result, reports, transport, metrics


def _subset(fed: FederatedDataset, n: int) -> FederatedDataset:
    return FederatedDataset(name="blobs", clients=fed.clients[:n], test=fed.test,
                            num_classes=3, feature_shape=(5,))


def test_policies_refuse_too_little_noise_and_an_exhausted_budget(
        blobs_fed: FederatedDataset, credentials: Path, tmp_path: Path) -> None:
    """Local DP z = 1 for three rounds: c0 needs z >= 2 and refuses every round; c1's budget
    covers two rounds (its own accountant, persisted next to its key) and it refuses the third;
    c2 has no policy and trains every round."""
    rounds = 3
    stage = LocalDP(clip=1.0, noise_multiplier=1.0)
    two, three = (stage.guarantee(rounds=r)["epsilon_total"] for r in (2, 3))
    creds = Path(shutil.copytree(credentials, tmp_path / "fed"))
    paths = FederationPaths(creds)
    (tmp_path / "c0.toml").write_text("[dp]\nmin_noise_multiplier = 2.0\n")
    (tmp_path / "c1.toml").write_text(f"[dp]\nepsilon_budget = {(two + three) / 2}\n")
    policies = {"c0": tmp_path / "c0.toml", "c1": tmp_path / "c1.toml", "c2": None}
    result, reports, transport, metrics = _deploy(
        _subset(blobs_fed, 3), creds, FedAvg(client_stages=[stage]), rounds, policies)
    assert [r["updates"] for r in result.history] == [2, 2, 1]
    assert [r["failures"] for r in result.history] == [1, 1, 2]
    assert (reports["c0"].rounds, reports["c0"].refused) == ([], [1, 2, 3])
    assert (reports["c1"].rounds, reports["c1"].refused) == ([1, 2], [3])
    assert (reports["c2"].rounds, reports["c2"].refused) == ([1, 2, 3], [])
    assert metrics.snapshot()["clients_dropped"]["refused_by_client"] == 4
    codes = sorted((cid, code) for _, cid, code, _ in transport.refusals)
    assert codes == [("c0", "noise_multiplier")] * 3 + [("c1", "epsilon_budget")]
    # c1's ledger, next to its key, holds exactly two z = 1 releases; c0 and c2 spent nothing.
    ledger_path = default_ledger_path(paths.client_key("c1"))
    assert [r["round"] for r in json.loads(ledger_path.read_text())["releases"]] == [1, 2]
    with PrivacyLedger(ledger_path) as ledger:
        assert ledger.epsilon() == pytest.approx(two, rel=1e-9)
        budget = PrivacyPolicy.load(tmp_path / "c1.toml")
        with pytest.raises(Exception, match="over its budget"):
            budget.check([stage], None, ledger)
    assert not default_ledger_path(paths.client_key("c0")).exists()  # never released
    assert not default_ledger_path(paths.client_key("c2")).exists()  # no policy, no ledger


def test_a_deployed_client_noise_is_not_the_noise_the_server_can_regenerate(
        blobs_fed: FederatedDataset, credentials: Path, tmp_path: Path) -> None:
    """Issue 24 finding 1 on the deployed path: the server knows every client's round seed,
    so it can compute the seeded (simulation) noise; the deployed client draws its local-DP
    noise from SecureNoise instead, and subtracting the regenerated noise recovers nothing.

    One client, one round, FedAvg with server learning rate 1: the new global model minus
    the old is exactly the client's privatised update r = c + n. The server's attack is
    r - n_seeded, which equals the clipped update c when n = n_seeded (issue: within 2.3e-7).
    """
    hidden, clip, z = 64, 0.5, 1.0  # 579 parameters
    fed = _subset(blobs_fed, 1)
    creds = Path(shutil.copytree(credentials, tmp_path / "fed"))
    stage = LocalDP(clip=clip, noise_multiplier=z)
    deployed, *_ = _deploy(fed, creds, FedAvg(client_stages=[stage]), 1, {}, hidden=hidden)
    # What the server computes on its own: the un-noised update and the seeded noise.
    w0 = _trainer(hidden=hidden).initial_weights(5)  # what simulate(seed=5) starts from
    plain = simulate(_trainer(hidden=hidden), fed, FedAvg(), 1, seed=5)
    seeded = simulate(_trainer(hidden=hidden), fed, FedAvg(client_stages=[stage]), 1, seed=5)
    delta = plain.weights - w0
    clipped = delta * min(1.0, clip / float(delta.norm()))
    n_seeded = seeded.weights - w0 - clipped
    assert float(n_seeded.std()) == pytest.approx(z * clip, rel=0.15)  # the seeded draw
    received = deployed.weights - w0
    residual = received - n_seeded - clipped  # zero if the client had used seeded noise
    scale = z * clip * received.numel() ** 0.5
    assert float(residual.norm()) > 0.5 * scale
    noise = received - clipped
    assert float(noise.std()) == pytest.approx(z * clip, rel=0.15)  # the client did add noise
    corr = float(torch.dot(noise, n_seeded) / (noise.norm() * n_seeded.norm()))
    assert abs(corr) < 0.25  # independent: |corr| ~ N(0, 1/579), 6 standard deviations


def test_the_policys_secagg_bounds_reach_the_secagg_client(
        blobs_fed: FederatedDataset, credentials: Path, tmp_path: Path) -> None:
    """[secagg] min_population = 10 in the policy file: a SecAgg+ round of 3 members is
    refused by every client at the setup (a withdrawal with the SecAggBounds reason)."""
    from fedmosaic.net.secagg import SecAggRoundDriver

    fed = _subset(blobs_fed, 3)
    creds = Path(shutil.copytree(credentials, tmp_path / "fed"))
    paths = FederationPaths(creds)
    policy = tmp_path / "policy.toml"
    policy.write_text('[secagg]\nmode = "secagg+"\nmin_bits = 32\nmin_population = 10\n')
    settings = DeploySettings(credentials=creds, address="127.0.0.1", port=0, min_clients=3,
                              heartbeat_interval=1.0, round_deadline=30.0,
                              wait_for_clients=60.0, chunk_bytes=256, max_workers=32)
    trainer = _trainer()
    transport = GrpcTransport(settings, numel=trainer.spec.numel,
                              spec_hash=spec_hash(trainer.spec), experiment="blobs", rounds=1,
                              secagg=SecAggRoundDriver(clip=1.0, max_weight=100.0,
                                                       uniform=False, bits=32,
                                                       dropout_rate=0.0,
                                                       corrupted_fraction=0.0))
    running = start_server(settings, transport)
    trainers = {cid: _trainer(_LockedTrainer) for cid in fed.client_ids}
    reports: dict[str, Any] = {}

    def client(cid: str) -> None:
        reports[cid] = run_client(
            f"127.0.0.1:{running.port}", ca=paths.ca_cert, cert=paths.client_cert(cid),
            key=paths.client_key(cid), trainer=trainers[cid], data=fed.client(cid).train,
            retry_budget=60, poll_seconds=1.0, policy=policy)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in CLIENTS]
    for t in threads:
        t.start()
    try:
        available = transport.available_clients()
        tasks = [ClientTask(c, FitConfig(round=1, seed=i)) for i, c in enumerate(available)]
        seen = list(transport.fit(trainer.initial_weights(0), tasks, FedAvgAggregator()))
        transport.finish()
        for t in threads:
            t.join(timeout=30)
    finally:
        running.stop(0)
    reasons = {f.client_id: f.reason for f in seen if isinstance(f, ClientFailure)}
    assert set(reasons) == set(CLIENTS)
    for reason in reasons.values():
        assert "withdrew from secure aggregation" in reason
        assert "a round of 3 clients is outside this client's accepted population [10," \
            in reason
    assert all(r.rounds == [] and r.refused == [] for r in reports.values())
