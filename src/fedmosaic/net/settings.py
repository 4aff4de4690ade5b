"""Deployment settings: the ``[server]`` table of an experiment, with command-line overrides."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from fedmosaic.core.errors import ConfigError
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
    round_retries: int = 3
    linger: float = 15.0

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
    def liveness_timeout(self) -> float:
        """A client silent for this long is considered disconnected."""
        return 3 * self.heartbeat_interval
