"""SecAgg+ neighbour graph and (k, t) choice (Bell et al., CCS 2020)."""

import itertools
import math

import numpy as np
import pytest

from fedmosaic.privacy.secagg.graph import (
    NeighbourGraph,
    _LogFactorials,
    is_connected,
    secagg_plus_parameters,
)

SEED = bytes(range(32))


@pytest.mark.parametrize(("n", "k"), [(10, 2), (10, 4), (11, 6), (50, 8), (12, 5), (200, 21)])
def test_harary_graph_is_regular_symmetric_and_connected(n, k):
    g = NeighbourGraph(n, k, SEED)
    for u in range(n):
        neighbours = g.neighbours(u)
        assert len(neighbours) == k
        assert u not in neighbours
        assert all(u in g.neighbours(v) for v in neighbours)
    assert is_connected(g, range(n))


def test_odd_degree_on_odd_nodes_follows_harary():
    g = NeighbourGraph(11, 5, SEED)
    degrees = sorted(len(g.neighbours(u)) for u in range(11))
    assert degrees == [5] * 10 + [6]  # Harary H(2r+1, n odd): one vertex has one extra edge


@pytest.mark.parametrize(("n", "k"), [(9, 4), (12, 6), (10, 5)])
def test_harary_graph_survives_any_k_minus_1_removals(n, k):
    # H(k, n) is k-connected: no k - 1 removed nodes can split it.
    g = NeighbourGraph(n, k, SEED)
    for removed in itertools.combinations(range(n), k - 1):
        assert is_connected(g, set(range(n)) - set(removed))


def test_graph_is_a_function_of_the_seed():
    a = NeighbourGraph(100, 10, SEED).neighbour_sets()
    b = NeighbourGraph(100, 10, SEED).neighbour_sets()
    c = NeighbourGraph(100, 10, bytes(32)).neighbour_sets()
    assert a == b
    assert a != c


def test_relabelling_spreads_neighbours():
    # Without the random relabelling node u's neighbours would be u +- 1..k/2.
    g = NeighbourGraph(1000, 10, SEED)
    spreads = [max(abs(v - u) for v in g.neighbours(u)) for u in range(1000)]
    assert np.median(spreads) > 100


def test_complete_graph_is_classic_secagg():
    g = NeighbourGraph(7, 6, SEED)
    assert g.is_complete
    assert all(g.neighbours(u) == tuple(v for v in range(7) if v != u) for u in range(7))


def test_graph_validation():
    with pytest.raises(ValueError, match="degree"):
        NeighbourGraph(5, 5, SEED)
    with pytest.raises(ValueError, match="at least 2"):
        NeighbourGraph(1, 1, SEED)
    with pytest.raises(ValueError, match="not in"):
        NeighbourGraph(5, 2, SEED).neighbours(5)


def test_is_connected_detects_a_split():
    g = NeighbourGraph(20, 2, SEED)  # a ring (relabelled): removing two nodes can split it
    ring = [0]
    while len(ring) < 20:
        ring.append(next(v for v in g.neighbours(ring[-1]) if v not in ring[-2:]))
    assert not is_connected(g, set(range(20)) - {ring[3], ring[10]})
    assert is_connected(g, set(range(20)) - {ring[3], ring[4]})


def test_log_space_probabilities_match_exact_integer_arithmetic():
    table = _LogFactorials(300)
    for population, marked, draws in [(299, 30, 40), (99, 10, 22), (50, 0, 10), (20, 18, 10)]:
        tails = table.log2_hypergeometric_tails(population, marked, draws)
        total = math.comb(population, draws)
        for x in range(draws + 2):
            favourable = sum(
                math.comb(marked, i) * math.comb(population - marked, draws - i)
                for i in range(x, min(marked, draws) + 1)
            )
            expected = math.log2(favourable / total) if favourable else -math.inf
            assert tails[x] == pytest.approx(expected, abs=1e-9) or tails[x] == expected
    exact = math.log2(math.perm(25, 6) / math.perm(300, 6))
    assert table.log2_all_removed(25, 300, 6) == pytest.approx(exact, abs=1e-9)
    assert table.log2_all_removed(5, 300, 6) == -math.inf


@pytest.mark.parametrize("n", [100, 1000, 10_000, 100_000])
@pytest.mark.parametrize(("dropout", "corrupted"), [(0.1, 0.0), (0.1, 0.05), (0.2, 0.1)])
def test_parameters_meet_the_conditions_they_claim(n, dropout, corrupted):
    p = secagg_plus_parameters(n, dropout, corrupted)
    assert 2 * p.threshold > p.degree  # no double reconstruction even without corruption
    assert p.threshold <= p.degree <= n - 1
    assert p.log2_security_failure <= -40
    assert p.log2_correctness_failure <= -20
    if not p.is_complete:
        assert p.degree % 2 == 0


def test_degree_grows_slowly_with_the_number_of_clients():
    degrees = [secagg_plus_parameters(n, 0.1, 0.05).degree for n in (100, 1000, 10_000, 100_000)]
    assert degrees == sorted(degrees)
    assert degrees[-1] < 2 * degrees[1]  # 100x more clients, less than twice the degree
    assert degrees[-1] <= 10 * math.log2(100_000)


def test_higher_dropout_needs_a_larger_degree():
    for n in (100, 1000):
        previous = None
        for dropout in (0.0, 0.05, 0.1, 0.2, 0.3):
            p = secagg_plus_parameters(n, dropout, 0.05)
            if previous is not None:
                # Tolerating more dropouts means more neighbours or a lower threshold share.
                assert p.degree > previous.degree or (
                    p.threshold / p.degree < previous.threshold / previous.degree
                )
            previous = p


def test_corruption_raises_the_threshold_ratio():
    honest = secagg_plus_parameters(1000, 0.1, 0.0)
    corrupt = secagg_plus_parameters(1000, 0.1, 0.1)
    assert corrupt.threshold / corrupt.degree > honest.threshold / honest.degree


def test_small_populations_fall_back_to_the_complete_graph_or_fail():
    p = secagg_plus_parameters(6, 0.3, 0.0)
    assert p.is_complete and p.degree == 5
    assert p.threshold == 3 and p.degree - p.threshold >= 2
    with pytest.raises(ValueError, match="no SecAgg\\+ parameters"):
        secagg_plus_parameters(10, 0.5, 0.0)
    with pytest.raises(ValueError, match="no honest survivor"):
        secagg_plus_parameters(10, 0.6, 0.4)
