"""The join handshake's server half (issue #10): a client whose model or declared data does not
fit the task is refused at join, before any training, with FAILED_PRECONDITION, the exact
``Incompatibility`` message and the trailing metadata a client acts on
(``fedmosaic-refusal: <code>``, ``fedmosaic-permanent: 1``); the server remembers each
client's latest issue for ``status`` (RPC and ``fedmosaic status --json``), logs which client
and why, and counts it in ``clients_refused_total{reason}``."""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from typer.testing import CliRunner

from fedmosaic.cli import app
from fedmosaic.compat import DataProfile, TaskProfile
from fedmosaic.models import build_model
from fedmosaic.net.certs import FederationPaths, create_federation, revoke
from fedmosaic.net.client import _Stubs, open_channel
from fedmosaic.net.errors import PERMANENT_KEY, REFUSAL_KEY, Refused
from fedmosaic.net.issues import IssueBoard
from fedmosaic.net.monitoring import ServerMetrics
from fedmosaic.net.proto import fedmosaic_pb2 as pb
from fedmosaic.net.server import start_server
from fedmosaic.net.settings import DeploySettings
from fedmosaic.net.transport import JOIN_ISSUE_CODES, GrpcTransport
from fedmosaic.net.wire import spec_hash
from fedmosaic.train import TorchTrainer

CLIENTS = [f"h{i}" for i in range(12)]
REVOKED = "gone"
FEATURES, CLASSES = 64, 10


def _trainer(features: int = FEATURES, classes: int = CLASSES) -> TorchTrainer:
    return TorchTrainer(partial(build_model, "mlp", (features,), classes, hidden=(8,)), lr=0.1)


TASK = _trainer()
NUMEL = TASK.spec.numel  # 64*8+8 + 8*10+10 = 610
HASH = spec_hash(TASK.spec)


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("handshake-fed")
    create_federation(root, clients=[*CLIENTS, REVOKED], ca_passphrase=None)
    revoke(root, REVOKED)
    return root


class Server:
    """A running server (real transport, service, TLS) and channels to it."""

    def __init__(self, credentials: Path, **transport_kwargs: Any) -> None:
        self.paths = FederationPaths(credentials)
        settings = DeploySettings(credentials=credentials, address="127.0.0.1", port=0,
                                  heartbeat_interval=0.5, round_deadline=20.0,
                                  min_clients=1, wait_for_clients=5.0, chunk_bytes=1024,
                                  max_workers=8)
        self.metrics = ServerMetrics()
        self.transport = GrpcTransport(settings, numel=NUMEL, spec_hash=HASH,
                                       experiment="handshake", rounds=1, metrics=self.metrics,
                                       **transport_kwargs)
        self.running = start_server(settings, self.transport, traffic=self.metrics)
        self.port = self.running.port
        self.channels: list[grpc.Channel] = []

    def stubs(self, cid: str) -> _Stubs:
        p = self.paths
        cert, key = ((p.operator_cert, p.operator_key) if cid == "operator"
                     else (p.client_cert(cid), p.client_key(cid)))
        channel = open_channel(f"127.0.0.1:{self.port}", p.ca_cert, cert, key)
        self.channels.append(channel)
        return _Stubs(channel)

    def close(self) -> None:
        for ch in self.channels:
            ch.close()
        self.transport.finish()
        self.running.stop(0)


@pytest.fixture(scope="module")
def declared(credentials: Path) -> Iterator[Server]:
    """The task declares its feature shape and classes (e.g. the experiment's data set)."""
    server = Server(credentials, task_profile=TaskProfile(feature_shape=(FEATURES,),
                                                          num_classes=CLASSES))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def probed(credentials: Path) -> Iterator[Server]:
    """The task declares nothing about its data: the server probes its own model."""
    server = Server(credentials, task_profile=TaskProfile(), probe_trainer=TASK)
    try:
        yield server
    finally:
        server.close()


def _profile(shape: tuple[int, ...] = (FEATURES,), *, dtype: str = "float32", n: int = 50,
             labels: tuple[int, int] = (0, CLASSES - 1), outputs: int = CLASSES) -> pb.DataProfile:
    return DataProfile(shape, dtype, n, labels[0], labels[1], outputs, 10).to_wire()


def _join(stubs: _Stubs, profile: pb.DataProfile | None = None, *, spec: str = HASH,
          numel: int = NUMEL) -> pb.JoinReply:
    request = pb.JoinRequest(software="test", spec_hash=spec, numel=numel)
    if profile is not None:
        request.profile.CopyFrom(profile)
    return stubs.join(request, timeout=10)


