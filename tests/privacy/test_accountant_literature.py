"""The accountant's options for reproducing published figures: the classic RDP-to-(epsilon,
delta) conversion, named and custom grids of RDP orders, and ``report`` (RDP with both
conversions next to PLD)."""

import json
import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmosaic.privacy.accountant import (
    ORDER_GRIDS,
    PrivacyAccountant,
    calibrate_noise_multiplier,
    epsilon_for,
)

MNIST_Q = 256 / 60000
MNIST_STEPS = 60 * 60000 // 256  # 14,062: TF-Privacy's steps for 60 epochs

# McMahan, Ramage, Talwar and Zhang 2018 ("Learning Differentially Private Recurrent Language
# Models", ICLR), Table 1: epsilon after 10^0 .. 10^6 rounds for K users, C expected users
# per round (Poisson, q = C / K), noise z = 1, delta = K**-1.1. Four of the table's six rows.
MCMAHAN_TABLE_1 = {
    (10**5, 10**2): (0.97, 0.98, 1.00, 1.07, 1.18, 2.21, 7.50),
    (10**6, 10**1): (0.68, 0.69, 0.69, 0.69, 0.69, 0.72, 0.73),
    (10**6, 10**3): (1.17, 1.17, 1.20, 1.28, 1.39, 2.44, 8.13),
    (10**6, 10**4): (1.73, 1.92, 2.08, 3.06, 8.49, 32.38, 187.01),
}


def _mcmahan(users, per_round, rounds, **options):
    return epsilon_for(1.0, rounds, "poisson", per_round / users, delta=users**-1.1, **options)


# -- published figures --------------------------------------------------------------------------


def test_tf_privacy_mnist_3_01_needs_the_classic_conversion():
    # TF-Privacy's README/tutorial: N = 60,000, batch 256, z = 1.1, 60 epochs -> eps = 3.01.
    classic = epsilon_for(1.1, MNIST_STEPS, "poisson", MNIST_Q, delta=1e-5,
                          conversion="classic", orders="tf_privacy")
    assert round(classic, 2) == 3.01
    # The classic bound at dp-accounting's grid gives the same figure ...
    assert round(epsilon_for(1.1, MNIST_STEPS, "poisson", MNIST_Q, delta=1e-5,
                             conversion="classic"), 2) == 3.01
    # ... and today's conversion is tighter (2.597), so it cannot reproduce it.
    improved = epsilon_for(1.1, MNIST_STEPS, "poisson", MNIST_Q, delta=1e-5,
                           orders="tf_privacy")
    assert improved == pytest.approx(2.597, abs=1e-3)


@pytest.mark.parametrize(("users", "per_round"), list(MCMAHAN_TABLE_1))
def test_mcmahan_2018_table_1_row(users, per_round):
    published = MCMAHAN_TABLE_1[users, per_round]
    classic = [_mcmahan(users, per_round, 10**e, conversion="classic",
                        orders="moments_accountant") for e in range(7)]
    assert [round(e, 2) for e in classic] == list(published)
    # The improved conversion is below every published cell: the table used the classic one.
    improved = [_mcmahan(users, per_round, 10**e, orders="moments_accountant")
                for e in range(7)]
    assert all(round(i, 2) < p for i, p in zip(improved, published))


def test_mcmahan_table_needs_integer_orders():
    # The moments accountant has integer orders only; fractional orders below 2 lower the
    # 10^6-round cell of the K = 10^6, C = 10^4 row from the published 187.01.
    cell = _mcmahan(10**6, 10**4, 10**6, conversion="classic")
    assert cell == pytest.approx(162.22, abs=0.01)
    assert round(_mcmahan(10**6, 10**4, 10**6, conversion="classic",
                          orders=range(2, 34)), 2) == 187.01


