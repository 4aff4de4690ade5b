"""Defences, metrics and the report of the leakage audit, piece by piece."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmosaic.audit import (
    AttackResult,
    AuditError,
    GaussianNoise,
    NoDefence,
    SecureAggregation,
    TopK,
    expand_defences,
)
from fedmosaic.audit.metrics import above_chance_p_value, match_to_truth, per_sample_mse, psnr
from fedmosaic.audit.report import LABEL_ALPHA, LeakageReport, recommend_noise
from fedmosaic.privacy.local_dp import LocalDP


def test_dp_defence_is_the_projects_local_dp_mechanism():
    delta = torch.randn(500, generator=torch.Generator().manual_seed(0))
    ours = GaussianNoise(0.5, clip=0.7).apply(delta, torch.Generator().manual_seed(3))
    theirs = LocalDP(clip=0.7, noise_multiplier=0.5).apply(delta, torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_dp_defence_without_clip_noises_relative_to_the_update_norm():
    delta = torch.randn(20_000, generator=torch.Generator().manual_seed(1)) * 3
    noised = GaussianNoise(0.01).apply(delta, torch.Generator().manual_seed(2))
    noise_std = float((noised - delta).std())
    assert noise_std == pytest.approx(0.01 * float(delta.norm()), rel=0.03)


@given(st.integers(1, 300), st.floats(0.001, 1.0), st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_topk_keeps_exactly_the_largest_magnitudes(n, keep, seed):
    delta = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    out = TopK(keep).apply(delta, torch.Generator())
    kept = out != 0
    k = max(1, math.ceil(keep * n))
    assert int(kept.sum()) == k
    torch.testing.assert_close(out[kept], delta[kept])
    if k < n:
        assert float(delta[kept].abs().min()) >= float(delta[~kept].abs().max())


def test_expand_defences_builds_each_grid_once():
    ds = expand_defences(["none", "dp", "topk", "secagg", "dp"], noise_multipliers=[0.1, 1],
                         keep_fractions=[0.5], secagg_clients=[2, 4])
    assert [d.label for d in ds] == ["none", "dp z=0.1", "dp z=1", "topk keep=0.5",
                                     "secagg K=2", "secagg K=4"]
    assert all(d.clients == 1 for d in ds[:4]) and [d.clients for d in ds[4:]] == [2, 4]
    assert ds[3].support_visible and not ds[0].support_visible


@pytest.mark.parametrize("make, message", [
    (lambda: expand_defences(["dp", "bogus"]), "unknown defence 'bogus'"),
    (lambda: expand_defences(["dp"], noise_multipliers=[]), "empty grid"),
    (lambda: GaussianNoise(0.0), "noise multiplier"),
    (lambda: GaussianNoise(float("nan")), "noise multiplier"),
    (lambda: GaussianNoise(1.0, clip=-1.0), "clip"),
    (lambda: TopK(0.0), "keep fraction"),
    (lambda: TopK(1.5), "keep fraction"),
    (lambda: SecureAggregation(1), "clients >= 2"),
])
def test_defence_parameters_are_validated(make, message):
    with pytest.raises(AuditError, match=message):
        make()


def test_psnr_and_mse_follow_their_definitions():
    true = torch.zeros(2, 4)
    rec = torch.tensor([[0.1, 0.1, 0.1, 0.1], [0.0, 0.0, 0.0, 0.0]])
    mse = per_sample_mse(rec, true)
    torch.testing.assert_close(mse, torch.tensor([0.01, 0.0], dtype=torch.float64))
    values = psnr(mse, data_range=1.0)
    assert float(values[0]) == pytest.approx(20.0) and float(values[1]) == 100.0
    assert float(psnr(torch.tensor([0.04]), data_range=2.0)[0]) == pytest.approx(20.0)


def test_match_to_truth_undoes_a_permutation():
    true = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    rec = torch.empty_like(true)
    rec[perm] = true + 0.01
    matched = match_to_truth(rec, true)
    assert matched.tolist() == perm.tolist()


def test_label_p_value_is_the_binomial_tail():
    assert above_chance_p_value(0, 8, 10) == pytest.approx(1.0)
    assert above_chance_p_value(3, 8, 10) == pytest.approx(0.038092, abs=1e-6)
    assert above_chance_p_value(8, 8, 10) == pytest.approx(1e-8)
    with pytest.raises(ValueError):
        above_chance_p_value(9, 8, 10)


def _result(z: float, attack: str, leaked: int, p: float) -> AttackResult:
    return AttackResult(defence=f"dp z={z:g}", defence_kind="dp",
                        defence_params={"noise_multiplier": z, "clip": "update norm"},
                        attack=attack, samples=8, mse=0.1, psnr=10.0, best_psnr=12.0,
                        label_accuracy=0.5, label_samples=8, label_p_value=p, leaked_samples=leaked,
                        matching_loss=0.5)


def test_recommendation_is_the_smallest_noise_where_every_attack_fails():
    results = [_result(0.1, "dlg", 3, 0.001), _result(0.1, "idlg", 0, 0.001),
               _result(1.0, "dlg", 0, 0.5), _result(1.0, "idlg", 0, LABEL_ALPHA / 2),
               _result(3.0, "dlg", 0, 0.5), _result(3.0, "idlg", 0, 0.3)]
    rec = recommend_noise(results)
    assert rec["noise_multiplier"] == 3.0 and rec["inputs_noise_multiplier"] == 1.0
    assert "z = 3" in rec["text"] and "not a differential-privacy guarantee" in rec["text"]
    none = recommend_noise(results[:2])
    assert none["noise_multiplier"] is None and "test larger" in none["text"]
    assert recommend_noise([])["noise_multiplier"] is None


def test_report_serialises_to_json_and_markdown(tmp_path):
    results = [_result(1.0, "dlg", 0, 0.5)]
    report = LeakageReport(
        model={"name": "MLP", "parameters": 10},
        data={"name": "d", "size": 9, "feature_shape": [4], "num_classes": 3, "min": 0.0,
              "max": 1.0, "data_range": 1.0},
        settings={"samples": 8, "lr": 0.1, "local_steps": 1, "batch_size": 1,
                  "iterations": 5, "restarts": 1, "seed": 0, "weights": "w"},
        prior={"mse": 0.08, "psnr": 11.0, "chance_accuracy": 1 / 3},
        results=results, recommendation=recommend_noise(results), notes=["n"])
    js, md = report.save(tmp_path / "out")
    data = json.loads(js.read_text())
    assert data["results"][0]["failed"] is True and data["recommendation"]["noise_multiplier"] == 1
    text = md.read_text()
    assert "| dp z=1 | dlg | 8 | 0.1000 | 10.00 | 12.00 | 0.500 (8) |" in text
    assert "Recommendation:" in text


def test_no_defence_is_the_identity():
    delta = torch.randn(7)
    assert NoDefence().apply(delta, torch.Generator()) is delta