def _refusal(call: Any) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    meta = {m.key: m.value for m in info.value.trailing_metadata() or ()}
    return info.value.code(), info.value.details(), meta


LAYOUT = ("your model's layout differs from the task's model ({sizes}): use the task's model "
          "(the [model] of the experiment, or the same --trainer)")
CASES = [
    # (client, profile or None, spec, numel, code, message)
    ("h1", _profile((10,)), HASH, NUMEL, "feature_shape",
     "your data has 10 features; the task's model expects 64"),
    ("h2", _profile((1, 8, 8)), HASH, NUMEL, "feature_shape",
     "your data has samples of shape 1x8x8; the task's model expects 64 features"),
    ("h3", _profile(dtype="object"), HASH, NUMEL, "dtype",
     "your features have dtype object; the task's model takes float32 (numbers)"),
    ("h4", _profile(labels=(-1, 9)), HASH, NUMEL, "labels",
     "your data has a negative label (-1); labels must be class indices 0, 1, ..."),
    ("h5", _profile(labels=(0, 15)), HASH, NUMEL, "labels",
     "your data has label 15, but the task has 10 classes (labels 0 to 9)"),
    ("h6", _profile(outputs=5, labels=(0, 4)), HASH, NUMEL, "num_classes",
     "your model has 5 outputs; the task has 10 classes"),
    ("h7", _profile(n=0), HASH, NUMEL, "no_data",
     "your client has no training samples; give it data (--data, or its partition of the "
     "experiment)"),
    ("h8", None, "0123456789abcdef", 1234, "model_layout",
     LAYOUT.format(sizes="1,234 parameters vs 610")),
    ("h9", _profile(), "0123456789abcdef", NUMEL, "model_layout",
     LAYOUT.format(sizes="both 610 parameters, but shaped or named differently")),
    ("h10", None, "0123456789abcdef", 0, "model_layout",
     LAYOUT.format(sizes="the task's model has 610 parameters")),
]


@pytest.mark.parametrize(("cid", "profile", "spec", "numel", "code", "message"), CASES,
                         ids=[f"{c[4]}-{c[0]}" for c in CASES])
def test_an_incompatible_client_is_refused_at_join_with_its_reason(
        declared: Server, cid: str, profile: pb.DataProfile | None, spec: str, numel: int,
        code: str, message: str) -> None:
    stubs = declared.stubs(cid)
    before = declared.metrics.snapshot()["clients_refused"][code]
    status, details, meta = _refusal(lambda: _join(stubs, profile, spec=spec, numel=numel))
    assert status == grpc.StatusCode.FAILED_PRECONDITION
    assert details == message
    assert meta[REFUSAL_KEY] == code and meta[PERMANENT_KEY] == "1"
    # Never admitted: it cannot ask for tasks.
    assert cid not in declared.transport.sessions
    issue = declared.transport.issues.get(cid)
    assert issue is not None and (issue.code, issue.reason, issue.round) == (code, message, 0)
    assert declared.metrics.snapshot()["clients_refused"][code] == before + 1


def test_a_compatible_client_joins_and_learns_the_task(declared: Server) -> None:
    reply = _join(declared.stubs("h0"), _profile())
    assert reply.client_id == "h0" and reply.numel == NUMEL
    assert TaskProfile.from_wire(reply.task) == TaskProfile((FEATURES,), CLASSES)
    # A client that declares nothing (an older client) is still admitted on its layout.
    assert _join(declared.stubs("h11")).client_id == "h11"


