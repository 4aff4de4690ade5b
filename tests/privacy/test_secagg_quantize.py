"""Fixed-point encoding into Z_(2^bits) for secure aggregation (Bonawitz et al., CCS 2017)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmosaic.privacy.secagg.quantize import Quantizer


def modular_sum(encodings: list[np.ndarray], bits: int) -> np.ndarray:
    total = np.zeros_like(encodings[0])
    for e in encodings:
        total += e  # uint32/uint64 wrap-around is arithmetic mod 2^32/2^64
    return total & total.dtype.type((1 << bits) - 1)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 50),
    bits=st.sampled_from([16, 24, 32, 48, 64]),
    clip=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**32),
)
def test_decode_of_sum_of_encodings_is_within_the_error_bound(n, bits, clip, seed):
    rng = np.random.default_rng(seed)
    q = Quantizer(clip=clip, bits=bits, num_clients=n)
    xs = rng.normal(0, clip, size=(n, 64))  # about a third of the values get clipped
    encodings = [q.encode(x, rng) for x in xs]
    decoded = q.decode(modular_sum(encodings, bits))
    exact = np.clip(xs, -clip, clip).sum(axis=0)
    # Strictly less than one level per client, plus float64 rounding of the scaled inputs.
    slack = 1e-12 * n * clip + 1e-9 * np.abs(exact).max()
    assert np.all(np.abs(decoded - exact) <= q.error_bound(n) + slack)


@pytest.mark.parametrize("bits", [8, 16, 32, 64])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_inputs_never_wrap(bits, sign):
    n = 100
    q = Quantizer(clip=2.0, bits=bits, num_clients=n)
    rng = np.random.default_rng(0)
    encodings = [q.encode(np.full(10, sign * 5.0), rng) for _ in range(n)]
    decoded = q.decode(modular_sum(encodings, bits))
    # n clients all at the clip bound sum to n * clip exactly (the levels are integers).
    np.testing.assert_allclose(decoded, sign * 2.0 * n, rtol=1e-12)


def test_scale_respects_the_no_wrap_bound():
    for bits, n in [(8, 3), (16, 1000), (32, 10**6), (64, 7)]:
        q = Quantizer(clip=1.0, bits=bits, num_clients=n)
        assert n * q.max_level <= 2 ** (bits - 1) - 1
        assert q.max_level <= 2**53


def test_encoding_is_unbiased_stochastic_rounding():
    q = Quantizer(clip=1.0, bits=8, num_clients=1)  # 127 levels: coarse, so bias would show
    rng = np.random.default_rng(1)
    value = 0.3 / 127 + 5 / 127  # 5.3 levels
    codes = q.encode(np.full(200_000, value), rng)
    assert set(np.unique(codes).tolist()) == {5, 6}
    assert abs(q.decode(codes).mean() - value) < 6 * (0.5 / 127) / np.sqrt(200_000)  # 6 sigma


def test_negative_values_decode_through_the_signed_wrap():
    q = Quantizer(clip=1.0, bits=16, num_clients=4)
    codes = q.encode(np.array([-1.0, -0.5, 0.0, 0.5, 1.0]), np.random.default_rng(0))
    assert codes.dtype == np.dtype("<u4")
    assert codes[0] == 2**16 - q.max_level  # -L mod 2^16
    np.testing.assert_allclose(q.decode(codes), [-1.0, -0.5, 0.0, 0.5, 1.0], atol=q.step)


def test_invalid_parameters_are_rejected():
    with pytest.raises(ValueError, match="clip"):
        Quantizer(clip=0.0)
    with pytest.raises(ValueError, match="bits"):
        Quantizer(clip=1.0, bits=65)
    with pytest.raises(ValueError, match="cannot hold"):
        Quantizer(clip=1.0, bits=4, num_clients=100)
    with pytest.raises(ValueError, match="NaN"):
        Quantizer(clip=1.0).encode(np.array([np.nan]))