def test_dp_accounting_overestimates_fractional_orders_safely():
    # docs/privacy.md: at K = 1e6, C = 1e4, z = 1, T = 1e6 dp-accounting's RDP gives 160.12
    # and Opacus (whose fractional-order series matches a numerical integral) 154.38.
    from opacus.accountants.analysis import rdp as opacus_rdp

    ours = _mcmahan(10**6, 10**4, 10**6)
    assert ours == pytest.approx(160.12, abs=0.005)
    orders = list(ORDER_GRIDS["dp_accounting"])
    curve = opacus_rdp.compute_rdp(q=0.01, noise_multiplier=1.0, steps=10**6, orders=orders)
    theirs, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=curve, delta=1e6**-1.1)
    assert theirs == pytest.approx(154.38, abs=0.005)
    assert ours / theirs - 1 == pytest.approx(0.037, abs=0.001)
    # Integer orders are exact in both: the two curves agree there.
    acc = PrivacyAccountant(orders=[2, 3, 5, 8])
    acc.record_gaussian_round(1.0, "poisson", 0.01)
    ref = opacus_rdp.compute_rdp(q=0.01, noise_multiplier=1.0, steps=1, orders=[2, 3, 5, 8])
    np.testing.assert_allclose(acc._rdp_total()[1], ref, rtol=1e-9)


def _sampled_gaussian_rdp(q, z, alpha):
    """One round's RDP of the Poisson-sampled Gaussian at order alpha, by a 40-digit
    numerical integral: log E_{x ~ N(0, z^2)}[(1 - q + q exp((2x - 1) / (2 z^2)))^alpha] /
    (alpha - 1) (Mironov, Talwar and Zhang 2019, the add/remove direction that dominates)."""
    import mpmath as mp

    with mp.workdps(40):
        q, z, a = mp.mpf(q), mp.mpf(z), mp.mpf(alpha)

        def f(x):
            return mp.npdf(x, 0, z) * (1 - q + q * mp.e ** ((2 * x - 1) / (2 * z**2))) ** a

        return float(mp.log(mp.quad(f, [-mp.inf, -10, 0, 10, 40, mp.inf])) / (a - 1))


@pytest.mark.parametrize(("alpha", "excess"),
                         [(1.1, 0.074), (1.5, 0.040), (1.9, 0.008), (2.5, 0.0009), (3.0, 0.0)])
def test_dp_accounting_fractional_order_error_against_an_integral(alpha, excess):
    from opacus.accountants.analysis import rdp as opacus_rdp

    exact = _sampled_gaussian_rdp(0.01, 1.0, alpha)
    acc = PrivacyAccountant(orders=[alpha])
    acc.record_gaussian_round(1.0, "poisson", 0.01)
    ours = float(acc._rdp_total()[1][0])
    assert ours >= exact * (1 - 1e-12)  # the safe side
    assert ours / exact - 1 == pytest.approx(excess, abs=max(0.1 * excess, 1e-9))
    opacus = opacus_rdp.compute_rdp(q=0.01, noise_multiplier=1.0, steps=1, orders=[alpha])[0]
    assert opacus == pytest.approx(exact, rel=1e-7)


@pytest.mark.parametrize(("q", "z", "rounds", "ours", "opacus"), [
    (0.1, 1.0, 100, 7.904, 7.899),
    (0.1, 2.0, 10_000, 38.489, 38.203),
    (0.1, 1.0, 10_000, 170.109, 134.502),
    (0.01, 1.0, 10_000, 6.713, 6.713),
])
def test_dp_accounting_against_opacus_table(q, z, rounds, ours, opacus):
    # The table in docs/privacy.md (improved conversion, dp-accounting's orders, delta 1e-5).
    from opacus.accountants.analysis import rdp as opacus_rdp

    orders = list(ORDER_GRIDS["dp_accounting"])
    mine = epsilon_for(z, rounds, "poisson", q, delta=1e-5)
    curve = opacus_rdp.compute_rdp(q=q, noise_multiplier=z, steps=rounds, orders=orders)
    theirs, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=curve, delta=1e-5)
    assert (round(mine, 3), round(theirs, 3)) == (ours, opacus)
    assert mine >= theirs


# -- the classic conversion ---------------------------------------------------------------------


def test_classic_conversion_closed_form():
    # A Gaussian without sampling has RDP alpha / (2 z^2) at every order; the classic bound is
    # then min over the grid of alpha / (2 z^2) + log(1/delta) / (alpha - 1).
    orders = [1.5, 2, 4, 8, 16, 32]
    acc = PrivacyAccountant(conversion="classic", orders=orders)
    acc.record_gaussian_round(3.0, "none", count=4)
    z_eff = 3.0 / 2
    expected = min(a / (2 * z_eff**2) + math.log(1e5) / (a - 1) for a in orders)
    assert acc.epsilon(1e-5) == pytest.approx(expected, rel=1e-12)
    assert acc.delta(expected) == pytest.approx(1e-5, rel=1e-9)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(z=st.floats(0.6, 4.0), q=st.floats(0.002, 0.3), steps=st.integers(1, 500),
       log_delta=st.floats(-9.0, -3.0))
