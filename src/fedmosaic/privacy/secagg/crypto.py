"""Cryptographic building blocks of SecAgg+.

The protocol is the one of Bonawitz et al., CCS 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning" (SecAgg), restricted to a sparse neighbour graph as in
Bell et al., CCS 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead"
(SecAgg+). It needs four primitives, all taken from the ``cryptography`` package:

* key agreement: X25519. Every client holds two key pairs per round, ``c`` (to encrypt the
  Shamir shares it sends to its neighbours) and ``s`` (to agree on pairwise masks);
* key derivation: HKDF-SHA256 with the session id as salt and a purpose label plus the
  (unordered) pair of client ids as ``info``, so a mask seed can never equal an encryption
  key, and no key is reused across rounds, sessions or pairs;
* authenticated encryption of shares: AES-256-GCM, random 96-bit nonces, with associated
  data naming the session, the sender and the recipient, so the server (which relays the
  ciphertexts) can neither alter nor redirect a share;
* a PRG expanding a 32-byte seed into a mask vector: AES-256-CTR keystream (the encryption
  of zeros), reinterpreted as little-endian unsigned integers by numpy, without a Python
  loop over coordinates.

Shamir t-of-n secret sharing is protocol arithmetic, not a primitive ``cryptography``
offers, so it is written here over the prime field of the Mersenne prime ``2**521 - 1``, which
holds any 32-byte secret (a self-mask seed or a raw X25519 private key).
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from collections.abc import Callable, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedmosaic.privacy.secagg.errors import SecAggProtocolError

#: A source of random bytes: ``random_bytes(n)`` returns ``n`` bytes.
RandomBytes = Callable[[int], bytes]

SEED_BYTES = 32
PUBLIC_KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16

#: The field of Shamir sharing: the Mersenne prime 2**521 - 1 (larger than any 32-byte secret).
SHAMIR_PRIME = (1 << 521) - 1
#: Bytes of one serialised share (a field element, big-endian).
SHARE_BYTES = (521 + 7) // 8

_LABEL = b"fedmosaic/secagg+/v1/"
MASK_SEED_LABEL = _LABEL + b"pairwise-mask-seed"
AEAD_KEY_LABEL = _LABEL + b"share-encryption-key"
SHARE_AD_LABEL = _LABEL + b"share-ciphertext"

# AES-CTR keystreams start at counter 0: every PRG key is used for exactly one stream (a fresh
# self-mask seed, or a pairwise seed bound to one session and one pair), so a fixed IV is safe.
_PRG_IV = bytes(16)
# ``update_into`` may write up to one block minus one byte past the input length.
_UPDATE_INTO_SLACK = 15


def system_random_bytes(n: int) -> bytes:
    """Cryptographically secure random bytes from the operating system."""
    return secrets.token_bytes(n)


class DeterministicRandom:
    """A reproducible byte stream for tests, simulations and benchmarks -- never for real use.

    The stream is the AES-256-CTR keystream under ``SHA-256(label || seed)``: a fixed seed gives
    the same keys, shares and masks on every run, so statistical tests cannot be flaky. Anyone
    who knows the seed knows every secret derived from it.
    """

    def __init__(self, seed: int | bytes, label: bytes = b"") -> None:
        if isinstance(seed, int):
            seed = seed.to_bytes(16, "little", signed=True)
        key = hashlib.sha256(_LABEL + b"deterministic-random/" + label + b"/" + seed).digest()
        self._stream = Cipher(algorithms.AES(key), modes.CTR(_PRG_IV)).encryptor()

    def __call__(self, n: int) -> bytes:
        return self._stream.update(bytes(n))


# --------------------------------------------------------------------------- key agreement


def generate_private_key(random_bytes: RandomBytes = system_random_bytes) -> X25519PrivateKey:
    """A fresh X25519 private key drawn from ``random_bytes`` (the library clamps the scalar)."""
    return X25519PrivateKey.from_private_bytes(random_bytes(32))


def private_key_to_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of an X25519 private key (what is Shamir-shared)."""
    return key.private_bytes_raw()


