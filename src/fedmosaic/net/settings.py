"""Deployment settings: the ``[server]`` table of an experiment, with command-line overrides."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from fedmosaic.core.errors import ConfigError
from fedmosaic.net.admission import AdmissionLimits
from fedmosaic.net.wire import MESSAGE_OVERHEAD


@dataclass(frozen=True)
class DeploySettings:
    """How the server listens, authenticates and paces rounds (see docs/deployment.md).

    ``round_deadline``: seconds a round waits for uploads before dropping the stragglers;
    ``min_clients``: connected clients needed before a round starts, waited for up to
    ``wait_for_clients`` seconds; a client that misses three ``heartbeat_interval`` periods is
    treated as gone. ``chunk_bytes`` bounds every tensor chunk and so every message;
    ``upload_slots`` bounds how many uploads are buffered at once; ``round_retries`` is how
    often a failed round (too few updates) is retried from the last checkpoint; ``linger``
    is how long the finished server keeps telling clients that the run is done.

    The service is asyncio (``grpc.aio``): a waiting call costs a coroutine, not a thread.
    ``max_workers`` threads run blocking work (joins, uploads being assembled, SecAgg+
    stages). Admission control (``fedmosaic.net.admission``): at most ``max_calls`` calls in
    flight, ``reserved_rpcs`` of them (default: an eighth, at least 2) only for members with
    nothing in flight and the operator; a member may have ``max_inflight_per_client`` calls
    in flight and one open upload; a stream waiting longer than ``stream_idle_timeout``
    seconds for its client is cut, and so is an upload still unfinished
    ``stream_idle_timeout + model bytes / min_upload_rate`` seconds after it got its upload
    buffer (a trickle of messages, each just inside the idle timeout); beyond
    ``max_calls + max_queued_rpcs`` concurrent calls gRPC itself refuses, uncounted.
    """

    credentials: Path
    address: str = "0.0.0.0"
    port: int = 50051
    round_deadline: float = 600.0
    min_clients: int = 1
    wait_for_clients: float = 600.0
    heartbeat_interval: float = 5.0
    metrics_port: int | None = None
    chunk_bytes: int = 1024 * 1024
    upload_slots: int = 2
    max_workers: int = 128
    max_calls: int = 16384
    round_retries: int = 3
    linger: float = 15.0
    max_inflight_per_client: int = 4
    stream_idle_timeout: float = 30.0
    min_upload_rate: float = 32768.0
    reserved_rpcs: int | None = None
    max_queued_rpcs: int = 512

    def __post_init__(self) -> None:
        if self.max_calls < 3:
            raise ConfigError("server.max_calls", self.max_calls, "an integer >= 3")
        if self.reserved_rpcs is not None and not 2 <= self.reserved_rpcs < self.max_calls:
            raise ConfigError("server.reserved_rpcs", self.reserved_rpcs,
                              f"an integer >= 2 and < max_calls ({self.max_calls})")
        if self.max_workers < 1:
            raise ConfigError("server.max_workers", self.max_workers, "an integer >= 1")
        if self.max_inflight_per_client < 1:
            raise ConfigError("server.max_inflight_per_client", self.max_inflight_per_client,
                              "an integer >= 1")
        if not self.min_upload_rate > 0:
            raise ConfigError("server.min_upload_rate", self.min_upload_rate,
                              "a number of bytes per second > 0")
        if not self.stream_idle_timeout > 0:
            raise ConfigError("server.stream_idle_timeout", self.stream_idle_timeout,
                              "a number of seconds > 0")
        if self.max_queued_rpcs < 0:
            raise ConfigError("server.max_queued_rpcs", self.max_queued_rpcs,
                              "an integer >= 0")

    @classmethod
    def from_section(cls, section: dict[str, Any], **overrides: Any) -> DeploySettings:
        """From a validated ``[server]`` table; ``overrides`` that are not None win."""
        values = {**section, **{k: v for k, v in overrides.items() if v is not None}}
        if "credentials" not in values:
            raise ConfigError("server.credentials", "<missing>",
                              "a federation directory (create one with 'fedmosaic certs "
                              "create'); TLS with client certificates is always on")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"server.{unknown[0]}", values[unknown[0]],
                              "one of " + ", ".join(sorted(known)))
        return cls(**{**values, "credentials": Path(values["credentials"])})

    def with_port(self, port: int) -> DeploySettings:
        return replace(self, port=port)

    @property
    def max_message_bytes(self) -> int:
        """The gRPC message size limit on both sides: one chunk plus its envelope."""
        return self.chunk_bytes + MESSAGE_OVERHEAD

    @property
    def reserved(self) -> int:
        """Calls kept for members with nothing in flight and the operator."""
        if self.reserved_rpcs is not None:
            return self.reserved_rpcs
        return max(2, self.max_calls // 8)

    def admission_limits(self) -> AdmissionLimits:
        return AdmissionLimits(capacity=self.max_calls, reserved=self.reserved,
                               per_member=self.max_inflight_per_client,
                               stream_idle=self.stream_idle_timeout)

    @property
    def liveness_timeout(self) -> float:
        """A client silent for this long is considered disconnected."""
        return 3 * self.heartbeat_interval
