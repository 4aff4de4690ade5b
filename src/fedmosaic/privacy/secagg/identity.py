"""Long-term signing identities of SecAgg+ clients and how peers verify them.

The malicious-server variant of Bonawitz et al., CCS 2017 ("Practical Secure Aggregation for
Privacy-Preserving Machine Learning", §4 and Fig. 4 "active" protocol) assumes a PKI: every
client signs its advertised public keys and its view of the survivor set with a long-term
key whose public half the other clients can look up, so the server can neither substitute a
victim's keys nor show different clients different survivor sets without being caught.

Two seams keep the protocol independent of where the keys come from:

* :class:`SigningIdentity` -- the client's own identity string, private signing key and the
  *credential* that lets others find the public key: the DER X.509 certificate in a
  deployment (the client's mTLS certificate and key, ``fedmosaic certs``), empty in
  simulation;
* :class:`PeerVerifier` -- turns a claimed identity and a credential into a public key, or
  refuses: :class:`CertificateVerifier` checks that the certificate was issued by the
  federation CA, is valid now, is a client certificate and names the claimed identity;
  :class:`StaticPki` is the simulated PKI (a dict identity -> public key).

Signatures are ECDSA with SHA-256 (P-256, the federation's default key type; SHA-384 for
P-384), carried as fixed-size ``r || s`` (64 bytes for P-256) so message sizes do not vary,
or RSA-PSS with SHA-256, all from ``cryptography``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import NameOID

from fedmosaic.privacy.secagg.errors import SecAggProtocolError

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

#: Largest credential (certificate) and signature a message may carry, in bytes.
MAX_CREDENTIAL_BYTES = 16_384
MAX_SIGNATURE_BYTES = 1_024
MAX_IDENTITY_BYTES = 255


def _hash_for(key: PrivateKey | PublicKey) -> hashes.HashAlgorithm:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return hashes.SHA384() if key.curve.key_size > 256 else hashes.SHA256()
    return hashes.SHA256()


def _scalar_bytes(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> int:
    return (key.curve.key_size + 7) // 8


def _pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)


def verify_signature(public_key: PublicKey, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` is a valid signature of ``data`` under ``public_key``."""
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            size = _scalar_bytes(public_key)
            if len(signature) != 2 * size:
                return False
            der = encode_dss_signature(int.from_bytes(signature[:size], "big"),
                                       int.from_bytes(signature[size:], "big"))
            public_key.verify(der, data, ec.ECDSA(_hash_for(public_key)))
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, _pss(), hashes.SHA256())
        else:
            return False
    except InvalidSignature:
        return False
    return True


class SigningIdentity:
    """A client's long-term signing key, its identity and its credential (certificate DER)."""

    def __init__(self, identity: str, private_key: PrivateKey, credential: bytes = b"") -> None:
        if not identity or len(identity.encode()) > MAX_IDENTITY_BYTES:
            raise ValueError(f"an identity is 1 to {MAX_IDENTITY_BYTES} bytes, got {identity!r}")
        if not isinstance(private_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise ValueError(f"unsupported signing key type {type(private_key).__name__}")
        if len(credential) > MAX_CREDENTIAL_BYTES:
            raise ValueError(f"credential of {len(credential)} bytes exceeds the limit")
        self.identity, self.credential = identity, bytes(credential)
        self._key = private_key

    @classmethod
    def generate(cls, identity: str) -> SigningIdentity:
        """A fresh P-256 key without a certificate: for simulation with :class:`StaticPki`."""
        return cls(identity, ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_files(cls, cert: str | Path, key: str | Path) -> SigningIdentity:
        """The client's mTLS certificate and key: identity is the certificate's common name."""
        certificate = x509.load_pem_x509_certificate(Path(cert).read_bytes())
        private_key = serialization.load_pem_private_key(Path(key).read_bytes(), password=None)
        if not isinstance(private_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise ValueError(f"{key}: unsupported key type {type(private_key).__name__}")
        if private_key.public_key().public_numbers() != certificate.public_key().public_numbers():
            raise ValueError(f"{key} is not the key of certificate {cert}")
        return cls(_common_name(certificate), private_key,
                   certificate.public_bytes(serialization.Encoding.DER))

    @property
    def public_key(self) -> PublicKey:
        return self._key.public_key()

    def sign(self, data: bytes) -> bytes:
        if isinstance(self._key, ec.EllipticCurvePrivateKey):
            r, s = decode_dss_signature(self._key.sign(data, ec.ECDSA(_hash_for(self._key))))
            size = _scalar_bytes(self._key)
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")
        return self._key.sign(data, _pss(), hashes.SHA256())


class PeerVerifier(Protocol):
    """Maps a claimed identity and its credential to that identity's public key, or refuses."""

    def public_key(self, identity: str, credential: bytes) -> PublicKey:
        """The verified public key; :class:`SecAggProtocolError` if the credential is bad."""
        ...


class StaticPki:
    """A simulated PKI: identities and their public keys, known to every client in advance."""

    def __init__(self, keys: Mapping[str, PublicKey]) -> None:
        self.keys = dict(keys)

    def public_key(self, identity: str, credential: bytes) -> PublicKey:
        key = self.keys.get(identity)
        if key is None:
            raise SecAggProtocolError(f"identity {identity!r} is not in the PKI")
        return key


def _common_name(certificate: x509.Certificate) -> str:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise SecAggProtocolError("a certificate without a single common name")
    return str(names[0].value)


class CertificateVerifier:
    """Checks a peer's DER certificate against the federation CA (``ca.pem``).

    Accepts only a certificate issued directly by the CA (signature and issuer name), inside
    its validity period, with organizational unit ``client`` (the federation's client role)
    and common name equal to the claimed identity. Revocation is enforced by the server at
    connection time (its CRL); clients do not hold the CRL, so a malicious server could relay
    a revoked client's certificate -- the revoked client then counts as corrupted.
    """

    def __init__(self, ca_certificate: x509.Certificate, role: str = "client") -> None:
        self.ca, self.role = ca_certificate, role
        self._cache: dict[tuple[str, bytes], PublicKey] = {}

    @classmethod
    def from_file(cls, ca: str | Path) -> CertificateVerifier:
        return cls(x509.load_pem_x509_certificate(Path(ca).read_bytes()))

    def public_key(self, identity: str, credential: bytes) -> PublicKey:
        cached = self._cache.get((identity, credential))
        if cached is not None:
            return cached
        try:
            cert = x509.load_der_x509_certificate(credential)
            cert.verify_directly_issued_by(self.ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise SecAggProtocolError(
                f"the certificate of {identity!r} was not issued by the federation CA ({exc})"
            ) from None
        now = dt.datetime.now(dt.timezone.utc)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise SecAggProtocolError(f"the certificate of {identity!r} is not valid now")
        if _common_name(cert) != identity:
            raise SecAggProtocolError(
                f"the certificate relayed for {identity!r} names {_common_name(cert)!r}"
            )
        units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        if [str(u.value) for u in units] != [self.role]:
            raise SecAggProtocolError(f"the certificate of {identity!r} is not a {self.role}'s")
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise SecAggProtocolError(f"the certificate of {identity!r} has an unusable key")
        self._cache[(identity, credential)] = key
        return key