def test_classic_is_never_below_improved_and_round_trips(z, q, steps, log_delta):
    delta = 10.0**log_delta
    classic = PrivacyAccountant(conversion="classic")
    classic.record_gaussian_round(z, "poisson", q, count=steps)
    improved = PrivacyAccountant()
    improved.record_gaussian_round(z, "poisson", q, count=steps)
    eps = classic.epsilon(delta)
    assert eps >= improved.epsilon(delta)
    if eps > 0:
        assert classic.delta(eps) == pytest.approx(delta, rel=1e-6)


def test_calibration_with_the_classic_conversion():
    z = calibrate_noise_multiplier(3.01, 1e-5, MNIST_STEPS, "poisson", MNIST_Q,
                                   conversion="classic", orders="tf_privacy", tolerance=0.005)
    assert 1.09 < z <= 1.105
    assert epsilon_for(z, MNIST_STEPS, "poisson", MNIST_Q, delta=1e-5, conversion="classic",
                       orders="tf_privacy") <= 3.01


# -- orders -------------------------------------------------------------------------------------


def test_orders_grids_and_custom_orders():
    acc = PrivacyAccountant(orders=[8, 2.5, 2.5, 4])
    assert acc.orders == (2.5, 4.0, 8.0)
    assert PrivacyAccountant().orders == ORDER_GRIDS["dp_accounting"]
    assert PrivacyAccountant(orders="moments_accountant").orders == tuple(
        float(a) for a in range(2, 34))
    # A custom grid equal to a named one is reported under that name.
    assert PrivacyAccountant(orders=range(2, 34)).describe()["orders"] == "moments_accountant"
    # A coarser grid can only raise epsilon (the minimum is over fewer orders).
    coarse = epsilon_for(1.0, 100, "poisson", 0.01, delta=1e-5, orders=[2, 64])
    assert coarse > epsilon_for(1.0, 100, "poisson", 0.01, delta=1e-5)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"conversion": "tight"}, "'improved', 'classic'"),
    ({"orders": "opacus"}, "tf_privacy"),
    ({"orders": []}, "at least one"),
    ({"orders": [2, 1.0]}, "> 1"),
    ({"orders": [2, math.nan]}, "> 1"),
    ({"orders": [2, math.inf]}, "> 1"),
    ({"orders": [True, 3]}, "> 1"),
    ({"orders": 5}, "sequence"),
])
def test_option_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrivacyAccountant(**kwargs)


def test_pld_takes_no_rdp_options():
    for kwargs in ({"conversion": "classic"}, {"orders": [2, 3]}):
        with pytest.raises(ValueError, match="RDP accountant"):
            PrivacyAccountant("pld", **kwargs)
    PrivacyAccountant("pld", orders="dp_accounting")  # the default, spelled out


# -- checkpoints --------------------------------------------------------------------------------


def test_state_dict_keeps_conversion_and_orders():
    acc = PrivacyAccountant(conversion="classic", orders=[2, 3.5, 40])
    acc.record_gaussian_round(1.1, "poisson", 0.02, count=30)
    state = json.loads(json.dumps(acc.state_dict()))
    restored = PrivacyAccountant.from_state_dict(state)
    assert (restored.conversion, restored.orders) == ("classic", (2.0, 3.5, 40.0))
    assert restored.epsilon(1e-5) == acc.epsilon(1e-5)
    assert acc.copy().epsilon(1e-5) == acc.epsilon(1e-5)
    with pytest.raises(ValueError, match="conversion"):
        PrivacyAccountant(orders=[2, 3.5, 40]).load_state_dict(state)
    with pytest.raises(ValueError, match="orders"):
        PrivacyAccountant(conversion="classic").load_state_dict(state)


def test_version_1_state_loads_with_the_defaults():
    acc = PrivacyAccountant()
    acc.record_gaussian_round(1.0, "poisson", 0.05, count=10)
    old = {k: v for k, v in acc.state_dict().items() if k not in ("conversion", "orders")}
    old["version"] = 1
    restored = PrivacyAccountant.from_state_dict(old)
    assert (restored.conversion, restored.orders) == ("improved", ORDER_GRIDS["dp_accounting"])
    assert restored.epsilon(1e-5) == acc.epsilon(1e-5)
    with pytest.raises(ValueError, match="conversion"):
        PrivacyAccountant.from_state_dict({**acc.state_dict(), "conversion": "best"})


