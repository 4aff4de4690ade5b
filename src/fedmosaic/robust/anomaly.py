"""Anomaly detection with memory: per-round scores, a reputation across rounds, quarantine.

Every round, each reporting client gets two scores:

* a robust norm z-score, the modified z-score of Iglewicz and Hoaglin (1993, "How to Detect
  and Handle Outliers"): ``0.6745 * (||x_i|| - median) / MAD`` over the round's update norms,
  so the statistics themselves are not dragged by the outliers they are looking for. The MAD
  is floored at ``mad_floor`` times the median norm: in a round of nearly equal norms (or a
  small cohort, whose MAD is a noisy estimate) small natural differences are not outliers;
* the cosine similarity of its update to the round's robust aggregate.

A client is *flagged* when ``|z| > z_threshold`` or ``cos < cos_threshold``. Flags feed a
beta reputation (Josang and Ismail 2002, "The Beta Reputation System", Bled eCommerce
Conference): with forgetting factor ``lambda``, ``r <- lambda r + [clean]``,
``s <- lambda s + [flagged]`` and reputation ``(r + 1) / (r + s + 2)``, so old evidence fades
and a client starts at 1/2. A client flagged in at least ``quarantine_after`` rounds whose
reputation is below ``min_reputation`` is quarantined: it is no longer selected, and an update
it sends anyway is dropped before aggregation, for ``quarantine_rounds`` rounds (0: for good).
On release its flag count restarts; its reputation is kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedmosaic.robust.base import dot64

__all__ = ["AnomalyDetector", "ClientScore"]

PERMANENT = -1  # the ``until`` value of a permanent quarantine


@dataclass(frozen=True)
class ClientScore:
    """One client's scores in one round."""

    norm_z: float
    cosine: float
    flagged: bool
    reputation: float