def test_a_malformed_profile_from_a_raw_stub_is_refused_as_bad_profile(
        declared: Server) -> None:
    p = declared.paths
    raw = open_channel(f"127.0.0.1:{declared.port}", p.ca_cert, p.client_cert("h11"),
                       p.client_key("h11"))
    declared.channels.append(raw)
    join = raw.unary_unary("/fedmosaic.v1.Federation/Join")  # bytes in, bytes out
    bad = [
        (pb.DataProfile(dtype="float32", num_samples=5), "feature shape must have 1 to 8 "
         "dimensions of size >= 1 (0 given)"),
        (pb.DataProfile(feature_shape=[64, 0], dtype="float32", num_samples=5),
         "feature shape must have 1 to 8 dimensions of size >= 1 (2 given)"),
        (pb.DataProfile(feature_shape=[64], dtype="float32", num_samples=5, label_min=3,
                        label_max=2), "label_min must be <= label_max and num_outputs bounded"),
        (pb.DataProfile(feature_shape=[64], dtype="x\n" * 4, num_samples=5),
         "dtype must be a short printable name"),
        (pb.DataProfile(feature_shape=[64], dtype="float32", num_samples=2**41),
         "num_samples and num_test_samples must be at most 1099511627776"),
    ]
    for profile, why in bad:
        request = pb.JoinRequest(spec_hash=HASH, numel=NUMEL, profile=profile)
        status, details, meta = _refusal(lambda r=request: join(r.SerializeToString(),
                                                                timeout=10))
        assert status == grpc.StatusCode.INVALID_ARGUMENT
        assert details == f"your client declared a malformed data profile: {why}"
        assert meta[REFUSAL_KEY] == "bad_profile" and meta[PERMANENT_KEY] == "1"
    assert declared.transport.issues.get("h11").code == "bad_profile"  # type: ignore[union-attr]
    # Garbage bytes: malformed, a refusal like any other (transient: it says nothing of the
    # client's data), and the server goes on.
    status, _, meta = _refusal(lambda: join(b"\xff\x00garbage", timeout=10))
    assert status == grpc.StatusCode.INVALID_ARGUMENT
    assert meta[REFUSAL_KEY] == "malformed" and PERMANENT_KEY not in meta
    # Fixed: the join issue is cleared by a compatible join.
    assert _join(declared.stubs("h11"), _profile()).client_id == "h11"
    assert declared.transport.issues.get("h11") is None
    assert declared.metrics.snapshot()["clients_refused"]["bad_profile"] == len(bad)


def test_credential_refusals_are_permanent_and_protocol_ones_are_not(
        declared: Server) -> None:
    status, _, meta = _refusal(lambda: _join(declared.stubs("operator"), _profile()))
    assert status == grpc.StatusCode.PERMISSION_DENIED
    assert meta == {REFUSAL_KEY: "not_a_client", PERMANENT_KEY: "1"}
    status, _, meta = _refusal(lambda: _join(declared.stubs(REVOKED), _profile()))
    assert status == grpc.StatusCode.PERMISSION_DENIED
    assert meta == {REFUSAL_KEY: "revoked", PERMANENT_KEY: "1"}
    # Not joined to this instance (e.g. the server restarted): join again, not give up.
    stubs = declared.stubs("h0")
    status, details, meta = _refusal(lambda: stubs.heartbeat(
        pb.HeartbeatRequest(server_instance="stale"), timeout=10))
    assert status == grpc.StatusCode.FAILED_PRECONDITION and "join again" in details
    assert meta == {REFUSAL_KEY: "not_joined"}