# -- report -------------------------------------------------------------------------------------


def test_report_gives_every_accountant_side_by_side():
    acc = PrivacyAccountant()
    acc.record_gaussian_round(1.1, "poisson", MNIST_Q, count=MNIST_STEPS)
    rep = acc.report(1e-5)
    json.dumps(rep)
    assert rep["epsilon"] == rep["rdp"] == acc.epsilon(1e-5)
    assert rep["rdp"] == pytest.approx(2.597, abs=1e-3) and rep["rdp_order"] == 8.1
    assert round(rep["rdp_classic"], 2) == 3.01 and rep["rdp_classic_order"] == 8.8
    assert rep["pld"] == pytest.approx(2.38, rel=2e-3)
    assert rep["orders"] == "dp_accounting" and rep["unsupported"] == {}
    pld = PrivacyAccountant("pld")
    pld.record_gaussian_round(1.1, "poisson", MNIST_Q, count=MNIST_STEPS)
    assert rep["pld"] == pld.epsilon(1e-5)
    assert pld.report(1e-5, pld=False)["rdp"] == rep["rdp"]

    classic = PrivacyAccountant(conversion="classic")
    classic.record_gaussian_round(1.1, "poisson", MNIST_Q, count=MNIST_STEPS)
    assert classic.report(1e-5, pld=False)["epsilon"] == rep["rdp_classic"]
    assert classic.report(1e-5, pld=False)["pld"] is None


def test_report_of_the_mcmahan_cell_in_the_docs():
    # docs/privacy.md's table: K = 10^6, C = 10^4, z = 1, 10^6 rounds, delta = K^-1.1.
    acc = PrivacyAccountant(conversion="classic", orders="moments_accountant")
    acc.record_gaussian_round(1.0, "poisson", 0.01, count=10**6)
    rep = acc.report(1e6**-1.1)
    assert (round(rep["epsilon"], 2), round(rep["rdp_classic"], 2)) == (187.01, 187.01)
    assert round(rep["rdp"], 2) == 185.62 and round(rep["pld"], 2) == 149.10
    assert rep["orders"] == "moments_accountant" and rep["rdp_classic_order"] == 2.0


def test_report_names_what_an_accountant_cannot_account_for():
    fixed = PrivacyAccountant("rdp", "replace_one")
    fixed.record_gaussian_round(1.0, "fixed", population=1000, sample_size=10, count=5)
    rep = fixed.report(1e-5)
    assert rep["pld"] is None and "sampling-without-replacement" in rep["unsupported"]["pld"]
    assert rep["rdp"] == rep["epsilon"] > 0

    poisson = PrivacyAccountant("pld", "replace_one")
    poisson.record_gaussian_round(1.0, "poisson", 0.05, count=5)
    rep = poisson.report(1e-5)
    assert rep["rdp"] is None and rep["rdp_classic"] is None
    assert "add_remove" in rep["unsupported"]["rdp"] and rep["pld"] == rep["epsilon"] > 0

    empty = PrivacyAccountant().report(1e-5)
    assert (empty["epsilon"], empty["rdp"], empty["rdp_classic"], empty["pld"]) == (0, 0, 0, 0)
    with pytest.raises(ValueError, match="delta"):
        PrivacyAccountant().report(0.0)


def test_report_skips_pld_with_a_reason_at_tiny_noise():
    """A run's guarantees call ``report``: at a noise multiplier so small that the PLD would
    take minutes to build, its side-by-side PLD figure is skipped with the reason."""
    tiny = PrivacyAccountant("rdp")
    tiny.record_gaussian_round(0.01, "poisson", 0.1)
    start = time.perf_counter()
    report = tiny.report(1e-5)
    assert time.perf_counter() - start < 5.0  # the PLD takes minutes here
    assert report["pld"] is None and "skipped" in report["unsupported"]["pld"]
    assert report["rdp"] is not None and report["rdp"] > 100
    # The PLD accountant itself still gives its own figure.
    exact = PrivacyAccountant("pld")
    exact.record_gaussian_round(1.0, "poisson", 0.1, count=20)
    assert exact.report(1e-5)["pld"] == exact.epsilon(1e-5)
