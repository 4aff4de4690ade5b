"""Byzantine-robust aggregation and anomaly detection (issue #6).

Each rule lives in its own module with its paper cited; ``make_robust(name, **params)``
builds one by name. ``FedAvg(robust=..., anomaly=...)`` runs them inside a round (see
``fedmosaic.robust.pipeline``); docs/security.md says what each defends and assumes.
"""

from __future__ import annotations

from typing import Any

from fedmosaic.robust.anomaly import AnomalyDetector, ClientScore
from fedmosaic.robust.base import RobustAggregator, RobustPreconditionError, RobustResult
from fedmosaic.robust.bulyan import Bulyan
from fedmosaic.robust.centered_clip import CenteredClip
from fedmosaic.robust.fltrust import FLTrust, MissingReferenceError
from fedmosaic.robust.geomed import GeometricMedian
from fedmosaic.robust.krum import Krum, MultiKrum
from fedmosaic.robust.median import CoordinateMedian, TrimmedMean
from fedmosaic.robust.norm_bound import NormBound
from fedmosaic.robust.pipeline import DefendedRound, IndividualUpdates, check_central_dp
from fedmosaic.robust.root import hold_out_root

RULES: dict[str, type[RobustAggregator]] = {
    "krum": Krum,
    "multikrum": MultiKrum,
    "median": CoordinateMedian,
    "trimmed_mean": TrimmedMean,
    "bulyan": Bulyan,
    "geomed": GeometricMedian,
    "centered_clip": CenteredClip,
    "fltrust": FLTrust,
    "norm_bound": NormBound,
}


def make_robust(name: str, **params: Any) -> RobustAggregator:
    """A robust rule by name (see ``RULES``) with its parameters, e.g.
    ``make_robust("krum", f=2)``, ``make_robust("trimmed_mean", beta=0.2)``,
    ``make_robust("norm_bound", max_norm=1.0)``."""
    if name not in RULES:
        raise ValueError(f"unknown robust aggregator {name!r}; known: {', '.join(RULES)}")
    try:
        return RULES[name](**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for robust aggregator {name!r}: {exc}") from exc


__all__ = [
    "RULES",
    "AnomalyDetector",
    "Bulyan",
    "CenteredClip",
    "ClientScore",
    "CoordinateMedian",
    "DefendedRound",
    "FLTrust",
    "GeometricMedian",
    "IndividualUpdates",
    "Krum",
    "MissingReferenceError",
    "MultiKrum",
    "NormBound",
    "RobustAggregator",
    "RobustPreconditionError",
    "RobustResult",
    "TrimmedMean",
    "check_central_dp",
    "hold_out_root",
    "make_robust",
]
