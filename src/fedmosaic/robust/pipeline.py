"""How a strategy runs a robust rule and the anomaly detector on a round's updates.

``DefendedRound`` is what ``FedAvg(robust=..., anomaly=...)`` delegates to: it filters
quarantined clients out of sampling, checks the cohort against the rule's precondition, and
at the end of a round stacks the kept updates, drops any from quarantined clients, runs the
rule (or, with only anomaly detection, the plain weighted mean), scores the updates and
returns the delta for the server optimizer with the round's metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedmosaic.algorithms.aggregate import FedAvgAggregator, weighted_sum
from fedmosaic.core.errors import ConfigError
from fedmosaic.robust.anomaly import AnomalyDetector
from fedmosaic.robust.base import RobustAggregator, RobustPreconditionError
from fedmosaic.robust.norm_bound import NormBound

log = logging.getLogger(__name__)

__all__ = ["DefendedRound", "IndividualUpdates", "check_central_dp"]


# What a rule's guarantee rests on, for rules where it is not a bound on f.
ASSUMES = {
    "fltrust": "a clean root data set at the server, drawn like the clients' data",
    "norm_bound": "nothing about f: each client's influence is bounded by max_norm",
}


class IndividualUpdates(FedAvgAggregator):
    """FedAvg's weighting, but the tally keeps every validated update (``keep_updates``) and
    transports must hand them over one by one (``streaming = False``): a robust rule or the
    anomaly detector needs each update, and secure aggregation, which reveals only sums,
    refuses it at configuration."""

    streaming = False  # type: ignore[assignment]
    keep_updates = True

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "individual_updates": "true"}


def check_central_dp(robust: RobustAggregator | None, anomaly: AnomalyDetector | None,
                     *, distributed: bool = False) -> NormBound | None:
    """Refuse what would void DP-FedAvg's guarantee; return the norm bound it can absorb.

    DP-FedAvg's noise is calibrated to how far one client can move the fixed-denominator sum
    of clipped updates (the clip ``S``). Norm bounding *is* that clipped sum (at
    ``min(S, max_norm)``), so it composes. Every other rule selects, reweights or takes
    order statistics, so one client can change how *other* clients' updates enter the output
    (Krum's selection, a median's position, FLTrust's trust denominator), and the output's
    sensitivity is no longer ``S``: refused. The anomaly detector is refused too: quarantine
    decisions and per-client scores depend on every update, so they would be an unaccounted
    release.
    """
    if distributed and (robust is not None or anomaly is not None):
        raise ConfigError("robust", getattr(robust, "name", "anomaly"),
                          "no robust aggregation or anomaly detection with distributed DP: "
                          "the server only sees the secure sum of the noised updates")
    if anomaly is not None:
        raise ConfigError("anomaly", "enabled",
                          "no anomaly detection under central DP: per-client scores and "
                          "quarantine decisions depend on every client's raw update, so they "
                          "would leak what the DP noise protects (DP-FedAvg's accounting does "
                          "not cover them)")
    if robust is None:
        return None
    if not isinstance(robust, NormBound):
        raise ConfigError("robust.aggregator", robust.name,
                          "'norm_bound' only under central DP: the DP noise is calibrated to "
                          "one client moving the clipped sum by at most the clip; a rule that "
                          "selects, trims or reweights updates lets one client change how "
                          "the others enter the output, so that calibration no longer holds")
    if robust.noise_std > 0:
        raise ConfigError("robust.noise_std", robust.noise_std,
                          "0 under central DP (the DP noise replaces norm bounding's weak "
                          "noise)")
    return robust


class DefendedRound:
    """A robust rule and/or an anomaly detector, wired into a strategy's round."""

    def __init__(self, robust: RobustAggregator | None, anomaly: AnomalyDetector | None) -> None:
        if robust is None and anomaly is None:
            raise ValueError("DefendedRound needs a robust rule, an anomaly detector or both")
        if robust is not None and not isinstance(robust, RobustAggregator):
            raise TypeError(f"robust must be a RobustAggregator, got {type(robust).__name__}")
        if anomaly is not None and not isinstance(anomaly, AnomalyDetector):
            raise TypeError(f"anomaly must be an AnomalyDetector, got {type(anomaly).__name__}")
        self.robust, self.anomaly = robust, anomaly
        self.last_round = 0

    def admit(self, round_num: int, available: Sequence[str]) -> list[str]:
        """The clients that may be sampled this round (quarantined ones are not)."""
        if self.anomaly is None:
            return list(available)
        return self.anomaly.admit(round_num, available)

    def check_cohort(self, n: int) -> None:
        """A planned cohort that cannot meet the rule's precondition is a configuration error
        (raised before any client trains)."""
        if self.robust is not None:
            self.robust.check(n)

    def finish(self, round_num: int, weights: torch.Tensor,
               tally: Any) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """The aggregated delta (None: leave the model unchanged) and the round's metrics."""
        self.last_round = round_num
        deltas, agg_weights, ids = tally.stacked_updates()
        metrics: dict[str, Any] = {}
        if self.anomaly is not None and ids:
            keep = [not self.anomaly.is_quarantined(c, round_num) for c in ids]
            if not all(keep):
                # Quarantined clients are not selected; one that reports anyway is dropped.
                mask = torch.tensor(keep, device=deltas.device)
                metrics["anomaly_dropped_quarantined"] = len(ids) - int(mask.sum())
                deltas, agg_weights = deltas[mask], agg_weights[mask.to(agg_weights.device)]
                ids = [c for c, k in zip(ids, keep) if k]
        if not ids:
            metrics["robust_skipped"] = 1
            return None, metrics
        n = len(ids)
        if self.robust is not None:
            try:
                self.robust.check(n)
            except RobustPreconditionError as exc:
                # Fewer updates arrived than planned (failures, rejections): the rule's
                # guarantee does not hold for this round, so the model is not moved.
                log.warning("round %d: %s; skipping the model update", round_num, exc)
                metrics["robust_skipped"] = 1
                return None, metrics
            self.robust.begin_round(round_num, weights)
            result = self.robust.aggregate(deltas, agg_weights, ids)
            delta, shares = result.delta, result.client_weights
            metrics.update(result.metrics)
            reference = delta
        else:
            w = agg_weights.to(torch.float64)
            shares = w / w.sum()
            delta = weighted_sum(deltas, shares)
            # Without a robust rule the detector still needs a robust reference direction.
            reference = deltas.median(dim=0).values
        metrics["robust_zero_weight"] = int((shares == 0).sum())
        metrics["robust_max_share"] = float(shares.max())
        if self.anomaly is not None:
            metrics.update(self.anomaly.observe(round_num, deltas, ids, reference))
        return delta, metrics

    def report(self) -> dict[str, Any]:
        """The final state, for the run report (``strategy.guarantees()``)."""
        out: dict[str, Any] = {"aggregator": None, "assumes": None}
        if self.robust is not None:
            out["aggregator"] = self.robust.describe()
            out["assumes"] = ASSUMES.get(self.robust.name,
                                         f"at most f={self.robust.f} Byzantine clients in "
                                         "every round")
        if self.anomaly is not None:
            out["anomaly"] = {**self.anomaly.describe(), **self.anomaly.report(self.last_round)}
        return out

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.robust is not None:
            out["robust"] = self.robust.describe()
        if self.anomaly is not None:
            out["anomaly"] = self.anomaly.describe()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"robust": {} if self.robust is None else self.robust.state_dict(),
                "anomaly": {} if self.anomaly is None else self.anomaly.state_dict(),
                "last_round": self.last_round}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.robust is not None:
            self.robust.load_state_dict(state["robust"])
        if self.anomaly is not None:
            self.anomaly.load_state_dict(state["anomaly"])
        self.last_round = int(state.get("last_round", 0))