def private_key_from_bytes(raw: bytes) -> X25519PrivateKey:
    """Inverse of :func:`private_key_to_bytes`."""
    if len(raw) != 32:
        raise SecAggProtocolError(f"an X25519 private key has 32 bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def public_key_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of the public key of ``key``."""
    return key.public_key().public_bytes_raw()


def key_agreement(private_key: X25519PrivateKey, peer_public: bytes) -> bytes:
    """X25519 shared secret with a peer's raw public key.

    A malformed or low-order public key is a protocol violation by whoever supplied it, so it
    raises :class:`SecAggProtocolError` instead of the library's bare ``ValueError``.
    """
    if len(peer_public) != PUBLIC_KEY_BYTES:
        raise SecAggProtocolError(
            f"an X25519 public key has {PUBLIC_KEY_BYTES} bytes, got {len(peer_public)}"
        )
    try:
        return private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as err:  # the all-zero shared secret of a low-order point
        raise SecAggProtocolError(f"invalid X25519 public key: {err}") from err


def derive_pair_secret(
    shared_secret: bytes, *, label: bytes, session_id: bytes, u: int, v: int
) -> bytes:
    """HKDF-SHA256 of an X25519 shared secret into 32 bytes bound to a purpose and a pair.

    The pair is unordered (both ends derive the same value); the session id (which commits to
    the round id and every round parameter) is the HKDF salt.
    """
    low, high = (u, v) if u <= v else (v, u)
    info = label + b"/" + struct.pack("<II", low, high)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=session_id, info=info).derive(
        shared_secret
    )


def derive_mask_seed(shared_secret: bytes, session_id: bytes, u: int, v: int) -> bytes:
    """The pairwise mask seed ``s_uv`` of Bonawitz et al. (from the ``s`` key agreement)."""
    return derive_pair_secret(
        shared_secret, label=MASK_SEED_LABEL, session_id=session_id, u=u, v=v
    )


def derive_aead_key(shared_secret: bytes, session_id: bytes, u: int, v: int) -> bytes:
    """The AES-256-GCM key that protects the shares between ``u`` and ``v`` (``c`` agreement)."""
    return derive_pair_secret(shared_secret, label=AEAD_KEY_LABEL, session_id=session_id, u=u, v=v)


# --------------------------------------------------------------------------- AEAD


def share_associated_data(session_id: bytes, sender: int, recipient: int) -> bytes:
    """Associated data of a share ciphertext: the direction matters, so it is not symmetric.
    The protocol passes the roster's graph seed as ``session_id`` (it hashes the session and
    every member's contribution), so a share only decrypts for a holder that saw the same
    roster, hence the same neighbour graph, as its sender."""
    return SHARE_AD_LABEL + b"/" + session_id + struct.pack("<II", sender, recipient)


def aead_encrypt(
    key: bytes,
    plaintext: bytes,
    associated_data: bytes,
    random_bytes: RandomBytes = system_random_bytes,
) -> bytes:
    """AES-256-GCM with a random 96-bit nonce; returns ``nonce || ciphertext || tag``."""
    nonce = random_bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def aead_decrypt(key: bytes, blob: bytes, associated_data: bytes) -> bytes:
    """Inverse of :func:`aead_encrypt`; any tampering raises :class:`SecAggProtocolError`."""
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise SecAggProtocolError(f"ciphertext too short ({len(blob)} bytes)")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated_data)
    except InvalidTag as err:
        raise SecAggProtocolError("ciphertext failed authentication") from err


# --------------------------------------------------------------------------- PRG and masks


def ring_dtype(bits: int) -> np.dtype:
    """The unsigned dtype that holds Z_(2^bits): native wrap-around does the modular sums."""
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be in [1, 64], got {bits}")
    return np.dtype("<u4") if bits <= 32 else np.dtype("<u8")


def ring_mask(bits: int) -> int:
    """``2**bits - 1``: the AND-mask that reduces a wrapped uint32/uint64 value mod 2^bits."""
    return (1 << bits) - 1


def reduce_mod(values: np.ndarray, bits: int) -> np.ndarray:
    """Reduce a ring-dtype array mod 2^bits in place (a no-op for 32 and 64 bits)."""
    if bits not in (32, 64):
        np.bitwise_and(values, values.dtype.type(ring_mask(bits)), out=values)
    return values