def _status_command(server: Server, *args: str) -> str:
    """``fedmosaic status`` against ``server`` (in process: the command's code, not an
    interpreter start); its standard output."""
    result = CliRunner().invoke(app, ["status", "--server", f"127.0.0.1:{server.port}",
                                      "--credentials", str(server.paths.root), *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_issues_reach_status_the_log_and_prometheus(
        declared: Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fedmosaic")
    _refusal(lambda: _join(declared.stubs("h1"), _profile((10,))))
    _refusal(lambda: _join(declared.stubs("h5"), _profile(labels=(0, 15))))
    _refusal(lambda: _join(declared.stubs("h8"), None, spec="0123456789abcdef", numel=1234))
    reply = declared.stubs("operator").status(pb.StatusRequest(), timeout=10)
    issues = {i.client_id: i for i in reply.client_issues}
    assert issues["h1"].code == "feature_shape" and issues["h1"].round == 0
    assert issues["h1"].reason == "your data has 10 features; the task's model expects 64"
    assert 0 <= issues["h1"].age_seconds < 60
    assert issues["h5"].reason == ("your data has label 15, but the task has 10 classes "
                                   "(labels 0 to 9)")
    # One line naming the client and what does not fit; never "1 clients failed".
    lines = [r.getMessage() for r in caplog.records if "refused Join from h1 " in r.getMessage()]
    assert len(lines) == 1 and lines[0].endswith(
        ": feature_shape: your data has 10 features; the task's model expects 64")
    # Prometheus: every refused join counted by its reason, from the /metrics endpoint.
    port = declared.metrics.start_http(0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    finally:
        declared.metrics.stop_http()
    counts = declared.metrics.snapshot()["clients_refused"]
    assert min(counts["feature_shape"], counts["labels"], counts["model_layout"]) >= 1
    assert f'fedmosaic_clients_refused_total{{reason="feature_shape"}} ' \
           f'{float(counts["feature_shape"])}' in text
    # `fedmosaic status --json` prints them too.
    info = json.loads(_status_command(declared, "--json").strip().splitlines()[-1])
    by_client = {i["client_id"]: i for i in info["client_issues"]}
    assert by_client["h1"]["code"] == "feature_shape" and by_client["h1"]["round"] == 0
    assert by_client["h8"]["reason"] == LAYOUT.format(sizes="1,234 parameters vs 610")
    assert set(by_client["h1"]) == {"client_id", "code", "reason", "round", "age_seconds"}


def test_the_plain_status_prints_one_line_per_client(declared: Server) -> None:
    _refusal(lambda: _join(declared.stubs("h8"), None, spec="0123456789abcdef", numel=1234))
    lines = _status_command(declared).splitlines()
    h8 = [line for line in lines if line.startswith("  h8: ")]
    # "[model]" survives rich's markup, and the line is not wrapped.
    assert len(h8) == 1 and h8[0].startswith("  h8: model_layout (at join, ")
    assert h8[0].endswith("ago): " + LAYOUT.format(sizes="1,234 parameters vs 610"))


def test_without_a_declared_shape_the_server_probes_its_model(probed: Server) -> None:
    status, details, meta = _refusal(lambda: _join(probed.stubs("h1"), _profile((10,))))
    assert status == grpc.StatusCode.FAILED_PRECONDITION
    assert meta == {REFUSAL_KEY: "feature_shape", PERMANENT_KEY: "1"}
    assert details.startswith("your data has 10 features, which the task's model cannot "
                              "take (")
    status, details, meta = _refusal(lambda: _join(probed.stubs("h2"),
                                                   _profile(labels=(0, 12))))
    assert details == "your data has label 12, but the task's model has 10 outputs (labels " \
                      "0 to 9)"
    assert meta[REFUSAL_KEY] == "labels"
    status, details, meta = _refusal(lambda: _join(probed.stubs("h3"),
                                                   _profile(outputs=3, labels=(0, 2))))
    assert details == "your model has 3 outputs; the task's model has 10"
    reply = _join(probed.stubs("h4"), _profile())
    assert reply.client_id == "h4" and not reply.task.feature_shape
    # Probes are remembered: the same declaration costs no second forward pass.
    assert len(probed.transport._probe_cache) == 4
    # The server loop's own trainer was not touched: the probe runs on a copy.
    assert probed.transport._probe_model is not TASK


def test_the_issue_board_is_bounded_and_keeps_each_client_s_latest() -> None:
    now = [100.0]
    board = IssueBoard(capacity=3, clock=lambda: now[0])
    for i in range(5):
        now[0] += 1
        board.record(f"c{i}", "training_failed", f"error {i}", i + 1)
    assert [i.client_id for i in board.latest()] == ["c2", "c3", "c4"]  # oldest forgotten
    board.record("c2", "deadline", "missed the round deadline", 9)  # c2 is now the newest
    board.record("c5", "labels", "your data has label 15\nWARNING forged", 0)
    assert [i.client_id for i in board.latest()] == ["c2", "c4", "c5"]
    assert board.get("c2").code == "deadline"  # type: ignore[union-attr]
    # A reason is one printable line, whatever a client sent.
    assert board.get("c5").reason == "your data has label 15 WARNING forged"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="unknown client issue code"):
        board.record("c6", "because I said so", "x", 1)
    board.clear("c5", ("deadline",))  # another code: kept
    assert board.get("c5") is not None
    board.clear("c5", JOIN_ISSUE_CODES)
    assert board.get("c5") is None and len(board) == 2


def test_refusal_metadata() -> None:
    code = grpc.StatusCode.FAILED_PRECONDITION
    assert Refused(code, "x", "replay").trailing_metadata() == ((REFUSAL_KEY, "replay"),)
    assert Refused(grpc.StatusCode.PERMISSION_DENIED, "x", "revoked").trailing_metadata() == (
        (REFUSAL_KEY, "revoked"), (PERMANENT_KEY, "1"))
    assert Refused(code, "x", "incompatible", refusal="labels").trailing_metadata() == (
        (REFUSAL_KEY, "labels"), (PERMANENT_KEY, "1"))
    assert Refused(code, "x", "revoked", permanent=False).trailing_metadata() == (
        (REFUSAL_KEY, "revoked"),)
