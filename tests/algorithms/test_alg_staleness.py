"""Staleness functions (Xie et al. 2019, arXiv:1903.03934; Nguyen et al. 2022, FedBuff):
closed forms, properties, validation, the registry and staleness_of."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmosaic.algorithms import (
    ConstantStaleness,
    HingeStaleness,
    InverseSqrtStaleness,
    PolynomialStaleness,
    StalenessFunction,
    make_staleness,
    staleness_of,
)
from fedmosaic.core import ClientUpdate, ConfigError, InvalidUpdateError

SETTINGS = settings(deadline=None, max_examples=60)
POINTS = (0, 1, 4, 8, 16)


def test_polynomial_closed_form_of_the_acceptance() -> None:
    s = PolynomialStaleness(a=0.5)
    assert [round(s(t), 4) for t in POINTS] == [1.0, 0.7071, 0.4472, 0.3333, 0.2425]
    # and the definition itself, (staleness + 1) ** -a
    assert s(3) == pytest.approx(0.5, abs=0.0)


def test_hinge_closed_form_of_the_acceptance_is_exact() -> None:
    s = HingeStaleness(a=10, b=4)
    assert [s(t) for t in POINTS] == [1.0, 1.0, 1.0, 1 / 41, 1 / 121]


def test_inverse_sqrt_and_constant() -> None:
    s = InverseSqrtStaleness()
    assert s(0) == 1.0
    assert s(3) == 0.5
    assert s(8) == pytest.approx(1 / 3, rel=1e-15)
    assert [ConstantStaleness()(t) for t in POINTS] == [1.0] * len(POINTS)


def test_polynomial_with_a_zero_is_constant() -> None:
    assert [PolynomialStaleness(a=0)(t) for t in POINTS] == [1.0] * len(POINTS)


FUNCTIONS = st.one_of(
    st.just(ConstantStaleness()),
    st.just(InverseSqrtStaleness()),
    st.builds(PolynomialStaleness, a=st.floats(0.0, 8.0)),
    st.builds(HingeStaleness, a=st.floats(1e-3, 1e3), b=st.floats(0.0, 100.0)),
)


@SETTINGS
@given(FUNCTIONS, st.integers(0, 10**6), st.integers(0, 10**6))
def test_values_in_unit_interval_and_non_increasing(
    fn: StalenessFunction, t1: int, t2: int
) -> None:
    lo, hi = min(t1, t2), max(t1, t2)
    a, b = fn(lo), fn(hi)
    assert 0.0 < b <= a <= 1.0
    assert fn(0) == 1.0  # a fresh update always counts fully
    assert isinstance(a, float)


@SETTINGS
@given(FUNCTIONS)
def test_describe_is_json_and_rebuilds_the_function(fn: StalenessFunction) -> None:
    desc = fn.describe()
    assert json.loads(json.dumps(desc)) == desc
    rebuilt = make_staleness(**desc)
    assert rebuilt == fn
    assert [rebuilt(t) for t in POINTS] == [fn(t) for t in POINTS]


def test_make_staleness_by_name() -> None:
    assert make_staleness("constant") == ConstantStaleness()
    assert make_staleness("polynomial", a=0.5) == PolynomialStaleness(0.5)
    assert make_staleness("HINGE", a=10, b=4) == HingeStaleness(10.0, 4.0)
    assert make_staleness("inverse_sqrt") == InverseSqrtStaleness()
    with pytest.raises(ConfigError, match="inverse_sqrt"):
        make_staleness("exponential")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['b'\].*allowed: \['a'\]"):
        make_staleness("polynomial", a=0.5, b=1)
    with pytest.raises(ValueError, match="allowed: none"):
        make_staleness("inverse_sqrt", a=1)


@pytest.mark.parametrize(
    ("build", "param"),
    [
        (lambda: PolynomialStaleness(a=-0.5), "a"),
        (lambda: PolynomialStaleness(a=float("nan")), "a"),
        (lambda: PolynomialStaleness(a="0.5"), "a"),  # type: ignore[arg-type]
        (lambda: HingeStaleness(a=0, b=4), "a"),
        (lambda: HingeStaleness(a=float("inf"), b=4), "a"),
        (lambda: HingeStaleness(a=10, b=-1), "b"),
        (lambda: HingeStaleness(a=10, b=True), "b"),  # type: ignore[arg-type]
    ],
)
def test_bad_parameters_are_refused_naming_them(build, param: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=rf"^{param} must be"):
        build()


@pytest.mark.parametrize("bad", [-1, 1.0, 0.5, "3", True, None, torch.tensor(2)])
@pytest.mark.parametrize(
    "fn", [ConstantStaleness(), PolynomialStaleness(0.5), HingeStaleness(10, 4),
           InverseSqrtStaleness()])
def test_bad_staleness_is_refused(fn: StalenessFunction, bad: object) -> None:
    with pytest.raises(ValueError, match="staleness must be an integer >= 0"):
        fn(bad)  # type: ignore[arg-type]


def test_numpy_integers_are_accepted() -> None:
    assert PolynomialStaleness(0.5)(np.int64(3)) == 0.5


def test_extreme_parameters_underflow_to_zero_not_negative() -> None:
    # Documented: the float result can reach 0.0 (consumers refuse such an update).
    assert PolynomialStaleness(a=200)(10**6) == 0.0
    assert not math.isnan(HingeStaleness(a=1e300, b=0)(10**6))


def test_staleness_of_counts_versions_and_rejects_future_bases() -> None:
    def upd(base: object) -> ClientUpdate:
        return ClientUpdate("c7", torch.zeros(2), 3, base)  # type: ignore[arg-type]

    assert staleness_of(upd(5), 5) == 0
    assert staleness_of(upd(2), 9) == 7
    with pytest.raises(InvalidUpdateError, match=r"c7.*ahead of the server's version 4"):
        staleness_of(upd(5), 4)
    with pytest.raises(InvalidUpdateError, match=r"c7.*negative"):
        staleness_of(upd(-1), 4)
    with pytest.raises(InvalidUpdateError, match=r"c7.*not an integer"):
        staleness_of(upd(1.5), 4)
    with pytest.raises(ValueError, match="integer >= 0"):
        staleness_of(upd(0), -1)
