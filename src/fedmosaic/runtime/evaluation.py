"""Federated evaluation: clients evaluate the global model on their local test split.

Without a central test set (the server holds no data), the model is judged where the data is,
as Flower's ``evaluate`` round does: selected clients evaluate the global model on their own
test split and report loss, accuracy and sample count; the server averages them weighted by
sample count. ``EvalReport`` is what one client reports; transports yield it (or a
``ClientFailure``) from ``Transport.evaluate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EvalReport:
    """One client's evaluation of the global model on its local test split."""

    client_id: str
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