def prg(seed: bytes, dim: int, bits: int) -> np.ndarray:
    """Expand a 32-byte seed into ``dim`` pseudo-random values uniform in Z_(2^bits).

    Each value takes 4 (``bits <= 32``) or 8 bytes of the AES-256-CTR keystream; since 2^bits
    divides 2^32 (or 2^64), masking the low bits keeps the values exactly uniform.
    """
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a PRG seed has {SEED_BYTES} bytes, got {len(seed)}")
    dtype = ring_dtype(bits)
    stream = Cipher(algorithms.AES(seed), modes.CTR(_PRG_IV)).encryptor()
    out = np.frombuffer(stream.update(bytes(dim * dtype.itemsize)), dtype=dtype).copy()
    return reduce_mod(out, bits)


class MaskAccumulator:
    """A running sum in Z_(2^bits) of vectors and PRG streams, without per-call allocations.

    Masking a vector with ``m`` seeds costs ``m`` AES-CTR keystreams written into one scratch
    buffer plus ``m`` in-place numpy additions; the values are reduced mod 2^bits only when read
    because uint32/uint64 arithmetic already wraps mod 2^32/2^64, a multiple of 2^bits.
    """

    def __init__(self, dim: int, bits: int) -> None:
        self.dim, self.bits = dim, bits
        self.dtype = ring_dtype(bits)
        nbytes = dim * self.dtype.itemsize
        self._zeros = bytes(nbytes)
        self._scratch_buf = bytearray(nbytes + _UPDATE_INTO_SLACK)
        self._scratch = np.frombuffer(self._scratch_buf, dtype=self.dtype, count=dim)
        self._total = np.zeros(dim, dtype=self.dtype)

    def _expand(self, seed: bytes) -> np.ndarray:
        if len(seed) != SEED_BYTES:
            raise ValueError(f"a PRG seed has {SEED_BYTES} bytes, got {len(seed)}")
        stream = Cipher(algorithms.AES(seed), modes.CTR(_PRG_IV)).encryptor()
        stream.update_into(self._zeros, self._scratch_buf)
        return self._scratch

    def add_stream(self, seed: bytes) -> None:
        """Add ``prg(seed)``."""
        np.add(self._total, self._expand(seed), out=self._total)

    def subtract_stream(self, seed: bytes) -> None:
        """Subtract ``prg(seed)``."""
        np.subtract(self._total, self._expand(seed), out=self._total)

    def add(self, values: np.ndarray) -> None:
        """Add a vector already in the ring dtype."""
        np.add(self._total, values, out=self._total)

    def subtract(self, values: np.ndarray) -> None:
        """Subtract a vector already in the ring dtype."""
        np.subtract(self._total, values, out=self._total)

    def value(self) -> np.ndarray:
        """A copy of the sum, reduced mod 2^bits."""
        return reduce_mod(self._total.copy(), self.bits)


# --------------------------------------------------------------------------- Shamir sharing


def random_field_element(random_bytes: RandomBytes = system_random_bytes) -> int:
    """A uniform element of GF(2^521 - 1) by rejection sampling (no modular bias)."""
    while True:
        value = int.from_bytes(random_bytes(SHARE_BYTES), "big") & ((1 << 521) - 1)
        if value < SHAMIR_PRIME:
            return value


def _check_points(xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs):
        raise ValueError("Shamir evaluation points must be distinct")
    for x in xs:
        if not 0 < x < SHAMIR_PRIME:
            raise ValueError(f"Shamir evaluation point {x} is not in [1, p)")


def shamir_split(
    secret: int,
    threshold: int,
    xs: Sequence[int],
    random_bytes: RandomBytes = system_random_bytes,
) -> list[int]:
    """Shares ``f(x)`` of a random degree ``threshold - 1`` polynomial with ``f(0) = secret``.

    Any ``threshold`` shares determine the secret; any ``threshold - 1`` are independent of it
    (uniform coefficients, Shamir 1979).
    """
    if not 0 <= secret < SHAMIR_PRIME:
        raise ValueError("the secret must be a field element")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold must be in [1, {len(xs)}], got {threshold}")
    _check_points(xs)
    coefficients = [secret] + [random_field_element(random_bytes) for _ in range(threshold - 1)]
    coefficients.reverse()  # Horner's rule runs from the leading coefficient
    shares = []
    for x in xs:
        y = 0
        for c in coefficients:
            y = (y * x + c) % SHAMIR_PRIME
        shares.append(y)
    return shares


