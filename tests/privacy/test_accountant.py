"""Tests for fedmosaic.privacy.accountant: reference values, validation, checkpoints,
calibration, the budget check, and monotonicity properties."""

import json
import math
import subprocess
import sys

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedmosaic.privacy.accountant import (
    PrivacyAccountant,
    PrivacyBudget,
    UnsupportedAccountingError,
    calibrate_noise_multiplier,
    epsilon_for,
)

MNIST_Q = 256 / 60000
PROPS = settings(max_examples=10, deadline=None, derandomize=True)

noise = st.floats(0.6, 4.0)
rates = st.floats(0.002, 0.3)
small_steps = st.integers(1, 300)


# -- reference values -------------------------------------------------------------------------


def test_reference_rdp_mnist_dpsgd():
    # Abadi et al. 2016 setting: q = 256/60000, sigma = 1.1, 60 epochs, delta = 1e-5.
    eps = epsilon_for(1.1, 14062, "poisson", MNIST_Q, delta=1e-5)
    assert eps == pytest.approx(2.597, rel=2e-3)


def test_reference_rdp_second_setting():
    eps = epsilon_for(1.3, 6000, "poisson", 150 / 60000, delta=1e-5)
    assert eps == pytest.approx(0.72422, rel=2e-3)


def test_reference_pld_mnist_dpsgd():
    # dp-accounting's default discretisation (1e-4) is within 0.1% of 2.38.
    eps = epsilon_for(1.1, 14062, "poisson", MNIST_Q, delta=1e-5, accountant="pld")
    assert eps == pytest.approx(2.38, rel=2e-3)


def test_matches_dp_accounting_directly():
    event = dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.0))
    laplace = dp_accounting.LaplaceDpEvent(3.0)
    ours = PrivacyAccountant()
    ours.record_gaussian_round(1.0, "poisson", 0.01, count=50)
    ours.record_laplace(3.0, count=2)
    ours.record_gaussian_round(1.0, "poisson", 0.01, count=50)
    theirs = RdpAccountant().compose(event, 100).compose(laplace, 2)
    assert ours.epsilon(1e-6) == pytest.approx(theirs.get_epsilon(1e-6), rel=1e-12)
    assert ours.delta(2.0) == pytest.approx(theirs.get_delta(2.0), rel=1e-9)

    ours_pld = PrivacyAccountant("pld")
    ours_pld.record_gaussian_round(1.0, "poisson", 0.01, count=100)
    theirs_pld = PLDAccountant().compose(event, 100)
    assert ours_pld.epsilon(1e-6) == pytest.approx(theirs_pld.get_epsilon(1e-6), rel=1e-9)


def test_pld_is_tighter_than_rdp():
    args = (1.0, 200, "poisson", 0.02)
    assert epsilon_for(*args, delta=1e-5, accountant="pld") < epsilon_for(*args, delta=1e-5)


def test_full_participation_equals_rate_one():
    assert epsilon_for(2.0, 10, "none", delta=1e-5) == pytest.approx(
        epsilon_for(2.0, 10, "poisson", 1.0, delta=1e-5), rel=1e-12)


def test_gaussian_without_sampling_pld_is_tight():
    # Composing k Gaussians with multiplier z is one Gaussian with multiplier z/sqrt(k):
    # PLD handles it exactly (up to discretisation), for either relation.
    for neighboring in ("add_remove", "replace_one"):
        a = epsilon_for(4.0, 16, "none", delta=1e-5, accountant="pld", neighboring=neighboring)
        b = epsilon_for(1.0, 1, "none", delta=1e-5, accountant="pld", neighboring=neighboring)
        assert a == pytest.approx(b, rel=1e-3)


# -- supported and unsupported combinations ----------------------------------------------------


def test_fixed_size_sampling_with_rdp_replace_one():
    acc = PrivacyAccountant("rdp", "replace_one")
    acc.record_gaussian_round(1.0, "fixed", population=1000, sample_size=10, count=20)
    eps = acc.epsilon(1e-5)
    assert 0 < eps < math.inf
    # Sampling without replacement at rate 1 is full participation.
    full = epsilon_for(1.0, 20, "fixed", population=10, sample_size=10, delta=1e-5,
                       neighboring="replace_one")
    assert full == pytest.approx(epsilon_for(1.0, 20, "none", delta=1e-5,
                                             neighboring="replace_one"), rel=1e-9)
    assert eps < full


