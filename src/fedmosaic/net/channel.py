"""The client side of a connection to a federation server, and nothing heavier: the mutual-TLS
channel (``open_channel``) and the service's methods on it (``Stubs``).

Kept apart from ``fedmosaic.net.client`` (which imports torch, the trainers and the privacy
stages) so that ``fedmosaic status`` and load generators start in a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from fedmosaic.net.auth import channel_credentials, pinned_server_name
from fedmosaic.net.proto import fedmosaic_pb2 as pb

SERVICE = "/fedmosaic.v1.Federation/"
# gRPC's own reconnection backoff (default up to 120 s) would hide a restarted server from
# our retries; ours (``Backoff``) paces the attempts instead. ``min_reconnect_backoff_ms`` is
# also gRPC's deadline for one connection attempt (TCP, TLS, HTTP/2 settings): at 200 ms,
# attempts to a busy server (a burst of thousands of joins) timed out on the client's side
# before the server could answer, so it stays at gRPC's default (20 s).
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200),
                     ("grpc.max_reconnect_backoff_ms", 2000)]


def grpc_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Channel/server options shared by both ends: bounded messages, no port sharing."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Two servers on one port would split the clients between them.
        ("grpc.so_reuseport", 0),
    ]


class Stubs:
    """The service's methods on one channel (no generated stubs needed): a ``grpc`` channel,
    or a ``grpc.aio`` one (its calls are then awaitable; the load benchmark's members)."""

    def __init__(self, channel: grpc.Channel | grpc.aio.Channel) -> None:
        def unary(name: str, req: Any, rep: Any) -> Any:
            return channel.unary_unary(SERVICE + name, request_serializer=req.SerializeToString,
                                       response_deserializer=rep.FromString)

        self.join = unary("Join", pb.JoinRequest, pb.JoinReply)
        self.heartbeat = unary("Heartbeat", pb.HeartbeatRequest, pb.HeartbeatReply)
        self.get_task = unary("GetTask", pb.TaskRequest, pb.Task)
        self.secagg = unary("SecAgg", pb.SecAggEnvelope, pb.SecAggEnvelope)
        self.status = unary("Status", pb.StatusRequest, pb.StatusReply)
        self.refuse_task = unary("RefuseTask", pb.TaskRefusal, pb.RefusalReply)
        self.report_evaluation = unary("ReportEvaluation", pb.EvaluationReport,
                                       pb.EvaluationReply)
        self.download = channel.unary_stream(
            SERVICE + "DownloadModel", request_serializer=pb.ModelRequest.SerializeToString,
            response_deserializer=pb.TensorChunk.FromString)
        self.upload = channel.stream_unary(
            SERVICE + "UploadUpdate", request_serializer=pb.UploadMessage.SerializeToString,
            response_deserializer=pb.UploadReply.FromString)


def open_channel(server: str, ca: Path, cert: Path, key: Path, *,
                 server_name: str | None = None,
                 max_message_bytes: int = 64 * 1024 * 1024) -> grpc.Channel:
    """A mutual-TLS channel to ``server`` (HOST:PORT)."""
    options = grpc_options(max_message_bytes) + list(RECONNECT_OPTIONS)
    # The server certificate generation named by our CRL (beside ca.pem) replaces the host name
    # check: a revoked server certificate then fails the handshake (fedmosaic.net.auth).
    server_name = pinned_server_name(ca) or server_name
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(server, channel_credentials(ca, cert, key), options=options)
