"""The distributed Skellam mechanism: encoding, decoding, noise, sensitivities, modular clipping."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedmosaic.privacy.skellam import (
    SkellamMechanism,
    fwht,
    max_gamma,
    padded_dim,
    rounded_l2_bound,
    skellam_tail,
)


def _mech(**kw):
    args = dict(dim=300, clip=1.0, gamma=2.0 ** 12, mu=(2.0 ** 12 * 0.5) ** 2,
                min_contributors=4, max_clients=8, bits=32)
    args.update(kw)
    return SkellamMechanism(**args)


def _clipped(x, c):
    n = np.linalg.norm(x)
    return x if n <= c else x * (c / n)


def test_hadamard_rotation_is_orthonormal_and_inverted_by_the_server():
    rng = np.random.default_rng(0)
    x = rng.normal(size=256)
    assert np.allclose(fwht(fwht(x)), x)
    assert np.linalg.norm(fwht(x)) == pytest.approx(np.linalg.norm(x))
    m = _mech()
    v = rng.normal(size=300)
    y = m.rotate(v, round_num=3)
    assert y.shape == (512,) and padded_dim(300) == 512
    assert np.allclose(m.unrotate(y, 3), v)
    assert not np.allclose(m.unrotate(y, 4), v)  # fresh public signs every round
    # The rotation flattens a spike: no coordinate keeps much more than its share of energy.
    spike = np.zeros(300)
    spike[7] = 1.0
    assert np.abs(m.rotate(spike, 1)).max() == pytest.approx(1 / math.sqrt(512))


def test_the_sum_of_clients_encodings_decodes_to_the_true_sum_within_rounding_and_noise():
    n = 8
    m = _mech()
    rng = np.random.default_rng(1)
    xs = rng.normal(size=(n, 300)) * 0.1
    xs[0] *= 100  # one update far outside the clip
    total = np.zeros(m.encoded_dim, dtype=np.uint32)
    for x in xs:
        total += m.encode(x, rng, round_num=5)  # uint32 wrap-around is the ring's sum
    decoded = m.decode(total, 5)
    truth = sum(_clipped(x, m.clip) for x in xs)
    err = decoded - truth
    # Noise: n shares of Sk(mu/m), per coordinate variance n*mu/m/gamma^2 after the
    # (orthonormal) inverse rotation; rounding: < 1 level per client per rotated coordinate.
    noise_std = math.sqrt(n * m.share_mu) / m.gamma
    rounding_l2 = n * math.sqrt(m.encoded_dim) / m.gamma
    assert np.std(err) == pytest.approx(noise_std, rel=0.15)
    assert abs(np.mean(err)) < 4 * noise_std / math.sqrt(300) + rounding_l2 / math.sqrt(300)
    # Without noise the decoding error is only the rounding.
    exact = sum(m.round_to_integers(x, rng, 5) for x in xs)
    no_noise = m.unrotate(exact / m.gamma, 5)
    assert np.linalg.norm(no_noise - truth) <= rounding_l2


def test_shares_of_n_clients_sum_to_exactly_skellam_mu():
    """Sk(mu/n) + ... + Sk(mu/n) = Sk(mu): compare the empirical law with the exact pmf."""
    mu, n = 3.0, 5
    m = SkellamMechanism(dim=1, clip=1.0, gamma=1.0, mu=mu, min_contributors=n, max_clients=n,
                         bits=32, rotation=False)
    rng = np.random.default_rng(2)
    draws = 40_000
    total = np.zeros(draws, dtype=np.int64)
    for _ in range(n):
        total += np.concatenate([m.noise_share(rng) for _ in range(draws)])
    assert total.var() == pytest.approx(mu, rel=0.03)
    values, counts = np.unique(total, return_counts=True)
    exact = stats.skellam.pmf(values, mu / 2, mu / 2)
    tv = 0.5 * (np.abs(counts / draws - exact).sum() + (1 - exact.sum()))
    assert tv < 0.015
    # The check has power: the law of Sk(2 mu) is far from the draws.
    wrong = stats.skellam.pmf(values, mu, mu)
    assert 0.5 * np.abs(counts / draws - wrong).sum() > 0.05


def test_skellam_tail_bound_holds_empirically():
    rng = np.random.default_rng(3)
    v = 50.0
    z = rng.poisson(v / 2, 200_000) - rng.poisson(v / 2, 200_000)
    for b in (10, 20, 30, 40):
        assert np.mean(np.abs(z) >= b) <= skellam_tail(b, v)
    assert skellam_tail(40, v) < 1e-4


@pytest.mark.parametrize("rotation", [True, False])
def test_one_clients_rounded_vector_is_within_the_sensitivities_the_accountant_uses(rotation):
    """Adding one (adversarial, clipped) client moves the pre-noise integer sum by its own
    rounded vector: its L2 and L1 norms must stay within Delta_2 and Delta_1."""
    d = 256
    # gamma * clip = 8 with d = 256: a flat vector sits exactly at the half-levels (the
    # rounding's worst case), where one plain draw exceeds the conditional bound often.
    m = SkellamMechanism(dim=d, clip=1.0, gamma=8.0, mu=100.0, min_contributors=1,
                         max_clients=1, bits=32, rotation=rotation)
    assert m.l2_sensitivity == pytest.approx(12.0)  # sqrt(64 + 64 + 1 * (8 + 8))
    assert m.l1_sensitivity == pytest.approx(12.0 * 12.0)
    rng = np.random.default_rng(4)
    flat = np.full(d, 1 / 16)
    spike = np.zeros(d)
    spike[0] = 1e6
    adversarial = [flat, -flat, spike, rng.normal(size=d) * 1e3, np.full(d, 1e9),
                   np.sign(rng.normal(size=d)) / 16]
    others = [m.round_to_integers(rng.normal(size=d) * 0.05, rng, 1) for _ in range(3)]
    base = np.sum(others, axis=0)
    for x in adversarial:
        for _ in range(50):
            mine = m.round_to_integers(x, rng, 1)
            moved = (base + mine) - base
            assert np.linalg.norm(moved) <= m.l2_sensitivity + 1e-9
            assert np.abs(moved).sum() <= m.l1_sensitivity + 1e-9
    # The conditional bound is what makes Delta_2 = 12 rather than 8 + 16 = 24: plain
    # rounding of the flat vector exceeds 12 about half the time.
    plain = [np.linalg.norm((rng.random(d) < 0.5).astype(float)) for _ in range(200)]
    assert max(plain) > m.l2_sensitivity
    assert rounded_l2_bound(8.0, 256, 0.0) == pytest.approx(24.0)


def test_configurations_whose_sum_could_wrap_are_refused():
    # Without the rotation, 1000 clients at ~2^12 levels each cannot fit in 16 bits.
    with pytest.raises(ValueError, match=r"modular clipping.*wrap around mod 2\^16"):
        SkellamMechanism(dim=100, clip=1.0, gamma=2.0 ** 12, mu=100.0, min_contributors=10,
                         max_clients=1000, bits=16, rotation=False)
    # The largest safe gamma is accepted, 1.5 times it is refused.
    g = max_gamma(1000, 1.0, 0.25, 20, 50, 10)
    ok = SkellamMechanism(dim=1000, clip=1.0, gamma=g, mu=g * g * 0.25, min_contributors=10,
                          max_clients=50, bits=20)
    assert ok.wrap_probability() <= 1e-9
    with pytest.raises(ValueError, match="largest safe gamma"):
        SkellamMechanism(dim=1000, clip=1.0, gamma=1.5 * g, mu=(1.5 * g) ** 2 * 0.25,
                         min_contributors=10, max_clients=50, bits=20)
    # Rotation buys room: without it the signal bound is n * Delta_2 and gamma must shrink.
    assert max_gamma(1000, 1.0, 0.25, 20, 50, 10, rotation=False) < g / 2


def test_a_sum_at_the_largest_safe_gamma_does_not_wrap():
    n, d = 50, 1000
    g = max_gamma(d, 1.0, 0.25, 20, n, 10)
    m = SkellamMechanism(dim=d, clip=1.0, gamma=g, mu=g * g * 0.25, min_contributors=10,
                         max_clients=n, bits=20)
    rng = np.random.default_rng(5)
    # All clients send the same full-norm vector: the sum's norm is n * clip, the worst case.
    x = np.ones(d) / math.sqrt(d)
    total = np.zeros(m.encoded_dim, dtype=np.uint32)
    for _ in range(n):
        total = (total + m.encode(x, rng, 2)) & np.uint32((1 << 20) - 1)
    decoded = m.decode(total, 2)
    noise_std = math.sqrt(n * m.share_mu) / g
    assert np.abs(decoded - n * x).max() < 6 * noise_std + n * math.sqrt(m.encoded_dim) / g


def test_bad_inputs_are_refused_with_the_reason():
    m = _mech()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="expected a vector of 300"):
        m.encode(np.zeros(10), rng, 1)
    with pytest.raises(ValueError, match="NaN"):
        m.encode(np.full(300, np.nan), rng, 1)
    with pytest.raises(ValueError, match="max_clients"):
        _mech(min_contributors=9, max_clients=8)
    with pytest.raises(ValueError, match="beta"):
        _mech(beta=1.0)
    with pytest.raises(ValueError, match="sum of 512"):
        m.decode(np.zeros(300, dtype=np.uint32), 1)


@settings(max_examples=40, deadline=None)
@given(dim=st.integers(1, 200), n=st.integers(1, 6), rotation=st.booleans(),
       scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2 ** 32 - 1))
def test_noise_free_sums_decode_within_the_rounding_bound(dim, n, rotation, scale, seed):
    """Any clients, any dimension: every rounded vector is within Delta_2 and the decoded
    noise-free sum is the clipped sum up to n * sqrt(d') / gamma in L2."""
    m = SkellamMechanism(dim=dim, clip=1.0, gamma=64.0, mu=1.0, min_contributors=1,
                         max_clients=n, bits=32, rotation=rotation)
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(n, dim)) * scale
    rounded = [m.round_to_integers(x, rng, seed % 7) for x in xs]
    for r in rounded:
        assert np.linalg.norm(r) <= m.l2_sensitivity + 1e-9
    decoded = m.unrotate(np.sum(rounded, axis=0) / m.gamma, seed % 7)
    truth = sum(_clipped(x, 1.0) for x in xs)
    assert np.linalg.norm(decoded - truth) <= n * math.sqrt(m.encoded_dim) / m.gamma + 1e-9