@pytest.mark.parametrize(
    ("accountant", "neighboring", "kwargs"),
    [
        ("rdp", "add_remove", {"sampling": "fixed", "population": 100, "sample_size": 5}),
        ("pld", "add_remove", {"sampling": "fixed", "population": 100, "sample_size": 5}),
        ("pld", "replace_one", {"sampling": "fixed", "population": 100, "sample_size": 5}),
        ("rdp", "replace_one", {"sampling": "poisson", "rate": 0.1}),
    ],
)
def test_unsupported_gaussian_combinations(accountant, neighboring, kwargs):
    acc = PrivacyAccountant(accountant, neighboring)
    with pytest.raises(UnsupportedAccountingError) as info:
        acc.record_gaussian_round(1.0, **kwargs)
    message = str(info.value)
    assert repr(accountant) in message and repr(neighboring) in message
    assert acc.steps == 0
    with pytest.raises(UnsupportedAccountingError):
        epsilon_for(1.0, 5, delta=1e-5, accountant=accountant, neighboring=neighboring,
                    **kwargs)


def test_pld_poisson_replace_one_supported():
    acc = PrivacyAccountant("pld", "replace_one")
    acc.record_gaussian_round(1.0, "poisson", 0.05, count=10)
    assert 0 < acc.epsilon(1e-5) < math.inf


def test_laplace():
    pld = PrivacyAccountant("pld")
    pld.record_laplace(2.0)
    # One release with scale/sensitivity 2 is pure 0.5-DP; PLD recovers that.
    assert pld.epsilon(1e-9) == pytest.approx(0.5, abs=1e-3)
    pld.record_laplace(2.0, count=3)
    assert pld.epsilon(1e-9) <= 2.0 + 1e-3
    assert pld.laplace_releases == 4 and pld.steps == 0

    rdp = PrivacyAccountant("rdp", "replace_one")
    rdp.record_laplace(2.0, count=4)
    assert pld.epsilon(1e-9) <= rdp.epsilon(1e-9) < math.inf

    with pytest.raises(UnsupportedAccountingError, match="Laplace"):
        PrivacyAccountant("pld", "replace_one").record_laplace(1.0)


# -- validation -------------------------------------------------------------------------------


def test_constructor_validation_names_allowed_values():
    with pytest.raises(ValueError, match="'rdp', 'pld'"):
        PrivacyAccountant("moments")
    with pytest.raises(ValueError, match="'add_remove', 'replace_one'"):
        PrivacyAccountant("rdp", "replace_special")


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((0.0, "poisson", 0.1), {}, "noise_multiplier"),
        ((-1.0, "poisson", 0.1), {}, "noise_multiplier"),
        ((math.nan, "poisson", 0.1), {}, "noise_multiplier"),
        ((math.inf, "poisson", 0.1), {}, "noise_multiplier"),
        ((1.0, "uniform", 0.1), {}, "'poisson', 'fixed', 'none'"),
        ((1.0, "poisson"), {}, "rate"),
        ((1.0, "poisson", 0.0), {}, "rate"),
        ((1.0, "poisson", 1.5), {}, "rate"),
        ((1.0, "poisson", 0.1), {"population": 10}, "fixed"),
        ((1.0, "fixed", 0.1), {"population": 10, "sample_size": 2}, "rate"),
        ((1.0, "fixed"), {"population": 10}, "sample_size"),
        ((1.0, "fixed"), {"population": 10, "sample_size": 11}, "exceed"),
        ((1.0, "fixed"), {"population": 10, "sample_size": 0}, "sample_size"),
        ((1.0, "none", 0.5), {}, "none"),
        ((1.0, "poisson", 0.1), {"count": 0}, "count"),
        ((1.0, "poisson", 0.1), {"count": 2.0}, "count"),
    ],
)
def test_record_validation(args, kwargs, match):
    acc = PrivacyAccountant("rdp", "replace_one" if "fixed" in args else "add_remove")
    with pytest.raises(ValueError, match=match):
        acc.record_gaussian_round(*args, **kwargs)
    assert acc.steps == 0


