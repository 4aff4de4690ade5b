"""Counters an operator can trust (issue #18): a message over the server's message limit is
counted as ``oversized`` (not ``interrupted``, not a misleading ``wrong_shape``), whatever the
method and wherever in an upload stream it comes; and every refusal reason the metrics export
is one the server can actually count (``rate_limited`` was exported and never counted).

A live in-process server (real ``GrpcTransport``, service and mutual TLS on 127.0.0.1, the
interceptors ``start_server`` installs); the test plays the clients with raw RPCs."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from fedmosaic.algorithms.aggregate import FedAvgAggregator
from fedmosaic.algorithms.strategy import ClientTask
from fedmosaic.net.certs import FederationPaths
from fedmosaic.net.client import _Stubs, open_channel
from fedmosaic.net.monitoring import DROP_REASONS, OTHER, REJECT_REASONS
from fedmosaic.net.proto import fedmosaic_pb2 as pb
from fedmosaic.net.server import GRPC_CEILING_FACTOR
from fedmosaic.net.service import SERVICE
from fedmosaic.runtime.tally import RoundTally
from fedmosaic.train.base import FitConfig
from tests.net.conftest import REPO
from tests.net.harness import live_server

NUMEL = 1000
CHUNK = 1024
LIMIT = CHUNK + 64 * 1024  # DeploySettings.max_message_bytes: one chunk plus the envelope


@pytest.fixture
def live(federation: Path) -> Iterator[tuple[Any, int, Any, grpc.Channel]]:
    paths = FederationPaths(federation)
    with live_server(federation, numel=NUMEL, chunk_bytes=CHUNK) as (transport, port, metrics):
        channel = open_channel(f"127.0.0.1:{port}", paths.ca_cert,
                               paths.client_cert("client_00"), paths.client_key("client_00"))
        try:
            yield transport, port, metrics, channel
        finally:
            channel.close()


def _raw_unary(channel: grpc.Channel, method: str, raw: bytes) -> grpc.StatusCode:
    call = channel.unary_unary(f"/{SERVICE}/{method}")  # bytes in, bytes out
    with pytest.raises(grpc.RpcError) as info:
        call(raw, timeout=10)
    return info.value.code()


def _raw_upload(channel: grpc.Channel, parts: list[bytes]) -> grpc.StatusCode:
    call = channel.stream_unary(f"/{SERVICE}/UploadUpdate")
    with pytest.raises(grpc.RpcError) as info:
        call(iter(parts), timeout=10)
    return info.value.code()


def _counts(metrics: Any) -> dict[str, int]:
    snap = metrics.snapshot()
    return {f"rejected.{k}": v for k, v in snap["rejected_messages"].items() if v} | {
        f"dropped.{k}": v for k, v in snap["clients_dropped"].items() if v}


def _settled_counts(metrics: Any, expected: dict[str, int], seconds: float = 10.0
                    ) -> dict[str, int]:
    """The counters once they equal ``expected`` (or after ``seconds``): a handler thread
    counts its refusal just after the task is closed, and a client that saw its stream
    cancelled may look before it has."""
    end = time.monotonic() + seconds
    while _counts(metrics) != expected and time.monotonic() < end:
        time.sleep(0.02)
    return _counts(metrics)


def test_messages_over_the_limit_are_counted_as_oversized(live: Any) -> None:
    transport, _, metrics, channel = live
    # Unary calls of every size just over the limit are refused as oversized, counted once.
    sent = 0
    for method, size in (("Join", LIMIT + 1), ("Heartbeat", LIMIT + 4000),
                         ("GetTask", GRPC_CEILING_FACTOR * LIMIT)):
        assert _raw_unary(channel, method, b"\x0a" * size) == grpc.StatusCode.RESOURCE_EXHAUSTED
        sent += 1
        assert _counts(metrics) == {"rejected.oversized": sent}

    # An upload against a live task: a header, then a chunk message over the limit. The
    # task is rejected (the round does not wait for it), counted as oversized, not as an
    # interrupted stream nor as a short update (wrong_shape).
    stubs = _Stubs(channel)
    instance = stubs.join(pb.JoinRequest(spec_hash="spec"), timeout=10).server_instance
    tally = RoundTally(FedAvgAggregator(), NUMEL, 1)
    loop = threading.Thread(target=lambda: [tally.add(r) for r in transport.fit(
        torch.zeros(NUMEL), [ClientTask("client_00", FitConfig(round=1, seed=0))], None)],
        daemon=True)
    loop.start()
    task = stubs.get_task(pb.TaskRequest(server_instance=instance, wait_seconds=10), timeout=20)
    assert task.kind == pb.Task.FIT
    header = pb.UploadMessage(header=pb.UploadHeader(
        task_id=task.task_id, round=1, num_samples=10, numel=NUMEL)).SerializeToString()
    big_chunk = pb.UploadMessage(chunk=pb.TensorChunk(
        offset=0, data=b"\0" * (LIMIT + 4000))).SerializeToString()
    code = _raw_upload(channel, [header, big_chunk])
    # The refusal is RESOURCE_EXHAUSTED; gRPC may report the stream as CANCELLED to a client
    # still sending when the server ends the call.
    assert code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED)
    loop.join(timeout=20)
    assert not loop.is_alive()  # the round ended at once: its one task was rejected
    assert tally.count == 0 and len(tally.rejected) == 1
    assert "over the limit" in tally.rejected[0]
    expected = {"rejected.oversized": sent + 1, "dropped.rejected": 1}
    assert _settled_counts(metrics, expected) == expected

    # An oversized first message (no header can be read): refused, no task touched.
    assert _raw_upload(channel, [b"\x0a" * (LIMIT + 1)]) == grpc.StatusCode.RESOURCE_EXHAUSTED
    expected = {"rejected.oversized": sent + 2, "dropped.rejected": 1}
    assert _settled_counts(metrics, expected) == expected

    # Past gRPC's own ceiling the call is refused before fedmosaic sees it: not counted
    # (documented in docs/deployment.md, "Faults and limits").
    over = GRPC_CEILING_FACTOR * LIMIT + 1
    assert _raw_unary(channel, "Join", b"\x0a" * over) == grpc.StatusCode.RESOURCE_EXHAUSTED
    expected = {"rejected.oversized": sent + 2, "dropped.rejected": 1}
    assert _settled_counts(metrics, expected) == expected


def test_every_exported_refusal_reason_can_be_counted() -> None:
    """Each reason label the metrics export (besides ``other``) is raised somewhere in
    ``fedmosaic.net``: a label nothing can count would read as "never happened" to an
    operator when it is really "never measured"."""
    sources = "\n".join(p.read_text() for p in (REPO / "src" / "fedmosaic" / "net").glob("*.py")
                        if p.name != "monitoring.py")
    literals = set(re.findall(r'"([a-z][a-z0-9_]*)"', sources))
    dead = [r for r in (*REJECT_REASONS, *DROP_REASONS) if r != OTHER and r not in literals]
    assert dead == []
    assert "rate_limited" not in REJECT_REASONS
