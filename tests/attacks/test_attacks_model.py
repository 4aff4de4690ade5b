"""Model-poisoning attacks: exact crafted updates on hand-made rounds."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmosaic.attacks import (
    ALIE,
    IPM,
    AdversarialTransport,
    BenignStats,
    GaussianNoise,
    SignFlip,
    alie_z_max,
)
from fedmosaic.core.errors import ConfigError
from fedmosaic.core.update import ClientUpdate
from tests.attacks.helpers import ListTransport, tasks_for

HONEST = {
    "a": torch.tensor([1.0, 2.0, -1.0]),
    "b": torch.tensor([3.0, 2.0, 0.0]),
    "c": torch.tensor([2.0, 5.0, 1.0]),
    "m1": torch.tensor([9.0, 9.0, 9.0]),
    "m2": torch.tensor([-7.0, 0.5, 4.0]),
}
MALICIOUS = {"m1", "m2"}
BENIGN = torch.stack([HONEST[c] for c in ("a", "b", "c")]).double()


def run_round(attack, deltas=HONEST, malicious=MALICIOUS, weighting=None):
    inner = ListTransport(deltas)
    adv = AdversarialTransport(inner, attack, malicious)
    numel = next(iter(deltas.values())).numel()
    out = list(adv.fit(torch.zeros(numel), tasks_for(list(deltas)), weighting))
    return adv, inner, out


def by_client(results):
    return {r.client_id: r for r in results if isinstance(r, ClientUpdate)}


def test_alie_z_max_matches_the_paper_example():
    # Baruch et al.: n = 50, m = 12 -> s = 14, z_max = Phi^-1(36 / 50).
    assert round(alie_z_max(50, 12), 4) == 0.5828
    assert alie_z_max(50, 1) == pytest.approx(0.0, abs=1e-12)  # s = 25: Phi^-1(0.5)
    with pytest.raises(ConfigError, match="'m'"):
        alie_z_max(50, 26)  # a malicious majority: the formula needs s >= 1
    with pytest.raises(ConfigError, match="'n'"):
        alie_z_max(1, 1)


def test_alie_uploads_mean_minus_z_std_of_the_benign_updates():
    adv, inner, out = run_round(ALIE())
    assert inner.weightings == [None]  # individual updates were needed
    got = by_client(out)
    mean, std = BENIGN.mean(0), BENIGN.std(0)  # sample std, divisor n - 1
    z = alie_z_max(5, 2)  # n = 5 selected, m = 2 malicious: s = 1, Phi^-1(4/5)
    assert z == pytest.approx(0.8416212335729143)
    for c in MALICIOUS:
        torch.testing.assert_close(got[c].delta, (mean - z * std).float())
        assert got[c].num_samples == 10 and got[c].delta.dtype == torch.float32
    for c in ("a", "b", "c"):
        torch.testing.assert_close(got[c].delta, HONEST[c])
    # Omniscient: the crafted updates come after every benign one.
    assert [r.client_id for r in out][-2:] == ["m1", "m2"]
    assert adv.reported(1) == 2 and adv.reported(2) == 0


def test_alie_with_a_fixed_z():
    _, _, out = run_round(ALIE(z=1.5))
    want = BENIGN.mean(0) - 1.5 * BENIGN.std(0)
    torch.testing.assert_close(by_client(out)["m1"].delta, want.float())


def test_ipm_uploads_minus_epsilon_times_the_benign_mean():
    _, _, out = run_round(IPM(epsilon=0.1))
    for c in MALICIOUS:
        torch.testing.assert_close(by_client(out)[c].delta, (-0.1 * BENIGN.mean(0)).float())


def test_sign_flip_reverses_and_scales_the_own_update():
    _, _, out = run_round(SignFlip(scale=3.0))
    got = by_client(out)
    for c, d in HONEST.items():
        want = -3.0 * d if c in MALICIOUS else d
        torch.testing.assert_close(got[c].delta, want)


def test_gaussian_replaces_the_update_with_seeded_noise():
    big = {"h": torch.zeros(20_000), "m": torch.full((20_000,), 5.0)}
    adv = AdversarialTransport(ListTransport(big), GaussianNoise(std=0.3), {"m"})
    first = by_client(adv.fit(torch.zeros(20_000), tasks_for(["h", "m"])))
    again = by_client(adv.fit(torch.zeros(20_000), tasks_for(["h", "m"])))
    noise = first["m"].delta
    torch.testing.assert_close(noise, again["m"].delta)  # same round seed, same noise
    assert abs(float(noise.mean())) < 0.01  # independent of the honest delta (5.0)
    assert float(noise.std()) == pytest.approx(0.3, rel=0.02)
    assert torch.equal(first["h"].delta, big["h"])
    other = by_client(adv.fit(torch.zeros(20_000), tasks_for(["h", "m"], round_num=2)))
    assert not torch.equal(other["m"].delta, noise)  # a new round draws new noise


def test_honest_rounds_and_data_only_attacks_keep_the_inner_sum():
    class Weighting:
        streaming = True

        def weight_of(self, u):
            return float(u.num_samples)

    # No malicious client selected: the inner transport may sum where it trains.
    inner = ListTransport(HONEST)
    adv = AdversarialTransport(inner, SignFlip(), MALICIOUS)
    w = Weighting()
    out = list(adv.fit(torch.zeros(3), tasks_for(["a", "b"]), w))
    assert inner.weightings == [w] and len(out) == 1 and adv.reported(1) == 0


def test_too_few_benign_updates_leave_the_attackers_honest():
    _, _, out = run_round(ALIE(), deltas={"a": HONEST["a"], "m1": HONEST["m1"]},
                          malicious={"m1"})
    torch.testing.assert_close(by_client(out)["m1"].delta, HONEST["m1"])


def test_malformed_benign_updates_do_not_enter_the_statistics():
    deltas = {**HONEST, "bad": torch.tensor([float("nan"), 0.0, 0.0])}
    _, _, out = run_round(IPM(epsilon=1.0), deltas=deltas)
    torch.testing.assert_close(by_client(out)["m1"].delta, (-BENIGN.mean(0)).float())


def test_attack_parameters_are_validated():
    for bad in (0, -1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ConfigError, match="scale"):
            SignFlip(scale=bad)
    with pytest.raises(ConfigError, match="std"):
        GaussianNoise(std=0)
    with pytest.raises(ConfigError, match="'z'"):
        ALIE(z=-1)
    with pytest.raises(ConfigError, match="epsilon"):
        IPM(epsilon=0)
    with pytest.raises(TypeError, match="Attack"):
        AdversarialTransport(ListTransport(HONEST), "alie", MALICIOUS)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not known"):
        AdversarialTransport(ListTransport(HONEST), ALIE(), {"zz"})


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 12), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_benign_stats_match_the_batch_mean_and_std(k, d, seed):
    x = torch.randn(k, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x * 10 ** (seed % 5)  # several magnitudes
    stats = BenignStats(d)
    for row in x:
        stats.add(row.float())
    xf = x.float().double()
    torch.testing.assert_close(stats.mean, xf.mean(0))
    torch.testing.assert_close(stats.std(), xf.std(0))


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 200), st.data())
def test_alie_z_max_is_the_normal_quantile_of_the_formula(n, data):
    m = data.draw(st.integers(1, n // 2))
    s = math.floor(n / 2 + 1) - m
    z = alie_z_max(n, m)
    assert 0 <= z < 10
    assert 0.5 * (1 + math.erf(z / math.sqrt(2))) == pytest.approx((n - s) / n, abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 9), st.integers(1, 4), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_omniscient_uploads_match_their_formulas_on_random_rounds(benign, malicious, d, seed):
    gen = torch.Generator().manual_seed(seed)
    deltas = {f"b{i}": torch.randn(d, generator=gen) for i in range(benign)}
    bad = {f"m{i}" for i in range(malicious)}
    deltas.update({c: torch.randn(d, generator=gen) * 100 for c in sorted(bad)})
    x = torch.stack([deltas[f"b{i}"] for i in range(benign)]).double()
    n = benign + malicious
    _, _, out = run_round(ALIE(), deltas=deltas, malicious=bad)
    want = x.mean(0) - alie_z_max(n, min(malicious, n // 2)) * x.std(0)
    _, _, out_ipm = run_round(IPM(epsilon=0.7), deltas=deltas, malicious=bad)
    for c in bad:
        torch.testing.assert_close(by_client(out)[c].delta, want.float())
        torch.testing.assert_close(by_client(out_ipm)[c].delta, (-0.7 * x.mean(0)).float())
