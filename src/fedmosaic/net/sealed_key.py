"""A private key sealed with a passphrase: scrypt (RFC 7914) then AES-256-GCM (NIST SP 800-38D).

Used for the federation CA key. ``cryptography``'s standard encrypted forms all have a cheap
passphrase check: encrypted PKCS#8 PEM (``BestAvailableEncryption``) uses PBKDF2-HMAC-SHA256
with a fixed 2,048 iterations, and PKCS#12, whose key-bag iterations can be raised, keeps a MAC
with 2,048 iterations that an attacker can test guesses against; OpenSSH's bcrypt format needs
the ``bcrypt`` package. So the key is sealed the way ``age``'s passphrase recipient does it
(scrypt, then an AEAD): scrypt with N = 2^17, r = 8, p = 1 (128 MiB and about 0.3 s per guess
on one core, the parameters RFC 7914 section 2 and ``age`` use for file encryption are 2^20
and 2^18) derives a 256-bit key from the passphrase and a random 16-byte salt, and AES-256-GCM
with a random 96-bit nonce encrypts the key's PKCS#8 DER, authenticating the header (format,
scrypt parameters, salt, nonce) as associated data, so a wrong passphrase or any altered byte
fails the tag check. Both primitives are ``cryptography``'s, used as documented.

File format: PEM armour ``FEDMOSAIC ENCRYPTED PRIVATE KEY`` around
``b"FMK1" | log2(N) | r | p | salt (16) | nonce (12) | ciphertext and tag``.
"""

from __future__ import annotations

import base64
import os
import re

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

LABEL = "FEDMOSAIC ENCRYPTED PRIVATE KEY"
MAGIC = b"FMK1"
LOG2_N, R, P = 17, 8, 1
_SALT, _NONCE = 16, 12
_HEADER = len(MAGIC) + 3 + _SALT + _NONCE
_ARMOUR = re.compile(rb"-----BEGIN " + LABEL.encode() + rb"-----\s*(.*?)\s*-----END "
                     + LABEL.encode() + rb"-----", re.DOTALL)


class SealedKeyError(ValueError):
    """Not a sealed key, unsupported parameters, or the wrong passphrase."""


def is_sealed(raw: bytes) -> bool:
    """Whether ``raw`` starts like a sealed key."""
    return raw.lstrip().startswith(b"-----BEGIN " + LABEL.encode() + b"-----")


def _key(passphrase: bytes, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=2 ** log2_n, r=r, p=p).derive(passphrase)


def seal(der: bytes, passphrase: bytes) -> bytes:
    """Seal a private key's DER encoding with ``passphrase``; returns the PEM-armoured file."""
    if not passphrase:
        raise SealedKeyError("an empty passphrase seals nothing")
    salt, nonce = os.urandom(_SALT), os.urandom(_NONCE)
    header = MAGIC + bytes([LOG2_N, R, P]) + salt + nonce
    body = header + AESGCM(_key(passphrase, salt, LOG2_N, R, P)).encrypt(nonce, der, header)
    b64 = base64.b64encode(body).decode()
    lines = "\n".join(b64[i:i + 64] for i in range(0, len(b64), 64))
    return f"-----BEGIN {LABEL}-----\n{lines}\n-----END {LABEL}-----\n".encode()


def unseal(raw: bytes, passphrase: bytes) -> bytes:
    """The DER key sealed in ``raw``; SealedKeyError if the passphrase or the file is wrong."""
    match = _ARMOUR.search(raw)
    if match is None:
        raise SealedKeyError(f"not a {LABEL} file")
    try:
        body = base64.b64decode(b"".join(match.group(1).split()), validate=True)
    except ValueError:
        raise SealedKeyError("the sealed key is not valid base64") from None
    if len(body) <= _HEADER + 16 or body[:4] != MAGIC:
        raise SealedKeyError("unknown sealed-key format")
    log2_n, r, p = body[4], body[5], body[6]
    # Bounds keep a crafted file from asking for gigabytes or minutes.
    if not (14 <= log2_n <= 20 and 1 <= r <= 16 and 1 <= p <= 4):
        raise SealedKeyError(f"unsupported scrypt parameters N=2^{log2_n} r={r} p={p}")
    salt = body[7:7 + _SALT]
    nonce = body[7 + _SALT:_HEADER]
    try:
        return AESGCM(_key(passphrase, salt, log2_n, r, p)).decrypt(
            nonce, body[_HEADER:], body[:_HEADER])
    except InvalidTag:
        raise SealedKeyError("wrong passphrase (or the file was altered)") from None
