"""Refusals: why the server turns a call down, as a gRPC status and a metrics label."""

from __future__ import annotations

import grpc


class Refused(Exception):
    """The server refuses a call; ``code`` is the gRPC status sent back with ``reason``.

    ``label`` is a short, bounded name for the refusal (a Prometheus label value), never
    built from client input.
    """

    def __init__(self, code: grpc.StatusCode, reason: str, label: str) -> None:
        super().__init__(reason)
        self.code, self.reason, self.label = code, reason, label
