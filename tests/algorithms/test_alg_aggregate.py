"""Weighted averaging: validation, properties, streaming accumulator, FedAvg aggregator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmosaic.algorithms import FedAvgAggregator, WeightedMeanAccumulator, weighted_mean
from fedmosaic.core import ClientUpdate, ConfigError

SETTINGS = settings(deadline=None, max_examples=50)


@st.composite
def deltas_and_weights(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    k = draw(st.integers(1, 6))
    d = draw(st.integers(1, 8))
    values = draw(
        st.lists(
            st.floats(-100, 100, allow_nan=False, width=32), min_size=k * d, max_size=k * d
        )
    )
    weights = draw(st.lists(st.floats(0.01, 1000.0), min_size=k, max_size=k))
    deltas = torch.tensor(values, dtype=torch.float32).reshape(k, d)
    return deltas, torch.tensor(weights, dtype=torch.float64)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # float32 rounding on values up to 100: a few ulps of 100 is ~1e-5.
    return torch.allclose(a, b, rtol=1e-5, atol=1e-4)


@SETTINGS
@given(deltas_and_weights())
def test_mean_lies_within_coordinatewise_range(dw: tuple[torch.Tensor, torch.Tensor]) -> None:
    deltas, weights = dw
    out = weighted_mean(deltas, weights)
    assert out.dtype == torch.float32 and out.shape == (deltas.shape[1],)
    assert bool((out >= deltas.min(0).values - 1e-4).all())
    assert bool((out <= deltas.max(0).values + 1e-4).all())


@SETTINGS
@given(deltas_and_weights(), st.randoms(use_true_random=False))
def test_permutation_invariance(dw: tuple[torch.Tensor, torch.Tensor], rnd) -> None:
    deltas, weights = dw
    perm = list(range(deltas.shape[0]))
    rnd.shuffle(perm)
    idx = torch.tensor(perm)
    assert close(weighted_mean(deltas, weights), weighted_mean(deltas[idx], weights[idx]))


@SETTINGS
@given(deltas_and_weights(), st.floats(0.01, 100.0))
def test_equal_weights_give_plain_mean(dw: tuple[torch.Tensor, torch.Tensor], w: float) -> None:
    deltas, _ = dw
    weights = torch.full((deltas.shape[0],), w, dtype=torch.float64)
    assert close(weighted_mean(deltas, weights), deltas.mean(0))


@SETTINGS
@given(deltas_and_weights(), st.floats(1e-3, 1e3))
def test_scaling_weights_changes_nothing(dw: tuple[torch.Tensor, torch.Tensor], c: float) -> None:
    deltas, weights = dw
    assert close(weighted_mean(deltas, weights), weighted_mean(deltas, weights * c))


@SETTINGS
@given(deltas_and_weights())
def test_accumulator_matches_weighted_mean(dw: tuple[torch.Tensor, torch.Tensor]) -> None:
    deltas, weights = dw
    acc = WeightedMeanAccumulator(deltas.shape[1])
    for row, w in zip(deltas, weights.tolist(), strict=True):
        acc.add(row, w)
    assert acc.count == deltas.shape[0]
    assert acc.total_weight == pytest.approx(float(weights.sum()))
    assert close(acc.result(), weighted_mean(deltas, weights))


@SETTINGS
@given(deltas_and_weights(), st.lists(st.integers(1, 10_000), min_size=6, max_size=6))
def test_uniform_weighting_ignores_sample_counts(
    dw: tuple[torch.Tensor, torch.Tensor], counts: list[int]
) -> None:
    deltas, _ = dw
    updates = [
        ClientUpdate(f"c{i}", row.clone(), num_samples=counts[i], base_round=0)
        for i, row in enumerate(deltas)
    ]
    agg = FedAvgAggregator("uniform")
    assert close(agg.aggregate(updates), deltas.mean(0))
    acc = agg.accumulator(deltas.shape[1])
    for u in updates:
        acc.add(u.delta, agg.weight_of(u))
    assert close(acc.result(), deltas.mean(0))


@SETTINGS
@given(deltas_and_weights())
def test_single_update_is_itself(dw: tuple[torch.Tensor, torch.Tensor]) -> None:
    deltas, weights = dw
    one, w = deltas[:1], weights[:1]
    assert torch.equal(weighted_mean(one, w), one[0])
    acc = WeightedMeanAccumulator(one.shape[1])
    acc.add(one[0], float(w[0]))
    assert close(acc.result(), one[0])


def test_sample_weighting_uses_update_weight() -> None:
    updates = [
        ClientUpdate("a", torch.tensor([0.0, 4.0]), num_samples=1, base_round=0),
        ClientUpdate("b", torch.tensor([4.0, 0.0]), num_samples=3, base_round=0),
        ClientUpdate("c", torch.tensor([8.0, 8.0]), num_samples=100, base_round=0, weight=0.0001),
    ]
    agg = FedAvgAggregator()
    assert agg.streaming is True
    assert agg.weight_of(updates[1]) == 3.0 and agg.weight_of(updates[2]) == 0.0001
    out = agg.aggregate(updates[:2])
    assert torch.allclose(out, torch.tensor([3.0, 1.0]))


def test_aggregator_rejects_unknown_weighting() -> None:
    with pytest.raises(ValueError, match="samples") as info:
        FedAvgAggregator("staleness")
    assert isinstance(info.value, ConfigError)
    assert "uniform" in str(info.value)


def test_aggregate_empty_raises() -> None:
    with pytest.raises(ValueError, match="no updates"):
        FedAvgAggregator().aggregate([])


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0, -1.0], "> 0"),
        ([1.0, 0.0], "> 0"),
        ([1.0, float("nan")], "finite"),
        ([1.0, float("inf")], "finite"),
        ([1.0], "shape"),
        ([[1.0, 1.0]], "shape"),
    ],
)
def test_weighted_mean_rejects_bad_weights(weights: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        weighted_mean(torch.zeros(2, 3), torch.tensor(weights))


def test_weighted_mean_rejects_bad_deltas() -> None:
    with pytest.raises(ValueError, match=r"\(K, D\)"):
        weighted_mean(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="float32"):
        weighted_mean(torch.zeros(2, 3, dtype=torch.float64), torch.ones(2))
    with pytest.raises(ValueError, match="no rows"):
        weighted_mean(torch.zeros(0, 3), torch.ones(0))


def test_weighted_mean_precision_with_unequal_weights() -> None:
    # A huge weight next to a tiny one: normalising in float64 keeps the tiny share exact
    # enough that the result is the expected convex combination.
    deltas = torch.tensor([[1.0], [0.0]])
    out = weighted_mean(deltas, torch.tensor([1e-6, 1e6], dtype=torch.float64))
    assert out.item() == pytest.approx(1e-12, abs=1e-15)


def test_accumulator_validation() -> None:
    acc = WeightedMeanAccumulator(3)
    with pytest.raises(ValueError, match="no delta"):
        acc.result()
    with pytest.raises(ValueError, match="shape"):
        acc.add(torch.zeros(4), 1.0)
    with pytest.raises(ValueError, match="float32"):
        acc.add(torch.zeros(3, dtype=torch.float64), 1.0)
    for bad in (0.0, -2.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight"):
            acc.add(torch.zeros(3), bad)
    with pytest.raises(ValueError, match="dim"):
        WeightedMeanAccumulator(0)
    assert acc.count == 0 and acc.total_weight == 0.0


def test_accumulator_result_does_not_consume_state() -> None:
    acc = WeightedMeanAccumulator(2, device="cpu")
    acc.add(torch.tensor([2.0, 0.0]), 1.0)
    first = acc.result()
    acc.add(torch.tensor([0.0, 2.0]), 1.0)
    assert torch.equal(first, torch.tensor([2.0, 0.0]))
    assert torch.equal(acc.result(), torch.tensor([1.0, 1.0]))


def test_weighted_mean_accepts_numpy_weights() -> None:
    out = weighted_mean(torch.tensor([[0.0], [3.0]]), np.array([2.0, 1.0]))
    assert out.item() == pytest.approx(1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stays_on_device() -> None:
    deltas = torch.randn(4, 10, device="cuda")
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = weighted_mean(deltas, weights)
    assert out.is_cuda
    acc = WeightedMeanAccumulator(10)
    for row, w in zip(deltas, weights.tolist(), strict=True):
        acc.add(row, w)
    assert acc.result().is_cuda
    assert torch.allclose(acc.result(), out, atol=1e-5)
    # Explicit device: CPU deltas are summed on the GPU.
    acc_gpu = WeightedMeanAccumulator(10, device="cuda")
    acc_gpu.add(deltas[0].cpu(), 1.0)
    assert acc_gpu.result().is_cuda


def test_merge_of_partial_sums_equals_adding_every_delta():
    gen = torch.Generator().manual_seed(0)
    deltas = torch.randn(7, 50, generator=gen)
    weights = torch.rand(7, generator=gen) + 0.1
    whole = WeightedMeanAccumulator(50)
    for d, w in zip(deltas, weights):
        whole.add(d, float(w))
    left, right, merged = (WeightedMeanAccumulator(50) for _ in range(3))
    for i, (d, w) in enumerate(zip(deltas, weights)):
        (left if i < 3 else right).add(d, float(w))
    for part in (left, right):
        merged.merge(part.weighted_sum, part.total_weight, part.count)
    assert merged.count == 7
    assert torch.allclose(merged.result(), whole.result(), atol=1e-6)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [((torch.zeros(3), 1.0, 1), "shape"), ((torch.zeros(5), 0.0, 1), "total_weight"),
     ((torch.zeros(5), 1.0, 0), "count"), ((torch.zeros(5, dtype=torch.float64), 1.0, 1),
                                          "float32")],
)
def test_merge_refuses_malformed_partial_sums(args, fragment):
    with pytest.raises(ValueError, match=fragment):
        WeightedMeanAccumulator(5).merge(*args)