def test_query_validation_and_empty_accountant():
    acc = PrivacyAccountant()
    assert acc.epsilon(1e-5) == 0.0 and acc.delta(1.0) == 0.0 and acc.steps == 0
    for bad in (0.0, 1.0, -0.1, math.nan):
        with pytest.raises(ValueError, match="delta"):
            acc.epsilon(bad)
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="epsilon"):
            acc.delta(bad)
    with pytest.raises(ValueError, match="scale_over_sensitivity"):
        acc.record_laplace(0.0)


# -- bookkeeping, describe, checkpoints -------------------------------------------------------


def test_counts_merge_and_describe():
    one_by_one = PrivacyAccountant()
    for _ in range(30):
        one_by_one.record_gaussian_round(1.2, "poisson", 0.05)
    at_once = PrivacyAccountant()
    at_once.record_gaussian_round(1.2, "poisson", 0.05, count=30)
    assert one_by_one.epsilon(1e-5) == at_once.epsilon(1e-5)
    assert one_by_one.state_dict() == at_once.state_dict()

    at_once.record_gaussian_round(0.9, "poisson", 0.1, count=5)
    at_once.record_laplace(10.0)
    info = at_once.describe()
    assert info == {
        "accountant": "rdp", "neighboring": "add_remove", "conversion": "improved",
        "orders": "dp_accounting", "rounds": 35,
        "sampling": ["poisson"], "sampling_rates": [0.05, 0.1],
        "noise_multipliers": [0.9, 1.2], "laplace_releases": 1, "laplace_scales": [10.0],
    }
    json.dumps(info)
    assert at_once.steps == 35
    assert isinstance(at_once.as_dp_event(), dp_accounting.ComposedDpEvent)


def test_epsilon_independent_of_query_timing():
    queried = PrivacyAccountant("pld")
    for _ in range(2):
        queried.record_gaussian_round(1.0, "poisson", 0.05, count=5)
        queried.epsilon(1e-5)
    quiet = PrivacyAccountant("pld")
    quiet.record_gaussian_round(1.0, "poisson", 0.05, count=10)
    assert queried.epsilon(1e-5) == quiet.epsilon(1e-5)


@pytest.mark.parametrize(("accountant", "neighboring"),
                         [("rdp", "add_remove"), ("rdp", "replace_one"), ("pld", "add_remove")])
def test_state_dict_round_trip_is_exact(accountant, neighboring):
    acc = PrivacyAccountant(accountant, neighboring)
    if neighboring == "replace_one":
        acc.record_gaussian_round(1.1, "fixed", population=500, sample_size=20, count=7)
    else:
        acc.record_gaussian_round(1.1, "poisson", 0.04, count=7)
    acc.record_gaussian_round(2.0, "none", count=3)
    acc.record_laplace(5.0, count=2)
    acc.record_gaussian_round(2.0, "none")
    before = acc.epsilon(1e-5), acc.delta(1.5)

    state = json.loads(json.dumps(acc.state_dict()))
    restored = PrivacyAccountant.from_state_dict(state)
    assert (restored.epsilon(1e-5), restored.delta(1.5)) == before
    assert restored.state_dict() == acc.state_dict()
    assert restored.describe() == acc.describe()

    other = PrivacyAccountant(accountant, neighboring)
    other.record_gaussian_round(3.0, "none")
    other.load_state_dict(state)
    assert other.epsilon(1e-5) == before[0]


def test_load_state_dict_rejects_bad_state_and_keeps_history():
    acc = PrivacyAccountant()
    acc.record_gaussian_round(1.0, "poisson", 0.1, count=3)
    state = acc.state_dict()
    eps = acc.epsilon(1e-5)
    with pytest.raises(ValueError, match="accountant"):
        PrivacyAccountant("pld").load_state_dict(state)
    with pytest.raises(ValueError, match="neighboring"):
        PrivacyAccountant("rdp", "replace_one").load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        acc.load_state_dict({**state, "version": 99})
    broken = {**state, "events": [*state["events"], {**state["events"][0], "noise": -1.0}]}
    with pytest.raises(ValueError, match="noise_multiplier"):
        acc.load_state_dict(broken)
    assert acc.epsilon(1e-5) == eps and acc.steps == 3