class AnomalyDetector:
    """Scores every update, keeps a reputation per client and quarantines persistent outliers.

    State (per client: ``r``, ``s``, flag count, quarantined-until round) is plain numbers
    and strings, saved with the strategy's checkpoint, so a resumed run remembers it.
    """

    def __init__(
        self,
        *,
        z_threshold: float = 3.5,
        cos_threshold: float = 0.0,
        forgetting: float = 0.9,
        quarantine_after: int = 3,
        min_reputation: float = 0.5,
        quarantine_rounds: int = 0,
        mad_floor: float = 0.05,
    ) -> None:
        def number(name: str, v: Any, ok: bool, allowed: str) -> float:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok:
                raise ValueError(f"{name} must be {allowed}, got {v!r}")
            return float(v)

        def integer(name: str, v: Any, lo: int) -> int:
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
            return v

        self.z_threshold = number("z_threshold", z_threshold,
                                  isinstance(z_threshold, (int, float)) and z_threshold > 0
                                  and math.isfinite(z_threshold), "a finite number > 0")
        self.cos_threshold = number("cos_threshold", cos_threshold,
                                    isinstance(cos_threshold, (int, float))
                                    and -1 <= cos_threshold <= 1, "a number in [-1, 1]")
        self.forgetting = number("forgetting", forgetting,
                                 isinstance(forgetting, (int, float)) and 0 < forgetting <= 1,
                                 "a number in (0, 1]")
        self.min_reputation = number("min_reputation", min_reputation,
                                     isinstance(min_reputation, (int, float))
                                     and 0 < min_reputation <= 1, "a number in (0, 1]")
        self.mad_floor = number("mad_floor", mad_floor,
                                isinstance(mad_floor, (int, float)) and 0 <= mad_floor < 1,
                                "a number in [0, 1)")
        self.quarantine_after = integer("quarantine_after", quarantine_after, 1)
        self.quarantine_rounds = integer("quarantine_rounds", quarantine_rounds, 0)
        # client id -> [r, s, flags, until]; until: 0 free, -1 permanent, k quarantined
        # through round k.
        self._clients: dict[str, list[float]] = {}
        self._released: list[str] = []
        self.last_scores: dict[str, ClientScore] = {}

    # -- queries ---------------------------------------------------------------------------
    def reputation(self, client_id: str) -> float:
        """``(r + 1) / (r + s + 2)``; 1/2 for a client never seen."""
        r, s = self._clients.get(client_id, [0.0, 0.0, 0, 0])[:2]
        return (r + 1.0) / (r + s + 2.0)

    def is_quarantined(self, client_id: str, round_num: int) -> bool:
        rec = self._clients.get(client_id)
        if rec is None:
            return False
        until = int(rec[3])
        return until == PERMANENT or until >= round_num

    def quarantined(self, round_num: int) -> list[str]:
        """Clients quarantined in ``round_num``, sorted."""
        return sorted(c for c in self._clients if self.is_quarantined(c, round_num))

    def admit(self, round_num: int, available: Iterable[str]) -> list[str]:
        """The available clients that are not quarantined in ``round_num`` (releasing those
        whose quarantine ended: their flag count restarts)."""
        admitted = []
        for cid in available:
            rec = self._clients.get(cid)
            if rec is not None and int(rec[3]) > 0 and int(rec[3]) < round_num:
                rec[2], rec[3] = 0, 0
                self._released.append(cid)
            if not self.is_quarantined(cid, round_num):
                admitted.append(cid)
        return admitted

    # -- one round ---------------------------------------------------------------------------
    def scores(self, deltas: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor,
                                                                               torch.Tensor]:
        """Modified norm z-scores and cosines to ``reference`` for the rows of ``deltas``."""
        norms = torch.linalg.vector_norm(deltas, dim=1).to(torch.float64)
        med = norms.median()
        mad = (norms - med).abs().median()
        # A zero or tiny MAD would make every small difference anomalous: floor it.
        scale = torch.clamp(mad, min=max(self.mad_floor * float(med), 1e-12))
        z = 0.6745 * (norms - med) / scale
        ref_norm = float(torch.linalg.vector_norm(reference.to(torch.float64)))
        dots = dot64(deltas, reference)
        denom = norms * ref_norm
        cos = torch.where(denom > 0, dots / denom.clamp(min=1e-300), torch.zeros_like(dots))
        return z, cos

    def observe(self, round_num: int, deltas: torch.Tensor, client_ids: Sequence[str],
                reference: torch.Tensor) -> dict[str, Any]:
        """Score this round's updates against ``reference`` (the robust aggregate), update
        reputations and quarantines, and return the round's metrics."""
        if deltas.shape[0] != len(client_ids):
            raise ValueError(f"{deltas.shape[0]} deltas for {len(client_ids)} client ids")
        z, cos = self.scores(deltas, reference)
        check_cos = bool(torch.linalg.vector_norm(reference) > 0)
        flagged_ids, newly = [], []
        self.last_scores = {}
        lam = self.forgetting
        for i, cid in enumerate(client_ids):
            zi, ci = float(z[i]), float(cos[i])
            flag = abs(zi) > self.z_threshold or (check_cos and ci < self.cos_threshold)
            rec = self._clients.setdefault(cid, [0.0, 0.0, 0, 0])
            rec[0] = lam * rec[0] + (0.0 if flag else 1.0)
            rec[1] = lam * rec[1] + (1.0 if flag else 0.0)
            if flag:
                rec[2] = int(rec[2]) + 1
                flagged_ids.append(cid)
            rep = self.reputation(cid)
            if (flag and int(rec[2]) >= self.quarantine_after and rep < self.min_reputation
                    and not self.is_quarantined(cid, round_num + 1)):
                rec[3] = PERMANENT if self.quarantine_rounds == 0 else \
                    round_num + self.quarantine_rounds
                newly.append(cid)
            self.last_scores[cid] = ClientScore(zi, ci, flag, rep)
        reps = [s.reputation for s in self.last_scores.values()]
        released, self._released = sorted(self._released), []
        metrics: dict[str, Any] = {
            "anomaly_flagged": len(flagged_ids),
            "anomaly_flagged_ids": sorted(flagged_ids),
            "anomaly_newly_quarantined_ids": sorted(newly),
            "anomaly_released_ids": released,
            "anomaly_quarantined": len(self.quarantined(round_num + 1)),
            "anomaly_norm_z_max": float(z.abs().max()) if len(z) else 0.0,
            "anomaly_cos_min": float(cos.min()) if len(cos) else 0.0,
            "anomaly_cos_median": float(cos.median()) if len(cos) else 0.0,
            "anomaly_reputation_min": min(reps) if reps else 0.5,
        }
        return metrics

    # -- reports and state ----------------------------------------------------------------
    def report(self, round_num: int) -> dict[str, Any]:
        """Final reputations and the quarantined clients, for the run report."""
        return {"reputations": {c: round(self.reputation(c), 6) for c in sorted(self._clients)},
                "quarantined": self.quarantined(round_num + 1),
                "flag_counts": {c: int(r[2]) for c, r in sorted(self._clients.items()) if r[2]}}

    def describe(self) -> dict[str, Any]:
        return {"z_threshold": self.z_threshold, "cos_threshold": self.cos_threshold,
                "forgetting": self.forgetting, "quarantine_after": self.quarantine_after,
                "min_reputation": self.min_reputation,
                "quarantine_rounds": self.quarantine_rounds, "mad_floor": self.mad_floor}

    def state_dict(self) -> dict[str, Any]:
        return {"clients": {c: [float(r[0]), float(r[1]), int(r[2]), int(r[3])]
                            for c, r in self._clients.items()},
                "released": list(self._released)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        clients = state["clients"]
        self._clients = {str(c): [float(r[0]), float(r[1]), int(r[2]), int(r[3])]
                         for c, r in clients.items()}
        self._released = [str(c) for c in state.get("released", [])]
