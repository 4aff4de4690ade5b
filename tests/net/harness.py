"""In-process deployments for the network tests: a real ``GrpcTransport`` and gRPC server with
mutual TLS on 127.0.0.1, and (for whole runs) clients as threads of the real client runtime."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

from fedmosaic.net.certs import FederationPaths
from fedmosaic.net.client import ClientReport, _Stubs, open_channel, run_client
from fedmosaic.net.monitoring import ServerMetrics
from fedmosaic.net.proto import fedmosaic_pb2 as pb
from fedmosaic.net.server import start_server
from fedmosaic.net.settings import DeploySettings
from fedmosaic.net.transport import GrpcTransport
from fedmosaic.net.wire import spec_hash
from fedmosaic.runtime.simulate import simulate
from fedmosaic.train.base import Trainer


@contextmanager
def live_server(credentials: Path, *, numel: int,
                chunk_bytes: int) -> Iterator[tuple[GrpcTransport, int, ServerMetrics]]:
    """A server with short timeouts for driving ``transport.fit`` and raw client calls by
    hand: yields (transport, port, metrics); finishes the transport and stops the server."""
    settings = DeploySettings(credentials=credentials, address="127.0.0.1", port=0,
                              heartbeat_interval=0.5, round_deadline=20.0, min_clients=1,
                              wait_for_clients=5.0, chunk_bytes=chunk_bytes, max_workers=16)
    metrics = ServerMetrics()
    transport = GrpcTransport(settings, numel=numel, spec_hash="spec", experiment="test",
                              rounds=1, metrics=metrics)
    running = start_server(settings, transport, traffic=metrics)
    try:
        yield transport, running.port, metrics
    finally:
        transport.finish()
        running.stop(0)


class LiveClients:
    """Raw client calls against a ``live_server``: one channel per member (or ``"operator"``)
    with its own credentials; ``close`` closes them all."""

    def __init__(self, credentials: Path, transport: GrpcTransport, port: int,
                 metrics: ServerMetrics) -> None:
        self.paths = FederationPaths(credentials)
        self.transport, self.port, self.metrics = transport, port, metrics
        self.channels: list[grpc.Channel] = []

    def channel(self, cid: str) -> grpc.Channel:
        p = self.paths
        cert, key = ((p.operator_cert, p.operator_key) if cid == "operator"
                     else (p.client_cert(cid), p.client_key(cid)))
        channel = open_channel(f"127.0.0.1:{self.port}", p.ca_cert, cert, key)
        self.channels.append(channel)
        return channel

    def joined(self, cid: str) -> tuple[_Stubs, str]:
        """Join as ``cid`` (the live server's model layout is ``"spec"``): stubs, instance."""
        stubs = _Stubs(self.channel(cid))
        return stubs, stubs.join(pb.JoinRequest(spec_hash="spec"), timeout=10).server_instance

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


@contextmanager
def live_clients(cls: type[LiveClients], credentials: Path, *, numel: int,
                 chunk_bytes: int) -> Iterator[Any]:
    """A ``live_server`` on ``credentials`` and a ``cls`` (a ``LiveClients``) to call it."""
    with live_server(credentials, numel=numel, chunk_bytes=chunk_bytes) as (transport, port,
                                                                              metrics):
        clients = cls(credentials, transport, port, metrics)
        try:
            yield clients
        finally:
            clients.close()


def deploy_in_process(
    fed: Any, credentials: Path, strategy: Any, *, trainer: Trainer,
    client_trainer: Callable[[], Trainer], rounds: int, secagg: Any = None,
    policies: Mapping[str, Any] | None = None, seed: int = 5,
) -> tuple[Any, dict[str, ClientReport]]:
    """Run ``rounds`` rounds of ``strategy`` over gRPC: the server loop in this thread (as
    ``simulate`` with a ``GrpcTransport``), one ``run_client`` thread per client of ``fed``
    with its own trainer (``client_trainer()``, built here: building a model draws from torch's
    global RNG) and optional privacy policy. Returns the run and each client's report."""
    settings = DeploySettings(credentials=credentials, address="127.0.0.1", port=0,
                              min_clients=len(fed.clients), heartbeat_interval=1.0,
                              round_deadline=60.0, wait_for_clients=60.0, chunk_bytes=256,
                              max_workers=32)
    transport = GrpcTransport(settings, numel=trainer.spec.numel, spec_hash=spec_hash(trainer.spec),
                              experiment="blobs", rounds=rounds, secagg=secagg)
    if secagg is not None:
        secagg.check_strategy(strategy)  # as `fedmosaic server` does before it listens
    running = start_server(settings, transport)
    paths = FederationPaths(credentials)
    reports: dict[str, ClientReport] = {}
    trainers = {cid: client_trainer() for cid in fed.client_ids}

    def client(cid: str) -> None:
        reports[cid] = run_client(
            f"127.0.0.1:{running.port}", ca=paths.ca_cert, cert=paths.client_cert(cid),
            key=paths.client_key(cid), trainer=trainers[cid], data=fed.client(cid).train,
            retry_budget=60, poll_seconds=1.0, policy=(policies or {}).get(cid))

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in fed.client_ids]
    for t in threads:
        t.start()
    try:
        result = simulate(trainer, fed, strategy, rounds, seed=seed, transport=transport)
        transport.finish()
        for t in threads:
            t.join(timeout=30)
    finally:
        running.stop(0)
    return result, reports
