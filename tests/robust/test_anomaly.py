"""AnomalyDetector on its own: scores, reputation, quarantine and release, state."""

import pytest
import torch

from fedmosaic.robust import AnomalyDetector

IDS = [f"c{i}" for i in range(8)]


def _round(seed: int, bad: dict[str, float] | None = None) -> torch.Tensor:
    """8 honest updates around one direction; ``bad`` scales some clients' updates."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.ones(16)
    deltas = base + 0.1 * torch.randn(8, 16, generator=gen)
    for cid, scale in (bad or {}).items():
        deltas[IDS.index(cid)] *= scale
    return deltas


def test_scores_flag_large_and_reversed_updates_only():
    det = AnomalyDetector()
    deltas = _round(0, {"c1": 50.0, "c2": -1.0})
    metrics = det.observe(1, deltas, IDS, deltas.median(dim=0).values)
    assert metrics["anomaly_flagged_ids"] == ["c1", "c2"]
    assert det.last_scores["c1"].norm_z > 3.5 and det.last_scores["c2"].cosine < 0
    assert all(not det.last_scores[c].flagged for c in IDS if c not in ("c1", "c2"))
    assert metrics["anomaly_quarantined"] == 0  # one flag is not enough


def test_persistent_outlier_is_quarantined_then_released():
    det = AnomalyDetector(quarantine_after=2, quarantine_rounds=2)
    for r in (1, 2):
        deltas = _round(r, {"c3": -5.0})
        m = det.observe(r, deltas, IDS, deltas.median(dim=0).values)
    assert m["anomaly_newly_quarantined_ids"] == ["c3"]
    assert det.reputation("c3") < 0.5 < det.reputation("c0")
    # Rounds 3 and 4: not admitted; round 5: released with a fresh flag count.
    assert "c3" not in det.admit(3, IDS) and "c3" not in det.admit(4, IDS)
    assert det.admit(5, IDS) == IDS
    deltas = _round(5)
    m = det.observe(5, deltas, IDS, deltas.median(dim=0).values)
    assert m["anomaly_released_ids"] == ["c3"] and det.quarantined(6) == []


def test_an_honest_client_with_one_bad_round_is_not_quarantined():
    det = AnomalyDetector(quarantine_after=1, min_reputation=0.5)
    for r in range(1, 6):
        deltas = _round(r)
        det.observe(r, deltas, IDS, deltas.median(dim=0).values)
    deltas = _round(6, {"c4": 40.0})
    m = det.observe(6, deltas, IDS, deltas.median(dim=0).values)
    assert m["anomaly_flagged_ids"] == ["c4"] and m["anomaly_newly_quarantined_ids"] == []
    assert det.reputation("c4") > 0.5  # five clean rounds outweigh one flag


def test_state_round_trips_and_rejects_bad_parameters():
    det = AnomalyDetector(quarantine_after=1, min_reputation=0.9)
    deltas = _round(0, {"c0": -3.0})
    det.observe(1, deltas, IDS, deltas.median(dim=0).values)
    copy = AnomalyDetector(quarantine_after=1, min_reputation=0.9)
    copy.load_state_dict(det.state_dict())
    assert copy.report(1) == det.report(1) and copy.quarantined(2) == ["c0"]
    for kwargs in ({"z_threshold": 0}, {"cos_threshold": 1.5}, {"forgetting": 0.0},
                   {"quarantine_after": 0}, {"min_reputation": 0}, {"quarantine_rounds": -1},
                   {"z_threshold": True}, {"mad_floor": 1.0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            AnomalyDetector(**kwargs)
