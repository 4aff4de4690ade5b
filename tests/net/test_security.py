"""Authentication, replay and validation on a live in-process gRPC server (loopback, mTLS).

The server side is the real ``GrpcTransport`` behind the real service and TLS credentials;
a thread plays the server loop (``fit`` feeding a ``RoundTally``), and the test plays the
clients with raw RPCs, so every hostile message can be crafted exactly.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from fedmosaic.algorithms.aggregate import FedAvgAggregator
from fedmosaic.algorithms.strategy import ClientTask
from fedmosaic.core.update import ClientUpdate
from fedmosaic.net.certs import FederationPaths, revoke
from fedmosaic.net.client import _Stubs, open_channel
from fedmosaic.net.monitoring import ServerMetrics
from fedmosaic.net.proto import fedmosaic_pb2 as pb
from fedmosaic.net.transport import GrpcTransport
from fedmosaic.net.wire import iter_chunks
from fedmosaic.runtime.tally import ClientFailure, RoundTally
from fedmosaic.train.base import FitConfig
from tests.net.harness import live_server

NUMEL = 1000
CHUNK = 1024  # bytes: 256 values, so the model travels in 4 chunks


class Live:
    """A running server plus helpers to act as any client."""

    def __init__(self, federation: Path, transport: GrpcTransport, port: int,
                 metrics: ServerMetrics) -> None:
        self.paths = FederationPaths(federation)
        self.transport, self.port, self.metrics = transport, port, metrics
        self.channels: list[grpc.Channel] = []

    def stubs(self, cid: str, paths: FederationPaths | None = None) -> _Stubs:
        p = paths or self.paths
        cert, key = ((p.operator_cert, p.operator_key) if cid == "operator"
                     else (p.client_cert(cid), p.client_key(cid)))
        channel = open_channel(f"127.0.0.1:{self.port}", p.ca_cert, cert, key)
        self.channels.append(channel)
        return _Stubs(channel)

    def joined(self, cid: str) -> tuple[_Stubs, str]:
        stubs = self.stubs(cid)
        reply = stubs.join(pb.JoinRequest(spec_hash="spec"), timeout=10)
        assert reply.client_id == cid
        return stubs, reply.server_instance

    def start_round(self, clients: list[str], weights: torch.Tensor,
                    round_num: int = 1) -> tuple[threading.Thread, RoundTally, list[Any]]:
        """Run ``fit`` for one round in a thread, feeding a real RoundTally."""
        tasks = [ClientTask(c, FitConfig(round=round_num, seed=i)) for i, c in enumerate(clients)]
        tally = RoundTally(FedAvgAggregator(), NUMEL, round_num)
        seen: list[Any] = []

        def loop() -> None:
            for result in self.transport.fit(weights, tasks, None):
                seen.append(result)
                tally.add(result)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        return thread, tally, seen


@pytest.fixture
def live(federation: Path, tmp_path: Path) -> Iterator[Live]:
    # A private copy: some tests revoke credentials.
    fed = Path(shutil.copytree(federation, tmp_path / "fed"))
    with live_server(fed, numel=NUMEL, chunk_bytes=CHUNK) as (transport, port, metrics):
        srv = Live(fed, transport, port, metrics)
        try:
            yield srv
        finally:
            for ch in srv.channels:
                ch.close()


def _task(stubs: _Stubs, instance: str) -> pb.Task:
    task = stubs.get_task(pb.TaskRequest(server_instance=instance, wait_seconds=10), timeout=20)
    assert task.kind == pb.Task.FIT
    return task


def _upload(stubs: _Stubs, task_id: bytes, round_num: int, delta: torch.Tensor,
            num_samples: int = 10, chunks: list[pb.TensorChunk] | None = None,
            numel: int = NUMEL) -> pb.UploadReply:
    header = pb.UploadHeader(task_id=task_id, round=round_num, num_samples=num_samples,
                             numel=numel, metrics={"train_loss": 0.5})
    parts = chunks if chunks is not None else list(iter_chunks(delta, CHUNK))
    messages = [pb.UploadMessage(header=header)] + [pb.UploadMessage(chunk=c) for c in parts]
    return stubs.upload(iter(messages), timeout=20)


def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details() or ""


def test_client_without_certificate_or_from_another_ca_is_refused_and_logged(
        live: Live, foreign_federation: Path, capfd: pytest.CaptureFixture[str]) -> None:
    no_cert = grpc.secure_channel(f"127.0.0.1:{live.port}", grpc.ssl_channel_credentials(
        live.paths.ca_cert.read_bytes()))
    live.channels.append(no_cert)
    code, _ = _code(lambda: _Stubs(no_cert).join(pb.JoinRequest(spec_hash="spec"), timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE
    # A certificate for "client_00" signed by another CA; the server CA is trusted so that
    # only the client side of the handshake is wrong.
    foreign = FederationPaths(foreign_federation)
    channel = grpc.secure_channel(f"127.0.0.1:{live.port}", grpc.ssl_channel_credentials(
        live.paths.ca_cert.read_bytes(), foreign.client_key("client_00").read_bytes(),
        foreign.client_cert("client_00").read_bytes()))
    live.channels.append(channel)
    code, _ = _code(lambda: _Stubs(channel).join(pb.JoinRequest(spec_hash="spec"), timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert live.transport.sessions == {}
    err = capfd.readouterr().err
    # gRPC's TLS layer logs each refused handshake with its reason.
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in err
    assert "CERTIFICATE_VERIFY_FAILED" in err


def test_revoked_client_is_refused_and_logged(live: Live,
                                              fedlog: pytest.LogCaptureFixture) -> None:
    caplog = fedlog
    stubs = live.stubs("spare")
    code, detail = _code(lambda: stubs.join(pb.JoinRequest(spec_hash="spec"), timeout=5))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "revoked" in detail
    assert "refused Join from spare (ipv4:127.0.0.1:" in caplog.text
    assert "credential of 'spare' is revoked" in caplog.text
    assert "spare" not in live.transport.sessions


def test_revocation_applies_without_restart(live: Live) -> None:
    stubs, instance = live.joined("client_09")
    stubs.heartbeat(pb.HeartbeatRequest(server_instance=instance), timeout=5)
    revoke(live.paths.root, "client_09")
    time.sleep(1.2)  # the server re-checks the CRL file at most once a second
    code, detail = _code(
        lambda: stubs.heartbeat(pb.HeartbeatRequest(server_instance=instance), timeout=5))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "revoked" in detail


def test_roles_and_model_layout_are_enforced(live: Live) -> None:
    operator = live.stubs("operator")
    code, _ = _code(lambda: operator.join(pb.JoinRequest(spec_hash="spec"), timeout=5))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert operator.status(pb.StatusRequest(), timeout=5).experiment == "test"
    client = live.stubs("client_01")
    code, _ = _code(lambda: client.status(pb.StatusRequest(), timeout=5))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code, detail = _code(lambda: client.join(pb.JoinRequest(spec_hash="other"), timeout=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "layout" in detail
    # Identity is the certificate's, whatever the client claims elsewhere: not joined yet.
    code, detail = _code(lambda: client.get_task(
        pb.TaskRequest(server_instance=live.transport.instance), timeout=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "join again" in detail


def test_round_accepts_one_upload_and_rejects_replays_foreign_and_out_of_round(
        live: Live) -> None:
    weights = torch.linspace(-1, 1, NUMEL)
    a, ia = live.joined("client_00")
    b, ib = live.joined("client_01")
    thread, tally, seen = live.start_round(["client_00", "client_01"], weights)
    ta, tb = _task(a, ia), _task(b, ib)
    assert ta.task_id != tb.task_id and len(ta.task_id) == 16
    assert ta.config.round == 1 and ta.config.seed == 0
    # The model arrives as raw little-endian float32 chunks.
    chunks = list(a.download(pb.ModelRequest(task_id=ta.task_id), timeout=10))
    assert len(chunks) == 4
    got = np.concatenate([np.frombuffer(c.data, dtype="<f4") for c in chunks])
    assert np.array_equal(got, weights.numpy())
    # Someone else's task id: refused, and the task stays usable by its owner.
    code, _ = _code(lambda: _upload(b, ta.task_id, 1, torch.ones(NUMEL)))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code, _ = _code(lambda: b.download(pb.ModelRequest(task_id=ta.task_id), timeout=10).next())
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # Out of round: the task is for round 1.
    code, detail = _code(lambda: _upload(a, ta.task_id, 2, torch.ones(NUMEL)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "round 1" in detail
    delta = torch.full((NUMEL,), 0.25)
    assert _upload(a, ta.task_id, 1, delta).accepted
    # Replay of the same upload: refused, nothing added.
    code, detail = _code(lambda: _upload(a, ta.task_id, 1, delta))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "replay" in detail
    assert _upload(b, tb.task_id, 1, -delta).accepted
    thread.join(timeout=20)
    assert not thread.is_alive()
    assert tally.count == 2 and not tally.rejected and not tally.failures
    assert torch.allclose(tally.acc.result(), torch.zeros(NUMEL), atol=1e-7)
    assert {u.client_id for u in seen if isinstance(u, ClientUpdate)} == {"client_00",
                                                                           "client_01"}
    # After the round the task id is dead: replayed or out-of-round uploads are refused.
    code, detail = _code(lambda: _upload(a, ta.task_id, 1, delta))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "unknown or expired" in detail
    snap = live.metrics.snapshot()
    rejected = {k: v for k, v in snap["rejected_messages"].items() if v}
    assert rejected == {"foreign_task": 2, "wrong_round": 1, "replay": 1, "unknown_task": 1}
    assert snap["bytes_out"] >= 4 * NUMEL and snap["bytes_in"] >= 2 * 4 * NUMEL


def _nan_chunks(delta: torch.Tensor) -> list[pb.TensorChunk]:
    chunks = list(iter_chunks(delta, CHUNK))
    bad = np.frombuffer(chunks[2].data, dtype="<f4").copy()
    bad[7] = np.nan
    chunks[2] = pb.TensorChunk(offset=chunks[2].offset, data=bad.tobytes())
    return chunks


def _gap_chunks(delta: torch.Tensor) -> list[pb.TensorChunk]:
    chunks = list(iter_chunks(delta, CHUNK))
    return [chunks[0], chunks[2], chunks[1], chunks[3]]


def _short_chunks(delta: torch.Tensor) -> list[pb.TensorChunk]:
    return list(iter_chunks(delta, CHUNK))[:-1]


def _long_chunks(delta: torch.Tensor) -> list[pb.TensorChunk]:
    chunks = list(iter_chunks(delta, CHUNK))
    return [*chunks, pb.TensorChunk(offset=NUMEL, data=b"\0" * 8)]


def _ragged_chunks(delta: torch.Tensor) -> list[pb.TensorChunk]:
    chunks = list(iter_chunks(delta, CHUNK))
    return [pb.TensorChunk(offset=0, data=chunks[0].data[:-2]), *chunks[1:]]


def _oversized_chunks(delta: torch.Tensor) -> list[pb.TensorChunk]:
    data = np.zeros(2 * CHUNK // 4, dtype="<f4").tobytes()  # twice the chunk limit
    return [pb.TensorChunk(offset=0, data=data)]


MALFORMED = {"nan": _nan_chunks, "gap": _gap_chunks, "short": _short_chunks,
             "long": _long_chunks, "ragged": _ragged_chunks, "oversized": _oversized_chunks}


def test_malformed_uploads_are_rejected_without_touching_the_sum(
        live: Live, fedlog: pytest.LogCaptureFixture) -> None:
    caplog = fedlog
    clients = [f"client_{i:02d}" for i in range(len(MALFORMED) + 2)]
    joined = {c: live.joined(c) for c in clients}
    thread, tally, _ = live.start_round(clients, torch.zeros(NUMEL))
    tasks = {c: _task(*joined[c]) for c in clients}
    good = torch.linspace(0, 1, NUMEL)
    for cid, (name, make) in zip(clients, MALFORMED.items()):
        stubs, task_id, chunks = joined[cid][0], tasks[cid].task_id, make(good)
        code, detail = _code(lambda: _upload(stubs, task_id, 1, good,  # noqa: B023
                                             chunks=chunks))  # noqa: B023
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, detail)
    bad_header = clients[-2]
    code, detail = _code(lambda: _upload(joined[bad_header][0], tasks[bad_header].task_id, 1,
                                         good, numel=NUMEL + 1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "announces" in detail
    assert _upload(joined[clients[-1]][0], tasks[clients[-1]].task_id, 1, good).accepted
    thread.join(timeout=20)
    assert tally.count == 1 and len(tally.rejected) == len(MALFORMED) + 1
    snap = live.metrics.snapshot()
    assert {k: v for k, v in snap["rejected_messages"].items() if v} == {
        "non_finite": 1, "wrong_shape": 3, "bad_dtype": 1, "oversized": 1, "malformed": 1}
    assert snap["clients_dropped"]["rejected"] == len(MALFORMED) + 1
    # Only the valid update is in the sum (the weighted mean of one update is itself).
    assert torch.allclose(tally.acc.result(), good, rtol=1e-6, atol=0)
    for reason in ("non-finite", "contiguous", "stream ended", "more than the model's",
                   "whole number of float32", "exceeds the limit"):
        assert reason in caplog.text
    # The server is still serving.
    assert live.stubs("operator").status(pb.StatusRequest(), timeout=5).state == "waiting"


def test_stragglers_past_the_deadline_and_silent_clients_are_dropped(live: Live) -> None:
    live.transport.settings = replace(live.transport.settings, round_deadline=3.0)
    a, ia = live.joined("client_00")
    live.joined("client_01")  # joins, then never sends a heartbeat again
    c, ic = live.joined("client_02")
    stop = threading.Event()

    def beat() -> None:  # client_00 stays alive but never uploads; client_01 goes silent
        while not stop.wait(0.3):
            a.heartbeat(pb.HeartbeatRequest(server_instance=ia), timeout=5)
            c.heartbeat(pb.HeartbeatRequest(server_instance=ic), timeout=5)

    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    try:
        start = time.monotonic()
        thread, tally, seen = live.start_round(["client_00", "client_01", "client_02"],
                                               torch.zeros(NUMEL))
        ta, tc = _task(a, ia), _task(c, ic)
        assert _upload(c, tc.task_id, 1, torch.ones(NUMEL)).accepted
        thread.join(timeout=20)
        elapsed = time.monotonic() - start
    finally:
        stop.set()
        beater.join()
    reasons = {f.client_id: f.reason for f in seen if isinstance(f, ClientFailure)}
    assert "lost contact" in reasons["client_01"]
    assert "deadline" in reasons["client_00"]
    assert tally.count == 1 and 2.5 < elapsed < 10
    code, _ = _code(lambda: _upload(a, ta.task_id, 1, torch.ones(NUMEL)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION  # a late straggler is out of round


# -- undecodable messages (decoded by the service, not by gRPC) -----------------------------

GARBAGE = b"\x0a\x7f"  # a length-delimited field announcing 127 bytes, then nothing
METHOD = "/fedmosaic.v1.Federation/"


def _raw(live: Live, cid: str) -> grpc.Channel:
    """A channel on which calls carry raw bytes (no client-side serializer)."""
    p = live.paths
    channel = open_channel(f"127.0.0.1:{live.port}", p.ca_cert, p.client_cert(cid),
                           p.client_key(cid))
    live.channels.append(channel)
    return channel


def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= 40 or r.exc_info is not None]
    assert not bad, [r.getMessage() for r in bad]


def test_undecodable_requests_are_counted_one_line_refusals(
        live: Live, fedlog: pytest.LogCaptureFixture) -> None:
    caplog = fedlog
    channel = _raw(live, "client_00")
    calls = {name: channel.unary_unary(METHOD + name)
             for name in ("Join", "Heartbeat", "GetTask", "SecAgg", "Status")}
    calls["DownloadModel"] = lambda raw, timeout: next(
        channel.unary_stream(METHOD + "DownloadModel")(raw, timeout=timeout))
    upload = channel.stream_unary(METHOD + "UploadUpdate")
    calls["UploadUpdate"] = lambda raw, timeout: upload(iter([raw]), timeout=timeout)
    for name, call in calls.items():
        code, detail = _code(lambda: call(GARBAGE, timeout=5))  # noqa: B023
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, detail)
        assert "undecodable" in detail, (name, detail)
        assert f"refused {name} from client_00 (ipv4:127.0.0.1:" in caplog.text
    snap = live.metrics.snapshot()
    assert {k: v for k, v in snap["rejected_messages"].items() if v} == {"malformed": 7}
    assert snap["bytes_in"] >= 7 * len(GARBAGE)
    _no_tracebacks(caplog)
    # The server is still serving, and nothing was stored.
    assert live.transport.sessions == {}
    assert live.stubs("operator").status(pb.StatusRequest(), timeout=5).state == "waiting"


def test_undecodable_message_inside_an_upload_rejects_the_task(
        live: Live, fedlog: pytest.LogCaptureFixture) -> None:
    caplog = fedlog
    a, ia = live.joined("client_00")
    b, ib = live.joined("client_01")
    thread, tally, _ = live.start_round(["client_00", "client_01"], torch.zeros(NUMEL))
    ta, tb = _task(a, ia), _task(b, ib)
    upload = _raw(live, "client_00").stream_unary(METHOD + "UploadUpdate")
    header = pb.UploadMessage(header=pb.UploadHeader(
        task_id=ta.task_id, round=1, num_samples=10, numel=NUMEL)).SerializeToString()
    first = pb.UploadMessage(chunk=next(iter_chunks(torch.ones(NUMEL), CHUNK)))
    code, detail = _code(lambda: upload(iter([header, first.SerializeToString(), GARBAGE]),
                                        timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "undecodable" in detail
    # The task is spent (rejected in the round's record); the other client's update counts.
    code, _ = _code(lambda: _upload(a, ta.task_id, 1, torch.ones(NUMEL)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert _upload(b, tb.task_id, 1, torch.ones(NUMEL)).accepted
    thread.join(timeout=20)
    assert tally.count == 1 and len(tally.rejected) == 1
    assert "undecodable UploadUpdate message" in tally.rejected[0]
    assert live.metrics.snapshot()["rejected_messages"]["malformed"] == 1
    _no_tracebacks(caplog)


def test_upload_cut_off_before_its_header_is_a_refusal_not_a_traceback(
        live: Live, fedlog: pytest.LogCaptureFixture) -> None:
    caplog = fedlog
    upload = _raw(live, "client_00").stream_unary(METHOD + "UploadUpdate")
    code, detail = _code(lambda: upload(iter([]), timeout=5))  # no message at all
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "header" in detail

    def stalled() -> Iterator[bytes]:
        time.sleep(30)  # the client gives up (deadline) before sending anything
        yield b""

    code, _ = _code(lambda: upload(stalled(), timeout=1))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(1.0)  # the server side notices the cancelled stream
    _no_tracebacks(caplog)
    assert live.stubs("operator").status(pb.StatusRequest(), timeout=5).state == "waiting"


def test_clients_receive_their_fingerprinted_model_and_aggregation_is_unaffected(
        live: Live) -> None:
    from fedmosaic.watermark.fingerprint import ClientFingerprint
    from fedmosaic.watermark.keys import WatermarkKey

    fingerprint = ClientFingerprint(WatermarkKey.generate(), strength=0.01)
    weights = torch.linspace(-1, 1, NUMEL)
    clients = ["client_00", "client_01"]
    joined = {c: live.joined(c) for c in clients}
    tasks = [ClientTask(c, FitConfig(round=1, seed=i), dispatch=fingerprint)
             for i, c in enumerate(clients)]
    tally = RoundTally(FedAvgAggregator(), NUMEL, 1)
    assert GrpcTransport.supports_dispatch

    def loop() -> None:
        for result in live.transport.fit(weights, tasks, None):
            tally.add(result)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    received = {}
    for cid, (stubs, instance) in joined.items():
        task = _task(stubs, instance)
        chunks = stubs.download(pb.ModelRequest(task_id=task.task_id), timeout=10)
        got = torch.from_numpy(np.concatenate(
            [np.frombuffer(c.data, dtype="<f4") for c in chunks]).copy())
        assert torch.allclose(got, fingerprint(cid, weights))  # this client's own copy
        received[cid] = got
        local = got + 0.5  # "training"; the delta is relative to what it received
        assert _upload(stubs, task.task_id, 1, local - got).accepted
    thread.join(timeout=20)
    assert not torch.equal(received["client_00"], received["client_01"])
    assert tally.count == 2
    assert torch.allclose(tally.acc.result(), torch.full((NUMEL,), 0.5), atol=1e-6)