# -- calibration ------------------------------------------------------------------------------


def test_calibrate_recovers_reference_noise():
    z = calibrate_noise_multiplier(2.5966, 1e-5, 14062, "poisson", MNIST_Q)
    assert z == pytest.approx(1.1, rel=0.011)
    assert epsilon_for(z, 14062, "poisson", MNIST_Q, delta=1e-5) <= 2.5966


def test_calibrate_fixed_sampling_and_errors():
    kwargs = {"population": 200, "sample_size": 20, "neighboring": "replace_one"}
    z = calibrate_noise_multiplier(3.0, 1e-5, 20, "fixed", **kwargs, tolerance=0.05)
    assert epsilon_for(z, 20, "fixed", delta=1e-5, **kwargs) <= 3.0
    assert epsilon_for(z / 1.05, 20, "fixed", delta=1e-5, **kwargs) > 3.0

    with pytest.raises(ValueError, match="not met"):
        calibrate_noise_multiplier(1e-6, 1e-5, 1000, "none")
    with pytest.raises(ValueError, match="tolerance"):
        calibrate_noise_multiplier(1.0, 1e-5, 10, "none", tolerance=0.0)
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise_multiplier(-1.0, 1e-5, 10, "none")
    with pytest.raises(ValueError, match="steps"):
        calibrate_noise_multiplier(1.0, 1e-5, 0, "none")
    with pytest.raises(UnsupportedAccountingError):
        calibrate_noise_multiplier(1.0, 1e-5, 10, "fixed", population=10, sample_size=2)


# -- budget -----------------------------------------------------------------------------------


def test_budget_validation():
    for eps, delta in ((0.0, 1e-5), (-1.0, 1e-5), (math.inf, 1e-5), (1.0, 0.0), (1.0, 1.0)):
        with pytest.raises(ValueError):
            PrivacyBudget(eps, delta)


def test_budget_stops_at_the_right_round():
    budget = PrivacyBudget(1.0, 1e-5)
    acc = PrivacyAccountant()
    assert budget.would_exceed(acc, 1.0, "poisson", 0.05)  # one round already costs 1.6
    rounds = 0
    while not budget.would_exceed(acc, 1.5, "poisson", 0.02):
        acc.record_gaussian_round(1.5, "poisson", 0.02)
        rounds += 1
        assert rounds < 10_000
    assert 100 < rounds < 500
    assert not budget.is_exceeded(acc) and budget.remaining(acc) >= 0
    assert epsilon_for(1.5, rounds, "poisson", 0.02, delta=1e-5) <= 1.0
    assert epsilon_for(1.5, rounds + 1, "poisson", 0.02, delta=1e-5) > 1.0
    acc.record_gaussian_round(1.5, "poisson", 0.02)
    assert budget.is_exceeded(acc) and budget.spent(acc) > 1.0


def test_budget_check_does_not_mutate_pld():
    acc = PrivacyAccountant("pld")
    acc.record_gaussian_round(1.0, "poisson", 0.05, count=10)
    state, eps = acc.state_dict(), acc.epsilon(1e-5)
    assert PrivacyBudget(eps * 1.0001, 1e-5).would_exceed(acc, 1.0, "poisson", 0.05)
    assert acc.state_dict() == state and acc.epsilon(1e-5) == eps


# -- properties -------------------------------------------------------------------------------


@PROPS
@given(z=noise, q=rates, steps=small_steps, extra=st.integers(1, 300))
def test_epsilon_grows_with_steps(z, q, steps, extra):
    a = epsilon_for(z, steps, "poisson", q, delta=1e-5)
    b = epsilon_for(z, steps + extra, "poisson", q, delta=1e-5)
    assert b >= a
    if a > 0:
        assert b > a


@PROPS
@given(z=noise, q=rates, steps=small_steps, factor=st.floats(1.1, 3.0))
def test_epsilon_grows_with_rate(z, q, steps, factor):
    a = epsilon_for(z, steps, "poisson", q, delta=1e-5)
    b = epsilon_for(z, steps, "poisson", min(1.0, q * factor), delta=1e-5)
    assert b >= a
    if a > 0:
        assert b > a


