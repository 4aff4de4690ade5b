"""Refusals: why the server turns a call down, as a gRPC status and a metrics label.

A refusal also travels as trailing metadata, so that a client can act on it without parsing
the human-readable text:

- ``fedmosaic-refusal``: a short code (``Refused.refusal``: the metrics label, or for a join
  refused as incompatible the ``fedmosaic.compat.Incompatibility`` code, e.g.
  ``feature_shape``); always sent;
- ``fedmosaic-permanent``: ``"1"`` when retrying the same call cannot succeed (the model or
  data does not fit the task, the credential is revoked or has the wrong role); absent
  otherwise. A client then stops at once with the reason instead of retrying.
"""

from __future__ import annotations

import grpc

REFUSAL_KEY = "fedmosaic-refusal"
PERMANENT_KEY = "fedmosaic-permanent"
# Labels that are permanent whoever raises them (e.g. ``fedmosaic.net.auth``): the caller's
# credential or model will not change by retrying.
PERMANENT_LABELS = frozenset({
    "unauthenticated",  # no usable client certificate
    "revoked",          # the credential is on the CRL
    "not_a_client",     # an operator or server credential trying to train
    "not_operator",     # Status without the operator credential
    "model_mismatch",   # the client's model layout differs from the task's
    "incompatible",     # the client's data or model does not fit the task
    "bad_profile",      # the client's declared data profile is malformed
})


class Refused(Exception):
    """The server refuses a call; ``code`` is the gRPC status sent back with ``reason``.

    ``label`` is a short, bounded name for the refusal (a Prometheus label value), never
    built from client input. ``refusal`` (default: ``label``) is the code sent to the client
    in the ``fedmosaic-refusal`` trailing metadata; ``permanent`` (default: whether ``label``
    is one of ``PERMANENT_LABELS``) adds ``fedmosaic-permanent: 1``.
    """

    def __init__(self, code: grpc.StatusCode, reason: str, label: str, *,
                 permanent: bool | None = None, refusal: str | None = None) -> None:
        super().__init__(reason)
        self.code, self.reason, self.label = code, reason, label
        self.refusal = refusal or label
        self.permanent = label in PERMANENT_LABELS if permanent is None else permanent

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata the service sends with this refusal."""
        meta = ((REFUSAL_KEY, self.refusal),)
        return (*meta, (PERMANENT_KEY, "1")) if self.permanent else meta
