"""Primitives of SecAgg+ (Bonawitz et al., CCS 2017; Bell et al., CCS 2020): Shamir, PRG, AEAD."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmosaic.privacy.secagg.crypto import (
    SHAMIR_PRIME,
    SHARE_BYTES,
    DeterministicRandom,
    MaskAccumulator,
    aead_decrypt,
    aead_encrypt,
    derive_aead_key,
    derive_mask_seed,
    generate_private_key,
    key_agreement,
    lagrange_coefficients_at_zero,
    prg,
    private_key_from_bytes,
    private_key_to_bytes,
    public_key_bytes,
    random_field_element,
    reconstruct_secret_bytes,
    shamir_reconstruct,
    shamir_split,
    share_associated_data,
    share_from_bytes,
    split_secret_bytes,
)
from fedmosaic.privacy.secagg.errors import SecAggProtocolError

SESSION = bytes(range(32))


@st.composite
def sharings(draw):
    """A secret, a t-of-n sharing of it, and a random order in which shares are picked."""
    n = draw(st.integers(2, 12))
    t = draw(st.integers(1, n))
    xs = draw(st.lists(st.integers(1, 5000), min_size=n, max_size=n, unique=True))
    secret = draw(st.integers(0, 2**256 - 1))
    order = draw(st.permutations(range(n)))
    seed = draw(st.integers(0, 2**32))
    return secret, t, xs, order, seed


@settings(max_examples=80, deadline=None, derandomize=True)
@given(sharings())
def test_shamir_any_t_shares_reconstruct_and_t_minus_1_do_not(case):
    secret, t, xs, order, seed = case
    ys = shamir_split(secret, t, xs, DeterministicRandom(seed))
    chosen = order[:t]
    assert shamir_reconstruct([xs[i] for i in chosen], [ys[i] for i in chosen]) == secret
    # More than t shares also interpolate the same polynomial.
    assert shamir_reconstruct(xs, ys) == secret
    if t >= 2:
        fewer = order[: t - 1]
        # t-1 shares determine a degree t-2 polynomial whose value at 0 is independent of the
        # secret: equal to it only with probability 1/p ~ 2^-521.
        assert shamir_reconstruct([xs[i] for i in fewer], [ys[i] for i in fewer]) != secret


@pytest.mark.parametrize("xs", [[1], [1, 2], [5, 9, 1001, 77], list(range(1, 41))])
def test_lagrange_weights_interpolate_low_degree_polynomials_at_zero(xs):
    weights = lagrange_coefficients_at_zero(xs)
    for degree in range(len(xs)):
        # f(x) = x^degree + 3: f(0) = 3, except f = 4 for the constant polynomial x^0 + 3.
        expected = 4 if degree == 0 else 3
        value = sum(w * (pow(x, degree, SHAMIR_PRIME) + 3) for w, x in zip(weights, xs))
        assert value % SHAMIR_PRIME == expected


def test_shamir_bytes_round_trip_and_rejects_too_few_shares():
    rng = DeterministicRandom(2)
    secret = rng(32)
    xs = [1, 2, 3, 4, 5, 6]
    shares = split_secret_bytes(secret, 4, xs, rng)
    assert all(len(s) == SHARE_BYTES for s in shares)
    assert reconstruct_secret_bytes(xs[2:6], shares[2:6]) == secret
    with pytest.raises(SecAggProtocolError, match="inconsistent or fewer than the threshold"):
        reconstruct_secret_bytes(xs[:3], shares[:3])


def test_shamir_input_validation():
    rng = DeterministicRandom(3)
    with pytest.raises(ValueError, match="distinct"):
        shamir_split(5, 2, [1, 1, 2], rng)
    with pytest.raises(ValueError, match="threshold"):
        shamir_split(5, 4, [1, 2, 3], rng)
    with pytest.raises(ValueError, match="not in"):
        shamir_split(5, 2, [0, 2], rng)
    with pytest.raises(SecAggProtocolError, match="not an element"):
        share_from_bytes(SHAMIR_PRIME.to_bytes(SHARE_BYTES, "big"))
    assert all(0 <= random_field_element(rng) < SHAMIR_PRIME for _ in range(50))


def test_private_key_survives_sharing():
    rng = DeterministicRandom(4)
    key = generate_private_key(rng)
    shares = split_secret_bytes(private_key_to_bytes(key), 3, [5, 9, 13, 14], rng)
    recovered = private_key_from_bytes(reconstruct_secret_bytes([9, 13, 14], shares[1:]))
    assert public_key_bytes(recovered) == public_key_bytes(key)


@pytest.mark.parametrize("bits", [8, 20, 32, 48, 64])
def test_prg_is_deterministic_in_range_and_seed_dependent(bits):
    seed_a, seed_b = bytes(32), bytes(31) + b"\x01"
    a1, a2, b = prg(seed_a, 1000, bits), prg(seed_a, 1000, bits), prg(seed_b, 1000, bits)
    assert a1.dtype == (np.dtype("<u4") if bits <= 32 else np.dtype("<u8"))
    np.testing.assert_array_equal(a1, a2)
    assert np.mean(a1 == b) < 0.05
    if bits < 64:
        assert int(a1.max()) < 2**bits
    # The stream is a prefix-stable expansion: a shorter vector is the head of a longer one.
    np.testing.assert_array_equal(prg(seed_a, 10, bits), a1[:10])


def test_prg_rejects_wrong_seed_length():
    with pytest.raises(ValueError, match="32 bytes"):
        prg(b"short", 10, 32)


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_mask_accumulator_matches_modular_arithmetic(bits):
    rng = DeterministicRandom(5)
    seeds = [rng(32) for _ in range(4)]
    acc = MaskAccumulator(257, bits)
    acc.add_stream(seeds[0])
    acc.add_stream(seeds[1])
    acc.subtract_stream(seeds[2])
    acc.subtract_stream(seeds[1])
    expected = (
        prg(seeds[0], 257, bits).astype(object) - prg(seeds[2], 257, bits).astype(object)
    ) % (1 << bits)
    assert acc.value().astype(object).tolist() == expected.tolist()


def test_key_agreement_and_derivations_are_symmetric_and_separated():
    rng = DeterministicRandom(6)
    a, b = generate_private_key(rng), generate_private_key(rng)
    shared_ab = key_agreement(a, public_key_bytes(b))
    shared_ba = key_agreement(b, public_key_bytes(a))
    assert shared_ab == shared_ba
    assert derive_mask_seed(shared_ab, SESSION, 3, 8) == derive_mask_seed(shared_ba, SESSION, 8, 3)
    # Distinct labels, pairs and sessions give unrelated keys.
    derived = {
        derive_mask_seed(shared_ab, SESSION, 3, 8),
        derive_aead_key(shared_ab, SESSION, 3, 8),
        derive_mask_seed(shared_ab, SESSION, 3, 9),
        derive_mask_seed(shared_ab, bytes(32), 3, 8),
    }
    assert len(derived) == 4


def test_key_agreement_rejects_malformed_and_low_order_keys():
    key = generate_private_key(DeterministicRandom(7))
    with pytest.raises(SecAggProtocolError, match="32 bytes"):
        key_agreement(key, b"\x01" * 31)
    with pytest.raises(SecAggProtocolError, match="invalid X25519 public key"):
        key_agreement(key, bytes(32))  # a low-order point: the shared secret would be zero


def test_aead_round_trip_and_tamper_detection():
    rng = DeterministicRandom(8)
    key = rng(32)
    ad = share_associated_data(SESSION, 1, 2)
    blob = aead_encrypt(key, b"shares" * 20, ad, rng)
    assert aead_decrypt(key, blob, ad) == b"shares" * 20
    for position in (0, 11, 12, len(blob) // 2, len(blob) - 1):  # nonce, body and tag
        tampered = bytearray(blob)
        tampered[position] ^= 0x01
        with pytest.raises(SecAggProtocolError, match="failed authentication"):
            aead_decrypt(key, bytes(tampered), ad)
    with pytest.raises(SecAggProtocolError, match="failed authentication"):
        aead_decrypt(key, blob, share_associated_data(SESSION, 2, 1))  # reversed direction
    with pytest.raises(SecAggProtocolError, match="failed authentication"):
        aead_decrypt(rng(32), blob, ad)
    with pytest.raises(SecAggProtocolError, match="too short"):
        aead_decrypt(key, blob[:20], ad)


def test_random_nonces_make_equal_plaintexts_differ():
    rng = DeterministicRandom(9)
    key, ad = rng(32), b"ad"
    assert aead_encrypt(key, b"x", ad, rng) != aead_encrypt(key, b"x", ad, rng)


def test_deterministic_random_is_reproducible_and_label_separated():
    assert DeterministicRandom(1)(64) == DeterministicRandom(1)(64)
    stream = DeterministicRandom(1)
    assert stream(32) + stream(32) == DeterministicRandom(1)(64)
    assert DeterministicRandom(1, b"a")(32) != DeterministicRandom(1, b"b")(32)
    assert DeterministicRandom(1)(32) != DeterministicRandom(2)(32)