@PROPS
@given(z=noise, q=rates, steps=small_steps, factor=st.floats(1.1, 3.0))
def test_epsilon_falls_with_noise(z, q, steps, factor):
    a = epsilon_for(z, steps, "poisson", q, delta=1e-5)
    b = epsilon_for(z * factor, steps, "poisson", q, delta=1e-5)
    assert b <= a
    if b > 0:
        assert b < a


@PROPS
@given(z=noise, q=rates, steps=small_steps, log_delta=st.floats(-9.0, -3.0))
def test_delta_of_epsilon_round_trip_rdp(z, q, steps, log_delta):
    acc = PrivacyAccountant()
    acc.record_gaussian_round(z, "poisson", q, count=steps)
    d = 10.0**log_delta
    eps = acc.epsilon(d)
    assume(eps > 0)
    assert acc.delta(eps) == pytest.approx(d, rel=1e-6)


@settings(max_examples=4, deadline=None, derandomize=True)
@given(z=st.floats(0.8, 3.0), steps=st.integers(1, 50), log_delta=st.floats(-8.0, -4.0))
def test_delta_of_epsilon_round_trip_pld(z, steps, log_delta):
    acc = PrivacyAccountant("pld")
    acc.record_gaussian_round(z, "poisson", 0.05, count=steps)
    d = 10.0**log_delta
    eps = acc.epsilon(d)
    assume(eps > 0)
    back = acc.delta(eps)
    assert back <= d * (1 + 1e-9)
    assert back == pytest.approx(d, rel=0.05)


@settings(max_examples=5, deadline=None, derandomize=True)
@given(target=st.floats(0.5, 8.0), q=st.floats(0.005, 0.2), steps=st.integers(1, 200))
def test_calibration_is_tight(target, q, steps):
    z = calibrate_noise_multiplier(target, 1e-5, steps, "poisson", q)
    assume(z > 1e-3)
    assert epsilon_for(z, steps, "poisson", q, delta=1e-5) <= target
    assert epsilon_for(z / 1.01, steps, "poisson", q, delta=1e-5) > target


history = st.lists(
    st.one_of(
        st.tuples(st.just("poisson"), noise, rates, st.integers(1, 50)),
        st.tuples(st.just("none"), noise, st.none(), st.integers(1, 5)),
        st.tuples(st.just("laplace"), st.floats(0.5, 20.0), st.none(), st.integers(1, 3)),
    ),
    min_size=1, max_size=6,
)


def _replay(acc, events):
    for kind, scale, q, count in events:
        if kind == "laplace":
            acc.record_laplace(scale, count=count)
        else:
            acc.record_gaussian_round(scale, kind, q, count=count)


@PROPS
@given(events=history, next_z=noise, next_q=rates, budget_eps=st.floats(0.1, 20.0))
def test_round_trip_and_budget_do_not_change_numbers(events, next_z, next_q, budget_eps):
    acc = PrivacyAccountant()
    _replay(acc, events)
    eps = acc.epsilon(1e-5)
    state = acc.state_dict()

    restored = PrivacyAccountant.from_state_dict(json.loads(json.dumps(state)))
    assert restored.epsilon(1e-5) == eps
    assert restored.steps == acc.steps == sum(c for k, _, _, c in events if k != "laplace")

    budget = PrivacyBudget(budget_eps, 1e-5)
    verdict = budget.would_exceed(acc, next_z, "poisson", next_q)
    assert acc.state_dict() == state and acc.epsilon(1e-5) == eps
    restored.record_gaussian_round(next_z, "poisson", next_q)
    assert verdict == (restored.epsilon(1e-5) > budget_eps)


def test_default_order_grid_is_dp_accountings_and_the_import_is_lazy() -> None:
    from dp_accounting.rdp import rdp_privacy_accountant

    from fedmosaic.privacy.accountant import ORDER_GRIDS

    expected = tuple(float(a) for a in rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
    assert ORDER_GRIDS["dp_accounting"] == expected
    # A client process pays for dp-accounting (and scipy.signal) only when it accounts.
    code = ("import sys, fedmosaic.net.client; "
            "assert 'dp_accounting' not in sys.modules, 'dp_accounting imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