def test_the_wrap_bound_is_above_the_observed_wrap_frequency():
    """A configuration allowed a wrap probability of 0.3: sums of n full-norm vectors wrap
    less often than that; with gamma three times larger they do wrap (the check has power)."""
    n, d, bits = 4, 64, 12
    limit = (1 << (bits - 1)) - 1

    def wrap_rate(m, trials=300):
        rng = np.random.default_rng(9)
        wraps = 0
        for t in range(trials):
            total = np.zeros(m.encoded_dim, dtype=np.int64)
            for _ in range(n):
                x = rng.normal(size=d)
                total += m.round_to_integers(x / np.linalg.norm(x), rng, t)
                total += m.noise_share(rng)
            wraps += bool(np.abs(total).max() > limit)
        return wraps / trials

    g = max_gamma(d, 1.0, 0.01, bits, n, n, max_wrap_probability=0.3)
    m = SkellamMechanism(dim=d, clip=1.0, gamma=g, mu=g * g * 0.01, min_contributors=n,
                         max_clients=n, bits=bits, max_wrap_probability=0.3)
    assert wrap_rate(m) <= m.wrap_probability() <= 0.3
    # (A 12-bit mechanism at 3 gamma is refused; encode in 16 bits, count 12-bit wraps.)
    big = SkellamMechanism(dim=d, clip=1.0, gamma=3 * g, mu=9 * g * g * 0.01,
                           min_contributors=n, max_clients=n, bits=16)
    assert wrap_rate(big) > 0.05