def lagrange_coefficients_at_zero(xs: Sequence[int]) -> list[int]:
    """Weights ``l_i`` with ``f(0) = sum_i l_i f(x_i)`` for any polynomial of degree < len(xs).

    ``l_i = prod_{j != i} x_j / (x_j - x_i)``; the evaluation points are small client indices, so
    numerators and denominators are exact integers and one batched modular inversion
    (Montgomery's trick) replaces ``len(xs)`` inversions.
    """
    _check_points(xs)
    count = len(xs)
    product = 1
    for x in xs:
        product *= x
    numerators = [product // x for x in xs]
    denominators = []
    for i, xi in enumerate(xs):
        d = 1
        for j, xj in enumerate(xs):
            if j != i:
                d *= xj - xi
        denominators.append(d % SHAMIR_PRIME)
    prefix = [1] * (count + 1)
    for i, d in enumerate(denominators):
        prefix[i + 1] = prefix[i] * d % SHAMIR_PRIME
    inverse = pow(prefix[count], -1, SHAMIR_PRIME)
    weights = [0] * count
    for i in range(count - 1, -1, -1):
        inv_i = inverse * prefix[i] % SHAMIR_PRIME
        inverse = inverse * denominators[i] % SHAMIR_PRIME
        weights[i] = numerators[i] % SHAMIR_PRIME * inv_i % SHAMIR_PRIME
    return weights


def shamir_reconstruct(xs: Sequence[int], ys: Sequence[int]) -> int:
    """Interpolate the shares ``(x_i, y_i)`` at 0.

    With fewer shares than the threshold the result is a uniformly random field element, not
    the secret: Shamir sharing cannot tell, so callers check the reconstructed value.
    """
    if len(xs) != len(ys) or not xs:
        raise ValueError("need as many share values as evaluation points, at least one")
    weights = lagrange_coefficients_at_zero(xs)
    return sum(w * y for w, y in zip(weights, ys)) % SHAMIR_PRIME


def share_to_bytes(share: int) -> bytes:
    """A share as :data:`SHARE_BYTES` big-endian bytes."""
    return share.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(raw: bytes) -> int:
    """Inverse of :func:`share_to_bytes`, rejecting values outside the field."""
    if len(raw) != SHARE_BYTES:
        raise SecAggProtocolError(f"a share has {SHARE_BYTES} bytes, got {len(raw)}")
    value = int.from_bytes(raw, "big")
    if value >= SHAMIR_PRIME:
        raise SecAggProtocolError("a share is not an element of the Shamir field")
    return value


def split_secret_bytes(
    secret: bytes,
    threshold: int,
    xs: Sequence[int],
    random_bytes: RandomBytes = system_random_bytes,
) -> list[bytes]:
    """Shamir-share a 32-byte secret (a seed or a raw private key); returns serialised shares."""
    if len(secret) != SEED_BYTES:
        raise ValueError(f"secrets are {SEED_BYTES} bytes, got {len(secret)}")
    value = int.from_bytes(secret, "big")
    return [share_to_bytes(y) for y in shamir_split(value, threshold, xs, random_bytes)]


def reconstruct_secret_bytes(xs: Sequence[int], shares: Sequence[bytes]) -> bytes:
    """Recover a 32-byte secret from serialised shares (exactly ``threshold`` of them).

    A result of more than 32 bytes proves the shares are inconsistent (corrupted, or fewer than
    the threshold): a genuine secret is always below 2^256.
    """
    value = shamir_reconstruct(xs, [share_from_bytes(s) for s in shares])
    if value >> (8 * SEED_BYTES):
        raise SecAggProtocolError(
            "Shamir reconstruction gave a value outside the secret space: the shares are "
            "inconsistent or fewer than the threshold"
        )
    return value.to_bytes(SEED_BYTES, "big")
