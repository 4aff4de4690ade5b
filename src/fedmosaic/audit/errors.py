"""The error the leakage audit raises for input it cannot audit."""

from __future__ import annotations

from fedmosaic.core.errors import FedmosaicError


class AuditError(FedmosaicError, ValueError):
    """The audit cannot run on this model, data or setting; the message says why."""
