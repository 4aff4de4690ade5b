"""Client sampling (McMahan et al. 2017) and straggler simulation (Li et al. 2020)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmosaic.algorithms import ClientSampler, StragglerSimulation
from fedmosaic.core import RoundFailedError

SETTINGS = settings(deadline=None, max_examples=50)
IDS = [f"client{i:03d}" for i in range(40)]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_sampler_is_deterministic_and_order_independent() -> None:
    s = ClientSampler(clients_per_round=7)
    a = s.sample(IDS, rng(42))
    assert a == s.sample(IDS, rng(42))
    assert a == s.sample(list(reversed(IDS)), rng(42))
    assert a == sorted(a) and len(set(a)) == 7 and set(a) <= set(IDS)


def test_sampler_varies_across_rounds_and_covers_everyone() -> None:
    s = ClientSampler(clients_per_round=5)
    g = rng(1)
    rounds = [s.sample(IDS, g) for _ in range(200)]
    assert len({tuple(r) for r in rounds}) > 1
    assert set().union(*map(set, rounds)) == set(IDS)


@pytest.mark.parametrize(
    ("fraction", "n", "expected"),
    [(0.1, 30, 3), (0.1, 31, 4), (0.01, 10, 1), (1.0, 30, 30), (0.3, 10, 3), (0.5, 1, 1)],
)
def test_fraction_sizes(fraction: float, n: int, expected: int) -> None:
    s = ClientSampler(fraction=fraction)
    assert s.sample_size(n) == expected
    assert len(s.sample(IDS[:n], rng())) == expected


def test_more_clients_per_round_than_available_takes_all() -> None:
    assert ClientSampler(clients_per_round=100).sample(IDS[:4], rng()) == IDS[:4]


@SETTINGS
@given(st.integers(1, 40), st.integers(1, 50), st.integers(0, 2**32 - 1))
def test_sample_size_property(k: int, n: int, seed: int) -> None:
    ids = [f"c{i}" for i in range(n)]
    out = ClientSampler(clients_per_round=k).sample(ids, rng(seed))
    assert len(out) == min(k, n) and len(set(out)) == len(out) and out == sorted(out)


@SETTINGS
@given(st.floats(0.001, 1.0), st.integers(1, 50))
def test_fraction_size_property(fraction: float, n: int) -> None:
    size = ClientSampler(fraction=fraction).sample_size(n)
    assert 1 <= size <= n
    assert size >= fraction * n - 1e-6
    assert size - 1 < max(fraction * n, 1) + 1e-6


def test_min_available_fails_the_round() -> None:
    s = ClientSampler(clients_per_round=2, min_available=5)
    with pytest.raises(RoundFailedError, match="5"):
        s.sample(IDS[:4], rng())
    assert len(s.sample(IDS[:5], rng())) == 2
    with pytest.raises(RoundFailedError):
        ClientSampler(fraction=0.5).sample([], rng())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one"),
        ({"clients_per_round": 3, "fraction": 0.5}, "exactly one"),
        ({"clients_per_round": 0}, "clients_per_round"),
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"clients_per_round": 3, "min_available": 0}, "min_available"),
    ],
)
def test_sampler_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ClientSampler(**kwargs)


def test_sampler_rejects_duplicate_ids() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        ClientSampler(clients_per_round=1).sample(["a", "a"], rng())


def test_stragglers_counts_ranges_and_order() -> None:
    ids = IDS[:20]
    full = {c: 1000 for c in ids}
    out = StragglerSimulation(fraction=0.25).assign(list(reversed(ids)), full, rng(3))
    assert list(out) == list(reversed(ids))
    values = [v for v in out.values()]
    assert all(v is not None and 1 <= v <= 1000 for v in values)
    # 5 stragglers; a draw of exactly 1000 has probability 1/1000, and the seed is fixed.
    assert sum(v < 1000 for v in values) == 5


def test_stragglers_respect_each_clients_full_steps() -> None:
    full = {c: i + 1 for i, c in enumerate(IDS)}
    g = rng(7)
    for _ in range(20):
        out = StragglerSimulation(fraction=1.0).assign(IDS, full, g)
        assert all(1 <= out[c] <= full[c] for c in IDS)  # type: ignore[operator]


@SETTINGS
@given(st.floats(0.0, 1.0), st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_drop_marks_exactly_the_rounded_fraction(fraction: float, n: int, seed: int) -> None:
    ids = [f"c{i}" for i in range(n)]
    full = {c: 5 for c in ids}
    sim = StragglerSimulation(fraction=fraction, drop=True)
    out = sim.assign(ids, full, rng(seed))
    dropped = [c for c, v in out.items() if v is None]
    assert len(dropped) == sim.num_stragglers(n)
    assert abs(len(dropped) - fraction * n) <= 0.5 + 1e-9
    assert all(v == 5 for v in out.values() if v is not None)
    assert out == sim.assign(ids, full, rng(seed))


def test_rounding_is_half_up() -> None:
    assert StragglerSimulation(0.35).num_stragglers(10) == 4
    assert StragglerSimulation(0.5).num_stragglers(3) == 2
    assert StragglerSimulation(0.5).num_stragglers(1) == 1
    assert StragglerSimulation(0.1).num_stragglers(4) == 0


def test_no_stragglers_and_all_dropped() -> None:
    full = {c: 9 for c in IDS[:6]}
    assert StragglerSimulation().assign(IDS[:6], full, rng()) == full
    assert set(StragglerSimulation(1.0, drop=True).assign(IDS[:6], full, rng()).values()) == {
        None
    }


def test_straggler_validation() -> None:
    with pytest.raises(ValueError, match="fraction"):
        StragglerSimulation(fraction=1.2)
    sim = StragglerSimulation(0.5)
    with pytest.raises(ValueError, match="lacks"):
        sim.assign(["a", "b"], {"a": 3}, rng())
    with pytest.raises(ValueError, match=">= 1"):
        sim.assign(["a", "b"], {"a": 3, "b": 0}, rng())
