"""The server's watermark key: a secret from which every trigger set and fingerprint derives.

The key never leaves the server: runs record only its ``fingerprint`` (a one-way hash, safe
in logs and reports because the key has at least 128 bits of entropy, so the hash cannot be
inverted by guessing). Everything derived from it (trigger sets, per-client fingerprint
directions, retraining shuffles) is a pure function of the key and a purpose string, computed
with HKDF-SHA256 (RFC 5869) from the ``cryptography`` library, so a resumed run regenerates
the same trigger set without storing it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedmosaic.core.errors import ConfigError

MIN_KEY_BYTES = 16  # 128 bits: brute-forcing the key from its fingerprint is infeasible
_SALT = b"fedmosaic-watermark-v1"  # domain separation from any other use of the same bytes


class WatermarkKey:
    """A secret key of at least 16 random bytes. ``repr`` and ``str`` show only the
    fingerprint, so a key printed or logged by mistake does not leak."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes | bytearray):
            raise ConfigError("watermark.key", type(secret).__name__,
                              f"bytes of at least {MIN_KEY_BYTES} random bytes")
        if len(secret) < MIN_KEY_BYTES:
            raise ConfigError("watermark.key", f"<{len(secret)} bytes>",
                              f"at least {MIN_KEY_BYTES} random bytes")
        self._secret = bytes(secret)

    @classmethod
    def generate(cls, nbytes: int = 32) -> WatermarkKey:
        """A fresh key from the operating system's CSPRNG."""
        return cls(secrets.token_bytes(max(nbytes, MIN_KEY_BYTES)))

    @classmethod
    def from_hex(cls, text: str) -> WatermarkKey:
        try:
            raw = bytes.fromhex(text.strip())
        except ValueError:
            raise ConfigError("watermark.key", "<not hexadecimal>",
                              "a hexadecimal string (the key file format)") from None
        return cls(raw)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> WatermarkKey:
        """Read a key file: the key as one line of hexadecimal text."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError("watermark.key_file", str(p), "an existing key file "
                              "(create one with `fedmosaic watermark keygen PATH`)")
        return cls.from_hex(p.read_text(encoding="ascii", errors="replace"))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the key as hexadecimal, readable by the owner only; never overwrites."""
        p = Path(path)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(self._secret.hex() + "\n")
        return p

    def derive(self, purpose: str, nbytes: int = 16) -> bytes:
        """``nbytes`` pseudo-random bytes for one purpose (HKDF-SHA256 expand)."""
        return HKDF(algorithm=hashes.SHA256(), length=nbytes, salt=_SALT,
                    info=purpose.encode()).derive(self._secret)

    def seed(self, purpose: str) -> int:
        """A 128-bit integer seed for one purpose (for ``numpy.random.default_rng``)."""
        return int.from_bytes(self.derive(purpose, 16), "big")

    @property
    def fingerprint(self) -> str:
        """A short public identifier of the key (safe to log, compare and report)."""
        return self.derive("fingerprint", 8).hex()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WatermarkKey) and secrets.compare_digest(
            self._secret, other._secret)

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        return f"WatermarkKey(fingerprint={self.fingerprint})"

    __str__ = __repr__

    def __reduce__(self) -> None:  # type: ignore[override]
        # Pickling would copy the secret into checkpoints, Ray object stores or logs.
        raise TypeError("WatermarkKey is not picklable: pass the key file, not the key")
