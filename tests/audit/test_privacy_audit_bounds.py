"""The statistics of the empirical privacy audit: Steinke et al. 2023's one-run lower bound,
the guessing game and Andrew et al. 2024's Gaussian epsilon estimate."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedmosaic.audit.privacy_audit import (
    gaussian_pair_epsilon,
    guessing_game,
    steinke_lower_bound,
    steinke_p_value,
)


def test_p_value_without_delta_is_the_binomial_tail():
    # 10 guesses, all right: P[Bin(10, p) >= 10] = p^10 with p = e^eps / (1 + e^eps).
    assert steinke_p_value(10, 10, 10, 0.0, 0.0) == pytest.approx(0.5 ** 10)
    assert steinke_p_value(10, 10, 10, math.log(3), 0.0) == pytest.approx(0.75 ** 10)
    assert steinke_p_value(10, 10, 0, 1.0, 0.0) == 1.0


def test_p_value_delta_term_by_hand():
    # m=4, r=2, v=2, eps=0: tail 1/4; max_i P[2-i <= Bin(2, 1/2) < 2] / i = max(1/2, 3/8);
    # p = 1/4 + 2 * 4 * 0.01 * 1/2 = 0.29.
    assert steinke_p_value(4, 2, 2, 0.0, 0.01) == pytest.approx(0.29)


def test_lower_bound_by_hand():
    # 100 of 100 right, delta = 0: p^100 = 0.05 at the bound, so eps = logit(0.05^(1/100)).
    p = 0.05 ** (1 / 100)
    assert steinke_lower_bound(100, 100, 100, 0.0, 0.95) == pytest.approx(
        math.log(p / (1 - p)), abs=1e-5)
    # Half right is what a coin does: nothing is rejected.
    assert steinke_lower_bound(100, 100, 50, 0.0, 0.95) == 0.0


def test_lower_bound_rejects_bad_input():
    with pytest.raises(ValueError, match="v <= r <= m"):
        steinke_lower_bound(10, 20, 5, 0.0)
    with pytest.raises(ValueError, match="confidence"):
        steinke_lower_bound(10, 10, 5, 0.0, confidence=1.0)


@settings(max_examples=60, deadline=None)
@given(r=st.integers(1, 300), frac=st.floats(0.0, 1.0), delta=st.sampled_from([0.0, 1e-6, 1e-4]),
       extra=st.integers(0, 300))
def test_lower_bound_properties(r, frac, delta, extra):
    v = round(frac * r)
    m = r + extra
    bound = steinke_lower_bound(m, r, v, delta, 0.95)
    assert bound >= 0.0
    # Below the plug-in epsilon of the observed accuracy (a lower confidence limit).
    if 0 < v < r:
        assert bound <= max(0.0, math.log(v / (r - v))) + 1e-6
    # More correct guesses never lower it; more delta or more confidence never raise it.
    if v < r:
        assert steinke_lower_bound(m, r, v + 1, delta, 0.95) >= bound - 1e-6
    assert steinke_lower_bound(m, r, v, delta + 1e-3, 0.95) <= bound + 1e-6
    assert steinke_lower_bound(m, r, v, delta, 0.99) <= bound + 1e-6


@pytest.mark.parametrize("epsilon", [0.5, 2.0])
def test_bound_holds_on_randomized_response(epsilon):
    """An eps-DP randomized response over 200 canaries: the 95% lower bound exceeds the true
    epsilon in at most about 5% of 400 seeded games (Binomial(400, 0.05) exceeds 32 with
    probability below 0.1%)."""
    m, over = 200, 0
    keep = math.exp(epsilon) / (1 + math.exp(epsilon))
    for seed in range(400):
        rng = np.random.default_rng(seed)
        included = rng.random(m) < 0.5
        truthful = rng.random(m) < keep  # the mechanism's output: S_i with prob e^eps/(1+e^eps)
        released = np.where(truthful, included, ~included)
        game = guessing_game(released.astype(float) + 1e-3 * rng.random(m), included, 0.0,
                             guess_counts=[100])
        over += game.epsilon_lower_bound > epsilon
    assert over <= 32


def test_guessing_game_perfect_scores_and_bonferroni():
    rng = np.random.default_rng(0)
    included = rng.random(400) < 0.5
    scores = included + 0.01 * rng.random(400)
    game = guessing_game({"a": scores, "b": rng.random(400)}, included, 1e-6)
    assert game.score == "a" and game.correct == game.guesses
    assert game.tests == 2 * 12  # 6 counts x (in only, in and out) x 2 scores
    one = guessing_game(scores, included, 1e-6)
    assert one.tests == 12 and one.epsilon_lower_bound >= game.epsilon_lower_bound
    with pytest.raises(ValueError, match="one value per canary"):
        guessing_game(scores[:10], included, 0.0)


def _gdp_delta(epsilon: float, mu: float) -> float:
    """The privacy profile of mu-GDP (Dong, Roth and Su 2022, Corollary 2.13)."""
    return stats.norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * stats.norm.cdf(
        -epsilon / mu - mu / 2)


@pytest.mark.parametrize("mu", [0.3, 1.0, 3.0])
def test_gaussian_pair_epsilon_equal_variances_is_gdp(mu):
    eps = gaussian_pair_epsilon((0.0, 2.0), (2.0 * mu, 2.0), 1e-5)
    assert _gdp_delta(eps, mu) == pytest.approx(1e-5, rel=1e-4)
    assert gaussian_pair_epsilon((2.0 * mu, 2.0), (0.0, 2.0), 1e-5) == pytest.approx(eps)


def test_gaussian_pair_epsilon_edges():
    assert gaussian_pair_epsilon((0.0, 1.0), (0.0, 1.0), 1e-5) == 0.0
    # Unequal variances cost more than the mean shift alone.
    assert gaussian_pair_epsilon((0.0, 1.0), (1.0, 1.3), 1e-5) > gaussian_pair_epsilon(
        (0.0, 1.0), (1.0, 1.0), 1e-5)
    with pytest.raises(ValueError, match="standard deviations"):
        gaussian_pair_epsilon((0.0, 0.0), (1.0, 1.0), 1e-5)


def test_largest_lower_bound_is_what_perfect_guesses_give():
    from fedmosaic.audit.privacy_audit import largest_lower_bound

    rng = np.random.default_rng(1)
    included = rng.permutation(300) < 150  # exactly half: every guesser can be all right
    perfect = guessing_game({"x": included.astype(float), "y": rng.random(300)}, included, 1e-5)
    assert perfect.epsilon_lower_bound == pytest.approx(largest_lower_bound(300, 1e-5, scores=2))
    # The delta term 2 m delta caps it: with the audit's two scores, 5,000 canaries certify
    # no more than 2,000 at delta = 1e-5.
    assert largest_lower_bound(5000, 1e-5, scores=2) < largest_lower_bound(2000, 1e-5,
                                                                             scores=2)
    assert largest_lower_bound(5000, 1e-7, scores=2) > largest_lower_bound(2000, 1e-7,
                                                                             scores=2)
