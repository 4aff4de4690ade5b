"""The Skellam RDP accountant: closed forms, the Gaussian limit, subsampling, composition."""

import itertools
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as rdp

from fedmosaic.privacy.skellam_accountant import (
    RDP_ORDERS,
    SkellamAccountant,
    SkellamRound,
    calibrate_skellam_mu,
    poisson_subsampled_rdp,
    skellam_epsilon,
    skellam_rdp,
)


def test_rdp_matches_the_closed_form_of_the_paper():
    # alpha * D2^2 / (2 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu))
    assert skellam_rdp(2, l1=1, l2=1, mu=1) == pytest.approx(1 + min(9 / 4, 1.5))
    assert skellam_rdp(3, l1=10, l2=2, mu=50) == pytest.approx(
        3 * 4 / 100 + min((5 * 4 + 60) / (4 * 2500), 30 / 100))
    with pytest.raises(ValueError, match="orders must be > 1"):
        skellam_rdp(1.0, 1, 1, 1)
    with pytest.raises(ValueError, match="mu"):
        skellam_rdp(2, 1, 1, 0)


def test_large_mu_approaches_the_gaussian_mechanism_with_sigma_squared_mu():
    l2, d = 1000.0, 10_000
    l1 = l2 * math.sqrt(d)
    orders = np.array(RDP_ORDERS, dtype=float)
    for mu in (1e8, 1e10):
        gauss = orders * l2 ** 2 / (2 * mu)
        rel = np.abs(skellam_rdp(orders, l1, l2, mu) / gauss - 1)
        assert rel.max() < (2e-2 if mu == 1e8 else 2e-4)
    # ... and so does epsilon: dp-accounting's Gaussian RDP on the same orders.
    mu = 1e10
    acc = rdp.RdpAccountant(list(RDP_ORDERS))
    acc.compose(dp_accounting.GaussianDpEvent(math.sqrt(mu) / l2), 50)
    gauss_eps = acc.get_epsilon(1e-5)
    assert skellam_epsilon(l1, l2, mu, 50, 1e-5) == pytest.approx(gauss_eps, rel=1e-3)
    assert skellam_epsilon(l1, l2, mu, 50, 1e-5) >= gauss_eps  # never below the Gaussian


def test_subsampling_bound_is_exact_at_order_two_and_never_below_the_tight_gaussian():
    """Zhu-Wang's general bound applied to the Gaussian: a valid upper bound on the exact
    Poisson-subsampled Gaussian RDP (dp-accounting), equal to it at alpha = 2."""
    for sigma in (0.8, 2.0):
        for q in (0.01, 0.1, 0.5):
            def eps(a, s=sigma):
                return np.asarray(a, dtype=float) / (2 * s * s)

            tight = rdp._compute_rdp_poisson_subsampled_gaussian(q, sigma, list(RDP_ORDERS))
            ours = np.array([poisson_subsampled_rdp(a, q, eps) for a in RDP_ORDERS])
            assert ours[0] == pytest.approx(tight[0], rel=1e-9)
            assert np.all(ours >= tight * (1 - 1e-9))
            assert np.all(ours <= np.array(RDP_ORDERS) / (2 * sigma ** 2) + 1e-12)
    # q = 1 is no amplification.
    assert poisson_subsampled_rdp(7, 1.0, lambda a: 0.3 * np.asarray(a)) == pytest.approx(2.1)


def test_epsilon_is_monotone_in_noise_rounds_and_sampling_rate():
    l2 = 100.0
    l1 = l2 * 30
    eps_mu = [skellam_epsilon(l1, l2, mu, 10, 1e-5) for mu in (1e4, 3e4, 1e5, 1e6)]
    assert all(a > b for a, b in itertools.pairwise(eps_mu))
    eps_t = [skellam_epsilon(l1, l2, 3e4, t, 1e-5) for t in (1, 5, 20, 100)]
    assert all(a < b for a, b in itertools.pairwise(eps_t))
    eps_q = [skellam_epsilon(l1, l2, 3e4, 100, 1e-5, q=q) for q in (0.01, 0.1, 0.5, 1.0)]
    assert all(a < b for a, b in itertools.pairwise(eps_q))


def test_rounds_compose_by_adding_rdp_and_state_round_trips():
    a = SkellamRound(l1=3000.0, l2=100.0, mu=2e4, q=0.1)
    b = SkellamRound(l1=3000.0, l2=100.0, mu=5e4, q=1.0)
    acc = SkellamAccountant()
    acc.record(a, 2)
    acc.record(b)
    acc.record(a, 3)
    assert acc.steps == 6
    assert np.allclose(acc.rdp(), 5 * a.rdp() + b.rdp())
    one = SkellamAccountant()
    one.record(a, 5)
    assert acc.epsilon(1e-5) > one.epsilon(1e-5)
    assert one.epsilon(1e-5, extra=[(b, 1)]) == pytest.approx(acc.epsilon(1e-5))
    again = SkellamAccountant()
    again.load_state_dict(acc.state_dict())
    assert again.epsilon(1e-5) == acc.epsilon(1e-5) and again.steps == 6
    assert SkellamAccountant().epsilon(1e-5) == 0.0


def test_calibration_finds_the_smallest_variance_for_the_target():
    l2 = 500.0
    l1 = l2 * 32
    mu = calibrate_skellam_mu(3.0, 1e-5, 20, l1=l1, l2=l2, q=0.2)
    assert skellam_epsilon(l1, l2, mu, 20, 1e-5, q=0.2) <= 3.0
    assert skellam_epsilon(l1, l2, mu * 0.99, 20, 1e-5, q=0.2) > 3.0
